#!/usr/bin/env bash
# Install AdapterHub's `adapters` into a virtual environment of its own: the golden oracle of the bottleneck
# adapter tests (tests/test_bottleneck_golden.py, tests/adapterhub_oracle.py; `make install-adapterhub` runs this).
# adapters 1.3.0 pins transformers~=4.57.6, which cannot live in the project's .venv; torch is pinned so pip
# takes the 2.13.0 CPU wheel on this machine's disk and never a CUDA build. It never touches .venv.
#
#   bash scripts/adapterhub_setup.sh          # creates .venv-adapterhub (~1 GB; about 2-3 minutes)
#   ADAPTERHUB_VENV=/elsewhere bash scripts/adapterhub_setup.sh   # then ADAPTERHUB_PYTHON=/elsewhere/bin/python
set -euo pipefail

VENV=${ADAPTERHUB_VENV:-.venv-adapterhub}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
printf '*\n' > "$VENV/.gitignore"

# bitsandbytes + accelerate: the library over an NF4 base (tests/test_bottleneck_nf4.py; CPU NF4 since bnb 0.46)
"$VENV/bin/python" -m pip install "torch==2.13.0" "adapters==1.3.0" "transformers==4.57.6" safetensors \
    "bitsandbytes==0.50.2" "accelerate==1.15.0"

# run outside the repository root: our own package is also named `adapters`
(cd / && "$VENV/bin/python" -I -c "import adapters, torch, transformers; print(f'adapters {adapters.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')")
echo "AdapterHub oracle ready: $VENV/bin/python"
