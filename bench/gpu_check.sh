#!/usr/bin/env bash
# evalserve's GPU check, for a fresh GPU machine with no network, in under 8 minutes:
#
#   1. prints the GPU (or "no GPU: skipped everything" and exits 0 where there is none);
#   2. installs the project's dependencies that the machine's python3 lacks, or has too old,
#      and only those, from the wheels of bench/fetch_gpu_wheels.sh (EVALSERVE_WHEELS, default
#      .whl in the repository root), into /tmp/evalserve-site/<python> with --no-index --no-deps:
#      never torch, never `pip install .`; evalserve runs from this checkout (PYTHONPATH);
#   3. runs every CUDA test (pytest -m cuda: compile, fp16, the GPU path);
#   4. runs `evalserve bench` on CUDA, over HTTP with JPEG decode, for eager fp32, --compile
#      and --precision fp16 at 1, 16, 64 and 256 clients, and the null model (the front end's
#      limit) at 16 and 256 clients;
#   5. prints what ran, what was skipped, and each run against the targets.
#
# Every step has a time limit and the whole script a budget (GPU_CHECK_BUDGET, 465 s): a step
# with too little time left is skipped and says so. Results (bench JSON and plots, each step's
# output, gpu_check.log) go to $OUT when set, else bench/results/gpu, all in that one folder.
# GPU_CHECK_SECONDS sets the bench's seconds per level (default 5); PYTHON the interpreter.
# Run it again for a fresh summary in a fresh $OUT: the summary reads every bench JSON there.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}

gpu=""
if command -v nvidia-smi >/dev/null 2>&1; then
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        2>/dev/null | head -n 1 || true)
fi
if [[ -z $gpu ]]; then
    echo "no GPU: skipped everything"
    exit 0
fi

out=${OUT:-$repo/bench/results/gpu}
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
started=$SECONDS
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-465}))
seconds=${GPU_CHECK_SECONDS:-5}
ran=()
skipped=()
failed=()

echo "== evalserve GPU check, $(date -u '+%Y-%m-%d %H:%M:%S') UTC"
echo "GPU: $gpu"
echo "results: $out"

# -- 2. dependencies ------------------------------------------------------------------------
# One folder per interpreter (cpython-312, ...): a compiled wheel fits one Python only.
site=/tmp/evalserve-site/$("$python" -c 'import sys; print(sys.implementation.cache_tag)')
wheels=${EVALSERVE_WHEELS:-$repo/.whl}
# evalserve refuses EVALSERVE_* variables that are not its settings.
unset EVALSERVE_WHEELS
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# Prints "install WHEEL", "skip NAME VERSION" (installed and recent enough) and "missing NAME
# SPEC" (neither installed nor a wheel) for pyproject's dependencies, what the cuda tests import
# (pytest, asgi-lifespan) and the plot's matplotlib, following the requirements of each wheel it
# would install.
plan=$("$python" - "$repo/pyproject.toml" "$wheels" <<'PY'
import email.parser
import importlib.metadata
import re
import sys
import tomllib
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement


def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()


pyproject = tomllib.loads(Path(sys.argv[1]).read_text())
wheel_dir = Path(sys.argv[2])
wheels = {}
for wheel in sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else ():
    wheels[key(wheel.name.split("-")[0])] = wheel
roots = [*pyproject["project"]["dependencies"], "pytest", "asgi-lifespan", "matplotlib"]
queue = [Requirement(text) for text in roots]
seen = set()
while queue:
    requirement = queue.pop(0)
    name = key(requirement.name)
    if name in seen:
        continue
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    seen.add(name)
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None and requirement.specifier.contains(version, prereleases=True):
        print(f"skip {name} {version}")
        continue
    wheel = wheels.get(name)
    if wheel is None:
        print(f"missing {name} {requirement.specifier or 'any'} (installed: {version})")
        continue
    print(f"install {wheel}")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(metadata).decode())
    queue.extend(Requirement(text) for text in message.get_all("Requires-Dist") or [])
