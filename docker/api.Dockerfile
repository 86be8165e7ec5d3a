# The REST API: no torch, no GPU. Installs the project as the Makefile does, without `core`.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tid_core ./tid_core
COPY api ./api
COPY store ./store
COPY cli ./cli
COPY worker ./worker
RUN python -m pip install --quiet --upgrade pip \
 && python -m pip install --quiet ".[service]"
RUN useradd --create-home --uid 1000 tid && mkdir -p /data && chown tid /data
USER tid
ENV TID_DATA_ROOT=/data
EXPOSE 8000
# Migrate, then serve (the app refuses to start on an un-migrated database).
CMD ["sh", "-c", "tid db upgrade && tid serve --host 0.0.0.0 --port 8000"]
