#!/usr/bin/env bash
# GPU check: on a CUDA machine, install the CUDA build of the pinned torch and the project into a venv of
# its own, run the tests marked `cuda` (tests/test_cuda.py: NF4 vs transformers + bitsandbytes, adapters vs
# PEFT, the Triton kernels compiled), then the engine benchmark (loadtest/bench_gpu.py: a 0.50B NF4 Llama at
# batch 64, base vs 64 distinct LoRAs), which prints one table. Budget: under 10 minutes once wheels are local.
#
#   scripts/gpu_check.sh                      # needs pip access to download.pytorch.org (cu128) and PyPI
#   WHEELS_DIR=/path/to/wheels scripts/gpu_check.sh    # offline: install only from that directory
#   scripts/gpu_check.sh --download DIR       # on a machine with internet and the GPU box's Python/OS:
#                                             # fill DIR with every wheel the check needs, then copy it over
#
# Environment: VENV (default ~/.cache/adapter-server/venv-gpu), PYTHON (default python3), TORCH_INDEX
# (default the cu128 index), BENCH_ARGS (extra arguments for loadtest.bench_gpu), SKIP_BENCH=1. Without a CUDA GPU it says so and
# exits 0; so does each check (the tests skip, the benchmark prints a message).
set -euo pipefail

here=$PWD
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$here/$1" ;; esac; }
if [[ -n "${WHEELS_DIR:-}" ]]; then WHEELS_DIR=$(absolute "$WHEELS_DIR"); fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=$(absolute "${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/adapter-server/venv-gpu}")
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
TORCH_SPEC="torch==2.13.0"
started=$(date +%s)
say() { echo "[gpu_check $(($(date +%s) - started))s] $*"; }

if [[ "${1:-}" == "--download" ]]; then
    dest=$(absolute "${2:?usage: scripts/gpu_check.sh --download DIR}")
    mkdir -p "$dest"
    "$PYTHON" -m pip download -d "$dest" "$TORCH_SPEC" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple
    # --find-links: the CUDA torch just downloaded satisfies the project's torch==2.13.0 (no second torch)
    "$PYTHON" -m pip download -d "$dest" --find-links "$dest" setuptools wheel pip ".[test,triton]"
    say "wheels for the GPU check are in $dest ($(du -sh "$dest" | cut -f1)); run: WHEELS_DIR=$dest $0"
    exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/[gpu_check] GPU: /'
elif ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    say "no CUDA GPU here (no nvidia-smi GPU, no /dev/nvidia*): nothing to check, skipped"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() {
    if [[ -n "${WHEELS_DIR:-}" ]]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS_DIR" "$@"
    else
        "$PY" -m pip install -q "$@"
    fi
}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") and torch.version.cuda else 1)' \
        2>/dev/null; then
    say "installing the CUDA build of $TORCH_SPEC"
    if [[ -n "${WHEELS_DIR:-}" ]]; then
        pip_install "$TORCH_SPEC"
    else
        pip_install "$TORCH_SPEC" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple
    fi
fi
say "installing the project"
if [[ -n "${WHEELS_DIR:-}" ]]; then
    pip_install setuptools wheel
    pip_install --no-build-isolation -e ".[test,triton]"
else
    pip_install -e ".[test,triton]"
fi
"$PY" - <<'PY'
import torch
print(f"[gpu_check] torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"[gpu_check] triton {triton.__version__}")
except ImportError:
    print("[gpu_check] triton is not installed: LoRA/IA3 run the plain-torch path")
PY
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
    say "the torch installed in $VENV is not a CUDA build: is $TORCH_INDEX reachable? (or use WHEELS_DIR)"
    exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "torch sees no CUDA device (driver too old for CUDA 12.8?): skipped"
    exit 0
fi

say "tests marked cuda"
status=0
# -rsP: say why anything skipped, and show what passing tests printed (the kernel timing)
timeout 270 "$PY" -m pytest -q -m cuda --timeout 200 -p no:cacheprovider -rsP tests/test_cuda.py || status=$?

if [[ -z "${SKIP_BENCH:-}" ]]; then
    say "benchmark"
    # shellcheck disable=SC2086
    timeout 240 "$PY" -m loadtest.bench_gpu ${BENCH_ARGS:-} || status=$?
fi
say "done, exit status $status"
exit "$status"