PY
)
installing=$(awk '$1 == "install" {print $2}' <<<"$plan")
echo "-- dependencies (wheels from $wheels)"
awk '$1 == "skip" {printf "  present: %s %s\n", $2, $3}' <<<"$plan"
if [[ -n $installing ]]; then
    mkdir -p "$site"
    # shellcheck disable=SC2086  # one wheel path a word
    if timeout 120 "$python" -m pip install --quiet --no-index --no-deps --upgrade \
        --target "$site" $installing; then
        for wheel in $installing; do echo "  installed: $(basename "$wheel")"; done
        ran+=("install ($(wc -l <<<"$installing") wheels into $site)")
    else
        echo "  pip could not install the wheels: see above"
        failed+=("dependencies")
    fi
else
    echo "  nothing to install"
fi
missing=$(awk '$1 == "missing" {print $2}' <<<"$plan")
if [[ -n $missing ]]; then
    awk '$1 == "missing" {$1 = ""; printf "  missing, no wheel:%s\n", $0}' <<<"$plan"
    echo "  (run bench/fetch_gpu_wheels.sh where PyPI can be reached, and copy .whl/ here)"
fi
if ! "$python" -c "import app.main, app.tools.bench" 2>"$out/import-error.txt"; then
    echo "evalserve does not import here:"
    cat "$out/import-error.txt"
    echo "skipped: the cuda tests and every bench run"
    exit 1
fi
rm -f "$out/import-error.txt"
if grep -qx "matplotlib" <<<"$missing"; then
    skipped+=("plots (matplotlib missing)")
fi
# The shipped models run on ONNX Runtime on the CPU; the cuda tests' CPU references need it.
cpu_runtime=()
if ! "$python" -c "import onnxruntime, onnx, onnxscript" 2>/dev/null; then
    cpu_runtime=(EVALSERVE_RUNTIME=torch)
    echo "  onnxruntime (or onnx, onnxscript) missing: the cuda tests' CPU side runs on torch"
fi
"$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available:', torch.cuda.is_available())"
# GPU_CHECK_DEVICE=cpu (with a stand-in nvidia-smi) tries this script's flow where there is no
# GPU: the bench runs on the CPU, and the cuda tests skip themselves.
device=${GPU_CHECK_DEVICE:-cuda}
if [[ $device == cuda* ]] &&
    ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "torch cannot use the GPU here: skipped the cuda tests and every bench run"
    exit 1
fi

# -- steps ----------------------------------------------------------------------------------
# step NAME LIMIT_S NEEDS_S COMMAND...: runs COMMAND with at most LIMIT_S seconds (less when the
# budget has less left), its output in $out/NAME.txt and on the screen; skipped when fewer than
# NEEDS_S seconds are left. timeout signals the whole process group: a bench's server too.
step() {
    local name=$1 limit=$2 needs=$3
    shift 3
    local left=$((deadline - SECONDS - 12))
    if ((left < needs)); then
        echo "-- $name: skipped (${left} s of the budget left, needs ${needs})"
        skipped+=("$name (out of time)")
        return 0
    fi
    if ((limit > left)); then
        limit=$left
    fi
    echo "-- $name (at most ${limit} s): $*"
    local began=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt" || rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        ran+=("$name ($((SECONDS - began)) s)")
    elif ((rc == 124 || rc == 137)); then
        failed+=("$name (stopped at its ${limit} s limit)")
    else
        failed+=("$name (exit $rc)")
    fi
}

