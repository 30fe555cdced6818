// evalserve's try-it page. Plain JavaScript, no build step; it talks only to its own origin.
"use strict";

const KEY_STORAGE = "evalserve-api-key"; // sessionStorage: gone when the browser session ends
const TOP_K = 5;
const STATUS_TEXT = {
  400: "Not a readable image",
  401: "An API key is needed",
  403: "The API key is not valid",
  404: "Unknown model",
  408: "The upload took too long",
  413: "Too large",
  415: "Unsupported type",
  422: "Invalid request",
  500: "The model failed",
  503: "The server is busy",
  504: "No answer in time",
};

const $ = (selector) => document.querySelector(selector);
const modelSelect = $("#model");
const keyField = $("#key-field");
const keyInput = $("#api-key");
const statusLine = $("#status");
const results = $("#results");
const drop = $("#drop");
const picker = $("#files");

function images(count) {
  return `${count} image${count === 1 ? "" : "s"}`;
}

// What happened to one drop, paste or pick: every image is counted once, as classified or failed.
function summary(succeeded, total) {
  if (succeeded === total) return `Classified ${images(total)}.`;
  if (succeeded === 0) return total === 1 ? "The image failed." : `All ${images(total)} failed.`;
  return `Classified ${succeeded} of ${images(total)}; ${total - succeeded} failed.`;
}

function headers() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorMessage(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body && body.error ? body.error.message || String(body.error) : "";
  } catch (_) {
    detail = "";
  }
  const title = STATUS_TEXT[response.status] || `HTTP ${response.status}`;
  const retry = response.headers.get("Retry-After");
  const suffix = response.status === 503 && retry ? ` Try again in ${retry} s.` : "";
  return `${title} (${response.status})${detail ? `: ${detail}` : ""}.${suffix}`;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (_) {
    statusLine.textContent = "Could not reach the server.";
    return;
  }
  if (response.status === 401 || response.status === 403) {
    keyField.hidden = false;
    statusLine.textContent = await errorMessage(response);
    keyInput.focus();
    return;
  }
  if (!response.ok) {
    statusLine.textContent = await errorMessage(response);
    return;
  }
  const { models } = await response.json();
  const previous = modelSelect.value;
  modelSelect.replaceChildren();
  for (const model of models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = `${model.name} (${model.num_classes} classes)`;
    if (model.default) option.defaultSelected = true;
    modelSelect.append(option);
  }
  if (previous && models.some((m) => m.name === previous)) modelSelect.value = previous;
  statusLine.textContent = `${models.length} model${models.length === 1 ? "" : "s"} ready.`;
  describeModel(models);
}

function describeModel(models) {
  const model = models.find((m) => m.name === modelSelect.value);
  $("#model-info").textContent = model
    ? `input ${model.input_size.join("×")}, ${model.device}, ${model.dtype}`
    : "";
  modelSelect.onchange = () => describeModel(models);
}

function renderBars(list, classes) {
  list.replaceChildren();
  for (const entry of classes) {
    const item = document.createElement("li");
    item.className = "bar";
    const percent = (entry.score * 100).toFixed(1);
    item.setAttribute("aria-label", `${entry.label}: ${percent} percent`);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    label.title = entry.label;
    const track = document.createElement("span");
    track.className = "track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0.5, entry.score * 100)}%`;
    track.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${percent}%`;
    item.append(label, track, score);
    list.append(item);
  }
}

// Resolves to true when the image was classified, false when it failed (the card says why).
async function classify(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  const image = card.querySelector("img");
  const name = file.name || "pasted image";
  image.alt = `Preview of ${name}`;
  image.onerror = () => { image.hidden = true; }; // the browser cannot show it either
  image.src = URL.createObjectURL(file);
  card.querySelector(".name").textContent = name;
  const meta = card.querySelector(".meta");
  const bars = card.querySelector(".bars");
  const error = card.querySelector(".error");
  meta.textContent = "Classifying…";
  card.setAttribute("aria-busy", "true");
  results.prepend(card);

  const model = modelSelect.value;
  const form = new FormData();
  form.append("file", file, name);
  const started = performance.now();
  try {
    const url = model ? `/v1/models/${encodeURIComponent(model)}/predict` : "/v1/predict";
    const response = await fetch(`${url}?top_k=${TOP_K}`, {
      method: "POST",
      body: form,
      headers: headers(),
    });
    const elapsed = Math.round(performance.now() - started);
    if (!response.ok) {
      meta.textContent = `${model || "default model"} · ${elapsed} ms`;
      error.textContent = await errorMessage(response);
      error.hidden = false;
      if (response.status === 401 || response.status === 403) keyField.hidden = false;
      return false;
    }
    const body = await response.json();
    meta.textContent = `${body.model} · ${elapsed} ms`;
    renderBars(bars, body.predictions[0].classes);
    return true;
  } catch (_) {
    meta.textContent = "";
    error.textContent = "Could not reach the server.";
    error.hidden = false;
    return false;
  } finally {
    card.removeAttribute("aria-busy");
  }
}

function classifyAll(files) {
  const list = Array.from(files || []);
  if (list.length === 0) return;
  statusLine.textContent = `Classifying ${images(list.length)}…`;
  Promise.all(list.map(classify)).then((outcomes) => {
    statusLine.textContent = summary(outcomes.filter(Boolean).length, list.length);
  });
}

// A real button, so Enter and Space work as everywhere else; a click anywhere on the drop zone
// does the same for the mouse.
drop.addEventListener("click", (event) => {
  if (event.target !== picker) picker.click();
});
picker.addEventListener("click", (event) => event.stopPropagation());
picker.addEventListener("change", () => {
  classifyAll(picker.files);
  picker.value = "";
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  classifyAll(event.dataTransfer.files);
});
document.addEventListener("paste", (event) => {
  const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
  if (files.length) classifyAll(files);
});
keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("change", () => {
  const key = keyInput.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  loadModels();
});
if (sessionStorage.getItem(KEY_STORAGE)) keyField.hidden = false;

loadModels();
