# syntax=docker/dockerfile:1
# Two images from one file, on NVIDIA's TensorRT container (TensorRT, CUDA and Python included):
#
#   docker build -t megatron-deploy .                          # the exporter (the default, last stage)
#   docker run --gpus all -v $PWD/artifacts:/artifacts megatron-deploy build --head qa --precision fp16 --out /artifacts
#
#   docker build --target runtime -t megatron-runtime .        # serving apps: the runtime only, no torch
#
# TENSORRT_TAG picks the TensorRT release (25.01-py3 carries TensorRT 10.8); engines run only on the
# TensorRT version and GPU they were built with, so build and serve with the same tag.
ARG TENSORRT_TAG=25.01-py3

FROM nvcr.io/nvidia/tensorrt:${TENSORRT_TAG} AS base
# The image's Python is the system one: let pip install into it.
ENV PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --create-home --uid 1000 app
WORKDIR /opt/megatron-deploy
COPY pyproject.toml README.md ./
COPY runtime runtime
COPY exporter exporter
COPY recipes recipes

# The runtime alone (numpy, tokenizers, onnxruntime-gpu, TensorRT through polygraphy): what serving imports.
FROM base AS runtime
RUN python3 -m pip install ".[gpu]" && rm -rf exporter recipes
USER app
WORKDIR /home/app
CMD ["python3", "-c", "import runtime; print('runtime ready')"]

# The exporter: torch, onnx, polygraphy, TensorRT; recipes and demo checkpoints ship in the package.
FROM base AS exporter
RUN python3 -m pip install ".[export,gpu]" && rm -rf exporter recipes runtime
USER app
WORKDIR /artifacts
ENTRYPOINT ["python3", "-m", "exporter"]
CMD ["--help"]
