# convserve: the gRPC service (Predict from ONNX Runtime) with training included (torch).
#
#   docker build -t convserve .                         # python:3.11-slim-bookworm base
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -v store:/data/store convserve
#
# The base image is a build argument. The default, a slim Python, serves GPU hosts too: the pinned
# torch and onnxruntime-gpu wheels carry their own CUDA and cuDNN libraries, so only the host's
# NVIDIA driver is needed (NVIDIA Container Toolkit, `--gpus all`); a CUDA base image would only
# duplicate them. It must provide Python 3.11 (requirements.lock pins cp311 wheels).
# Without a Docker engine: `make image` (podman, local Debian base; docs/deploy.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Dependencies first (pyproject's base list plus the serve and train extras, pinned by the lock),
# so a code change does not reinstall torch; the dev tools (pytest, ruff, ...) stay out.
WORKDIR /opt/convserve
COPY pyproject.toml requirements.lock ./
RUN python3 -m venv /opt/venv \
    && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extra = p['optional-dependencies']; print(*p['dependencies'], *extra['serve'], *extra['train'], sep='\n')" \
       > /tmp/runtime.txt \
    && pip install --constraint requirements.lock --requirement /tmp/runtime.txt \
    && rm /tmp/runtime.txt

COPY README.md ./
COPY protos ./protos
COPY service ./service
COPY training ./training
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin convserve \
    && mkdir -p /data/store /data/datasets \
    && chown -R convserve /data

USER 10001
WORKDIR /data
VOLUME ["/data/store", "/data/datasets"]
ENV CONVSERVE_STORE=/data/store \
    CONVSERVE_DATASETS_ROOT=/data/datasets \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_PORT=50051 \
    CONVSERVE_HTTP_PORT=8000
# gRPC (convserve.v1 and the Open Inference Protocol); 8000: the Open Inference Protocol over
# HTTP, Triton's port; 9090: the Prometheus metrics endpoint.
EXPOSE 50051 8000 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["convserve", "health", "--timeout", "4"]
# SIGTERM: health turns NOT_SERVING, calls in flight finish within CONVSERVE_GRACE_PERIOD_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["convserve"]
CMD ["serve"]
