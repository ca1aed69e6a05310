# syntax=docker/dockerfile:1
# convrpc images, one per target:
#   server (the default): convrpc[server] on the numba backend, kernels compiled into the image's cache
#   gpu:                  convrpc[gpu] on the CuPy backend; needs the NVIDIA container toolkit at run time
#   notebook:             JupyterLab with the SDK (convrpc[notebook]) and examples/
#   docker build -t convrpc .            docker build --target gpu -t convrpc-gpu .
ARG PYTHON_IMAGE=python:3.11-slim

# -- builder: the wheel, and a virtual environment with convrpc[server] installed from it -----------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proto/ proto/
COPY core/ core/
COPY server/ server/
COPY client/ client/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install "$(ls /wheels/convrpc-*.whl)[server]"

# The CUDA runtime libraries come from PyPI with CuPy's ctk extra; the driver comes from the host.
FROM builder AS builder-gpu
RUN /opt/venv/bin/pip install "$(ls /wheels/convrpc-*.whl)[gpu]" "cupy-cuda12x[ctk]"

# -- runtime: what every server image shares --------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} convrpc \
 && useradd --system --uid ${UID} --gid convrpc --home-dir /home/convrpc --create-home --shell /usr/sbin/nologin convrpc \
 && mkdir -p /var/cache/convrpc/numba /var/cache/convrpc/cupy \
 && chown -R convrpc:convrpc /var/cache/convrpc
# The venv is root-owned and read-only to the server, so compiled kernels go to a cache the server owns.
# Inside a container the server listens on every interface; publish the port to choose who reaches it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/var/cache/convrpc/numba \
    CUPY_CACHE_DIR=/var/cache/convrpc/cupy \
    CONVRPC_HOST=0.0.0.0 \
    CONVRPC_PORT=50051
WORKDIR /home/convrpc
EXPOSE 50051
# The start period covers kernel compilation when the image's cache was built for another CPU.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD convrpc health --target "127.0.0.1:${CONVRPC_PORT}" --timeout 4
# Exec form, no shell in between: SIGTERM reaches the server, which drains for CONVRPC_GRACE seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["convrpc"]
CMD ["serve"]
USER convrpc

FROM runtime AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv
ENV CONVRPC_BACKEND=cupy

# -- notebook: the SDK, plots and progress bars, JupyterLab and the examples ------------------------
FROM ${PYTHON_IMAGE} AS notebook
ARG UID=10001
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=builder /wheels /wheels
RUN pip install "$(ls /wheels/convrpc-*.whl)[notebook]" jupyterlab ipykernel \
 && rm -rf /wheels \
 && groupadd --system --gid ${UID} convrpc \
 && useradd --system --uid ${UID} --gid convrpc --home-dir /home/convrpc --create-home convrpc
COPY --chown=convrpc:convrpc examples/ /home/convrpc/examples/
USER convrpc
WORKDIR /home/convrpc
EXPOSE 8888
# JUPYTER_TOKEN (from the environment) is the login token.
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--notebook-dir=/home/convrpc"]

# -- server: the default target, last so that a plain `docker build .` produces it ------------------
FROM runtime AS server
COPY --from=builder /opt/venv /opt/venv
ENV CONVRPC_BACKEND=numba
# Compile every numba kernel now, as the server's user, into NUMBA_CACHE_DIR: a container whose CPU
# matches the build machine's loads them instead of compiling (numba keys its cache by CPU model).
RUN python -c "from convrpc.core import numba_backend; numba_backend.warm_up()"
