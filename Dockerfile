# convserve: two images from one file, so serving and training scale apart (docs/deploy.md,
# "Scaling serving and training apart"):
#
#   docker build --target serve -t convserve:serve .   # serving replicas: no torch (CONVSERVE_ROLE=serve)
#   docker build -t convserve:full .                   # the default (last) target: serving + training
#   docker run -p 50051:50051 -p 9090:9090 -v store:/data/store convserve:serve
#   docker run --gpus all -v store:/data/store convserve:full serve --role train   # a trainer
#
# `serve` holds pyproject's base dependencies plus the [serve] extra; `full` adds the [train] extra
# (torch and its CUDA libraries) and runs both roles unless told otherwise (CONVSERVE_ROLE=all).
# Both install against requirements.lock and share every layer up to the serving dependencies.
#
# The base image is a build argument. It must provide Python 3.11 (requirements.lock pins cp311
# wheels). The default, a slim Python, serves GPU hosts too: in `full` the pinned torch wheels bring
# the CUDA and cuDNN libraries that onnxruntime-gpu also uses, so only the host's NVIDIA driver is
# needed (NVIDIA Container Toolkit, `--gpus all`). `serve` has no CUDA libraries: ONNX Runtime runs
# on the CPU there unless they are added (docs/deploy.md says how).
# `make image` builds both with docker or podman, whichever is installed (ENGINE=, BASE_IMAGE=).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The runtime requirement lists, from pyproject.toml: the stages below copy only these files, so an
# edit to pyproject.toml that leaves the dependencies alone (tool settings) reinstalls nothing.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extra = p['optional-dependencies']; open('serve.txt', 'w').write('\n'.join([*p['dependencies'], *extra['serve']]) + '\n'); open('train.txt', 'w').write('\n'.join(extra['train']) + '\n')"

# What both images share: the environment, the user, the data folders and how a container runs.
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CONVSERVE_STORE=/data/store \
    CONVSERVE_DATASETS_ROOT=/data/datasets \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_PORT=50051 \
    CONVSERVE_HTTP_PORT=8000
RUN python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin convserve \
    && mkdir -p /data/store /data/datasets \
    && chown -R convserve /data
WORKDIR /opt/convserve
COPY requirements.lock ./
COPY --from=requirements /src/serve.txt /src/train.txt ./
VOLUME ["/data/store", "/data/datasets"]
# gRPC (convserve.v1 and the Open Inference Protocol); 8000: the Open Inference Protocol over
# HTTP, Triton's port; 9090: the Prometheus metrics endpoint.
EXPOSE 50051 8000 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["convserve", "health", "--timeout", "4"]
# SIGTERM: health turns NOT_SERVING, calls in flight finish within CONVSERVE_GRACE_PERIOD_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["convserve"]
CMD ["serve"]

# The serving dependencies (grpcio, numpy, onnxruntime-gpu, Pillow, aiohttp, prometheus-client,
# boto3 for an s3:// model store, psycopg for a PostgreSQL job store),
# pinned by the lock; the dev tools (pytest, ruff, ...) stay out.
FROM base AS serve-deps
RUN pip install --constraint requirements.lock --requirement serve.txt

# The package itself, as a wheel: a code change rebuilds from here on, never the dependencies.
FROM base AS wheel
COPY README.md pyproject.toml ./
COPY protos ./protos
COPY service ./service
COPY training ./training
RUN pip wheel --no-deps --wheel-dir /opt/wheels .

# Serving replicas: every RPC, Train jobs queued in the job store for a trainer; torch is not inside.
FROM serve-deps AS serve
COPY --from=wheel /opt/wheels /opt/wheels
RUN pip install --no-deps /opt/wheels/convserve-*.whl
ENV CONVSERVE_ROLE=serve
USER 10001
WORKDIR /data

# Serving and training (torch, torchvision, onnx, TensorBoard, ...): role `all` by default, today's
# single-image replica; `serve --role train` (or CONVSERVE_ROLE=train) makes a trainer.
# The default target, last on purpose: `docker build .` builds this image.
FROM serve-deps AS full
RUN pip install --constraint requirements.lock --requirement serve.txt --requirement train.txt
COPY --from=wheel /opt/wheels /opt/wheels
RUN pip install --no-deps /opt/wheels/convserve-*.whl
# onnxruntime-gpu's CUDA provider links libcudart, libcublas, libcurand and cuDNN by name; the
# serving process never imports torch, which would otherwise load them from its nvidia wheels.
ENV CONVSERVE_ROLE=all \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
USER 10001
WORKDIR /data
