# Serving images of the avatar server. One file, two targets, no PyTorch in either:
#
#   docker build --target cpu -t avatar-server:cpu .   # ONNX Runtime on the CPU (default)
#   docker build --target gpu -t avatar-server:gpu .   # onnxruntime-gpu + TensorRT; needs the
#                                                      # NVIDIA container runtime on the host
#
# Needs BuildKit (RUN --mount). Behind a TLS-inspecting proxy, hand pip the proxy's CA:
#   docker build --secret id=ca,src=/path/to/proxy-ca.pem ...
# The certificate is mounted only while pip runs and is never stored in a layer.
# docs/deployment.md explains the volumes, settings and the compose stack.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
# build: tools and sources shared by both virtual environments
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/docker/pip.sh ./deploy/

# ---------------------------------------------------------------------------------------
# wheel: the project itself (models, export, server), built once for both targets
FROM build AS wheel

COPY models ./models
COPY export ./export
COPY server ./server
RUN --mount=type=secret,id=ca,required=false \
    sh deploy/pip.sh wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
# venv-cpu: serving dependencies (ONNX Runtime on the CPU), then the project
FROM build AS venv-cpu

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# dependencies first: this layer is reused until pyproject.toml changes
RUN --mount=type=secret,id=ca,required=false \
    python deploy/requirements.py cpu >/tmp/requirements.txt \
    && sh deploy/pip.sh install -r /tmp/requirements.txt \
    && sh deploy/pip.sh install --no-deps "$(python deploy/requirements.py mediapipe)"
COPY --from=wheel /wheels /wheels
# the project, an import check, and no pip left in the serving venv (about 20 MB)
RUN pip install --no-deps /wheels/*.whl \
    && python -c "from mediapipe.python.solutions import face_mesh, selfie_segmentation" \
    && python -c "import onnxruntime, server.app" \
    && if python -c "import torch" 2>/dev/null; then echo "torch in the image" >&2; exit 1; fi \
    && python -m pip uninstall -q -y pip setuptools

# ---------------------------------------------------------------------------------------
# venv-gpu: onnxruntime-gpu with its CUDA/cuDNN wheels and TensorRT (several GB)
FROM build AS venv-gpu

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=secret,id=ca,required=false \
    python deploy/requirements.py gpu >/tmp/requirements.txt \
    && sh deploy/pip.sh install -r /tmp/requirements.txt \
    && sh deploy/pip.sh install --no-deps "$(python deploy/requirements.py mediapipe)"
COPY --from=wheel /wheels /wheels
# the project, an import check, and no pip left in the serving venv (about 20 MB)
RUN pip install --no-deps /wheels/*.whl \
    && python -c "from mediapipe.python.solutions import face_mesh, selfie_segmentation" \
    && python -c "import onnxruntime, tensorrt, server.app" \
    && if python -c "import torch" 2>/dev/null; then echo "torch in the image" >&2; exit 1; fi \
    && python -m pip uninstall -q -y pip setuptools

# ---------------------------------------------------------------------------------------
# runtime: what both serving images share
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    AVATAR_HOST=0.0.0.0 \
    AVATAR_PORT=8000 \
    AVATAR_DATA_DIR=/data \
    AVATAR_WEIGHTS_DIR=/weights

# unprivileged user; /data (avatar store) and /engines (TensorRT cache) are its volumes
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/avatar \
        --shell /usr/sbin/nologin avatar \
    && mkdir -p /data /engines /weights \
    && chown avatar:avatar /data /engines

# the demo weight bundle; mount another bundle over /weights to serve it
COPY weights/demo /weights
COPY deploy/docker/healthcheck.py /usr/local/lib/avatar/healthcheck.py

WORKDIR /home/avatar
EXPOSE 8000

# ---------------------------------------------------------------------------------------
# gpu: TensorRT engine built at first start for the GPU found, cached on /engines
FROM runtime AS gpu

COPY --from=venv-gpu /opt/venv /opt/venv
COPY deploy/docker/gpu-entrypoint.sh /usr/local/bin/avatar-gpu-entrypoint
ENV AVATAR_RUNTIME=tensorrt \
    AVATAR_PRECISION=fp16 \
    AVATAR_ENGINE_DIR=/engines \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER avatar
VOLUME ["/data", "/engines"]
# an engine build on first start takes minutes: a long start period
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "/usr/local/lib/avatar/healthcheck.py"]
ENTRYPOINT ["avatar-gpu-entrypoint"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------
# cpu: ONNX Runtime on the CPU; the last stage, so a plain `docker build .` makes it
FROM runtime AS cpu

COPY --from=venv-cpu /opt/venv /opt/venv
USER avatar
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/lib/avatar/healthcheck.py"]
ENTRYPOINT ["avatar"]
CMD ["serve"]
