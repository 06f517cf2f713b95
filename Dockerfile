# syntax=docker/dockerfile:1.7
# DefectOps: the `defectops` CLI and its pinned dependencies (requirements.lock, CUDA wheels of torch included), as
# the Argo WorkflowTemplate runs it (`defectops step <name> --run-root s3://...`; with train.nproc > 1 the train step
# starts torchrun itself).
#
# Build (BuildKit; see docs/kubernetes.md, "Container image"):
#   docker build -t <account>.dkr.ecr.<region>.amazonaws.com/defectops:0.1.0 .
#
# The base is pinned to an exact Python release; pin it by digest too for reproducible builds:
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm   # then PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- builder: every wheel the runtime needs, built once and cached by layer ---------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first: this layer is rebuilt only when pyproject.toml or requirements.lock change.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.in \
    && pip wheel --wheel-dir /wheels -c requirements.lock -r requirements.in
# Then the project itself (no dependency resolution: they are all in /wheels already).
COPY README.md ./
COPY core/ core/
COPY pipelines/ pipelines/
COPY training/ training/
COPY evaluation/ evaluation/
COPY registry/ registry/
COPY serving/ serving/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: no compilers, no sources, no wheel cache; a non-root user ------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="defectops" \
      org.opencontainers.image.description="Train, gate, register and serve defect-detection models" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/defectops \
    DEFECTOPS_HOME=/home/defectops/.defectops \
    MLFLOW_DISABLE_TELEMETRY=true NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
RUN groupadd --system --gid 1000 defectops \
    && useradd --system --uid 1000 --gid 1000 --home-dir /home/defectops --create-home --shell /usr/sbin/nologin \
        defectops
# Install from the builder's wheels only (bind mount: the wheels never become a layer of this image).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels defectops \
    && pip check \
    && defectops --help > /dev/null
USER 1000:1000
WORKDIR /home/defectops
# The home is the only place DefectOps writes besides /tmp (caches, the local fallback registry): the Argo templates
# mount emptyDirs on both and run with a read-only root filesystem.
VOLUME ["/home/defectops"]
ENTRYPOINT ["defectops"]
CMD ["--help"]