# -- 3. the CUDA tests ----------------------------------------------------------------------
# Only the files that hold cuda tests are collected: the others import test tools (Playwright,
# tritonclient, ...) that this machine need not have.
mapfile -t cuda_files < <(grep -rlE 'mark\.cuda' tests --include='test_*.py' | sort)
if ((${#cuda_files[@]})); then
    step pytest-cuda 150 60 env "${cpu_runtime[@]}" "$python" -m pytest -m cuda \
        -p no:cacheprovider -q --continue-on-collection-errors "${cuda_files[@]}"
else
    skipped+=("pytest-cuda (no test is marked cuda)")
fi

# -- 4. bench on CUDA -----------------------------------------------------------------------
export EVALSERVE_DEVICE=$device
# A GPU takes larger batches than the CPU default of 16, and 256 clients need queue room.
export EVALSERVE_MAX_BATCH_SIZE=${EVALSERVE_MAX_BATCH_SIZE:-64}
export EVALSERVE_MAX_QUEUE_SIZE=${EVALSERVE_MAX_QUEUE_SIZE:-1024}
echo "batch size $EVALSERVE_MAX_BATCH_SIZE, queue $EVALSERVE_MAX_QUEUE_SIZE"
levels=(--concurrency 1 16 64 256 --seconds "$seconds" --out "$out")
step bench-eager 120 60 "$python" -m app bench "${levels[@]}"
step bench-fp16 120 60 "$python" -m app bench --precision fp16 "${levels[@]}"
step bench-null-model 90 40 "$python" -m app bench --null-model --concurrency 16 256 \
    --seconds "$seconds" --out "$out"
# The same with four front-end processes: does one process limit what reaches the GPU?
mkdir -p "$out/workers4"
step bench-null-model-workers4 90 40 env EVALSERVE_WORKERS=4 "$python" -m app bench \
    --null-model --concurrency 256 --seconds "$seconds" --out "$out/workers4"
# Last: compiling (at start-up and again for the in-process limit) takes the longest.
step bench-compile 300 90 "$python" -m app bench --compile "${levels[@]}"

# -- 5. summary -----------------------------------------------------------------------------
echo
echo "== summary ($((SECONDS - started)) s)"
echo "GPU: $gpu"
for item in "${ran[@]}"; do echo "ran:     $item"; done
for item in "${skipped[@]}"; do echo "skipped: $item"; done
for item in "${failed[@]}"; do echo "FAILED:  $item"; done
if "$python" - "$out" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("targets: default model over HTTP, JPEG decode included: 256 clients >= 10,000 images/s "
      "with p99 <= 50 ms; 1 client p50 <= 5 ms")
for path in sorted(out.rglob("*.json")):
    result = json.loads(path.read_text())
    levels = {level["concurrency"]: level for level in result["served"]}
    limit = result["limit"]["images_per_s"]
    variant = result["precision"] + (", compiled" if result.get("compiled") else "")
    null = result.get("null_model")
    name = (
        f"null model standing in for {null['stands_in_for']} (the front end's limit)"
        if null
        else result["model"]
    )
    workers = result.get("settings", {}).get("workers", 1)
    if workers > 1:
        name += f" with {workers} front-end processes"
    print(f"{name} ({variant}, {result['runtime']}) on {result['device']}: in-process limit "
          f"{limit:,.0f} images/s at batch {result['limit']['batch_size']}; one image alone "
          f"{result['limit']['single_image_ms']:.1f} ms")
    if 256 in levels:
        top = levels[256]
        met = top["images_per_s"] >= 10_000 and top["p99_ms"] <= 50
        verdict = "" if null else ": target " + ("met" if met else "NOT met")
        print(f"  256 clients: {top['images_per_s']:,.0f} images/s, p99 {top['p99_ms']:.1f} ms, "
              f"served/limit {top['images_per_s'] / limit:.0%}, {top['errors']} errors{verdict}")
    if 1 in levels:
        one = levels[1]
        verdict = "" if null else ": target " + ("met" if one["p50_ms"] <= 5 else "NOT met")
        print(f"  1 client: p50 {one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms{verdict}")
    for clients, level in sorted(levels.items()):
        if clients not in (1, 256):
            print(f"  {clients} clients: {level['images_per_s']:,.0f} images/s, p50 "
                  f"{level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, batch "
                  f"{level['mean_batch_size']:.1f}, served/limit "
                  f"{level['images_per_s'] / limit:.0%}, {level['errors']} errors")
PY
then
    :
else
    failed+=("summary")
fi
((${#failed[@]} == 0))
