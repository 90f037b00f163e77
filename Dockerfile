# CPU image serving a multi-task sentence transformer over HTTP (Swagger UI at /docs).
#
#   docker build -t mtl-serve .
#   docker run --rm -p 8000:8000 -v /path/to/model:/model -e MTL_API_KEY=change-me mtl-serve     # a local model folder
#   docker run --rm -p 8000:8000 -e MODEL=user/my-mtl-model -e MTL_API_KEY=change-me mtl-serve  # a Hub id
#
# It listens on every interface of the container, so `mtl serve` refuses to start without a key (MTL_API_KEY)
# unless told to serve without one: -e MTL_NO_API_KEY=1 (e.g. behind a proxy that authenticates).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/cache/huggingface \
    MODEL=/model \
    PORT=8000

# CPU-only torch first (from PyTorch's CPU index) so the project's requirement does not pull the CUDA wheels.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY setup.cfg pyproject.toml README.md *.py ./
COPY multitask_st ./multitask_st
RUN pip install ".[serve]"

# Run as an unprivileged user.
RUN useradd --create-home --uid 1000 mtl && mkdir -p /cache/huggingface && chown -R mtl /cache
USER mtl

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health')"
CMD ["sh", "-c", "exec mtl serve --model \"$MODEL\" --host 0.0.0.0 --port \"$PORT\""]
