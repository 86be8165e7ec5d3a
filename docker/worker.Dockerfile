# A training worker: CUDA runtime base, Python 3.11, torch + torchrun, one job at a time.
# BASE can be overridden (the compose CPU profile uses python:3.11-slim).
ARG BASE=nvidia/cuda:13.0.1-runtime-ubuntu22.04
FROM ${BASE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tid_core ./tid_core
COPY api ./api
COPY store ./store
COPY cli ./cli
COPY worker ./worker
RUN python -m pip install --quiet --upgrade pip \
 && python -m pip install --quiet ".[core,service]"
RUN useradd --create-home --uid 1000 tid && mkdir -p /data && chown tid /data
USER tid
ENV TID_DATA_ROOT=/data
CMD ["tid", "worker"]
