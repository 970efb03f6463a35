# One image for the code location and for every step (docker_executor, k8s_job_executor, GPU or CPU).
#
#   docker build -t synfer:latest .
#   docker run --gpus all -e SYNFER_PROFILE=paper -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY synfer:latest
#
# The base is CUDA-enabled PyTorch: python 3.11 (the version constraints.txt was frozen on) with the CUDA build of
# torch 2.13.0 from PyTorch's wheel index, whose nvidia-* wheels carry the CUDA runtime and cuDNN (the host needs
# only the driver and the NVIDIA container toolkit). Secrets come from the environment at run time, never the image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS torch-cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

FROM torch-cuda
# libgl1 / libglib2.0-0: OpenCV's runtime libraries (face detection in ingest)
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1=1.6.* libglib2.0-0=2.74.* \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 synfer
WORKDIR /opt/synfer
COPY pyproject.toml constraints.txt README.md ./
COPY synfer_pipeline ./synfer_pipeline
COPY assets ./assets
COPY resources ./resources
COPY profiles ./profiles
COPY workspace.yaml dagster.yaml ./
# the package with every dependency pinned to the tested versions (torch stays the CUDA build installed above)
RUN pip install --no-cache-dir -c constraints.txt . \
    && mkdir -p /var/lib/synfer/dagster_home \
    && cp dagster.yaml /var/lib/synfer/dagster_home/dagster.yaml \
    && chown -R synfer:synfer /var/lib/synfer
ENV DAGSTER_HOME=/var/lib/synfer/dagster_home SYNFER_HOME=/var/lib/synfer SYNFER_PROGRESS=0
USER 1000:1000
EXPOSE 4000
# the code location: Dagster's webserver and daemon load it over gRPC (0.0.0.0 inside the container's own network
# namespace: the port is reachable only where it is published); run and step workers use this image too
CMD ["dagster", "code-server", "start", "--host", "0.0.0.0", "--port", "4000", "--module-name", "assets.definitions", "--attribute", "defs"]
