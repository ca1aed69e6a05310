# The convrpc server image: convrpc[server] on the numba backend, kernels compiled into the image's cache.
#   docker build -t convrpc .                                   (BuildKit or the legacy builder)
# The GPU and notebook images have Dockerfiles of their own (Dockerfile.gpu, Dockerfile.notebook), so a plain
# build, whichever builder runs it, builds these two stages and nothing else. There is no `# syntax=` line:
# BuildKit's built-in frontend reads this file, and a named one would be fetched from a registry.
ARG PYTHON_IMAGE=python:3.11-slim

# -- builder: a virtual environment with convrpc[server]; its dependencies in a layer of their own ----------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
# The dependencies are read from pyproject.toml, so editing the sources does not reinstall them.
# grpcio-tools compiles the .proto at start-up, so that reflection serves its comments.
RUN python -m venv /opt/venv \
 && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["server"]))' >requirements.txt \
 && /opt/venv/bin/pip install -r requirements.txt grpcio-tools
COPY README.md LICENSE ./
COPY proto/ proto/
COPY core/ core/
COPY server/ server/
COPY client/ client/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/convrpc-*.whl

# -- server: the runtime image ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS server
ARG UID=10001
# tini is PID 1: it forwards SIGTERM to the server from the first instant (a PID 1 without a handler ignores
# it) and reaps zombies. The venv is root-owned and read-only to the server; kernels go to a cache it owns.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid ${UID} convrpc \
 && useradd --system --uid ${UID} --gid convrpc --home-dir /home/convrpc --create-home --shell /usr/sbin/nologin convrpc \
 && mkdir -p /var/cache/convrpc/numba /var/cache/convrpc/cupy \
 && chown -R convrpc:convrpc /var/cache/convrpc
COPY --from=builder /opt/venv /opt/venv
# Inside a container the server listens on every interface; publish the ports to choose who reaches them.
# CONVRPC_HEALTH_PORT serves grpc.health.v1 alone, in plaintext, so probes pass whatever TLS the gRPC port
# requires (see README.md, "Health checks under TLS").
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/var/cache/convrpc/numba \
    CUPY_CACHE_DIR=/var/cache/convrpc/cupy \
    CONVRPC_HOST=0.0.0.0 \
    CONVRPC_PORT=50051 \
    CONVRPC_HEALTH_PORT=50052 \
    CONVRPC_BACKEND=numba
WORKDIR /home/convrpc
EXPOSE 50051 50052
USER ${UID}:${UID}
# Compile every numba kernel now, as the server's user, into NUMBA_CACHE_DIR: a container whose CPU
# matches the build machine's loads them instead of compiling (numba keys its cache by CPU model).
RUN python -c "from convrpc.core import numba_backend; numba_backend.warm_up()"
# `convrpc health` dials 127.0.0.1:$CONVRPC_HEALTH_PORT. The start period covers kernel compilation when
# the image's cache was built for another CPU.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["convrpc", "health", "--timeout", "4"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "convrpc"]
CMD ["serve"]
