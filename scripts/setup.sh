#!/usr/bin/env bash
# Set up everything poft-ds needs on a fresh Debian/Ubuntu machine, idempotently:
# OpenMPI (mpi4py, mpirun launches), Slurm and munge (the launcher tests start a one-node cluster), g++
# (DeepSpeed's CPU Adam op, built at the end), and a Python virtual environment in .venv with the
# exact versions in constraints.txt (CPU torch). Re-running it is fast.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
for pkg in openmpi-bin libopenmpi-dev slurm-wlm munge g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import poft_ds, deepspeed, pytest" >/dev/null 2>&1 \
   || [ constraints.txt -nt .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] installing Python packages (first time: a few minutes)"
  .venv/bin/pip install -q --upgrade pip
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -c constraints.txt -e ".[dev]"
  touch .venv/.installed
fi
# DeepSpeed compiles its CPU Adam (the optimizer of the offload configs) on first use, for each
# environment: a few minutes on 2 cores that the first offload job would otherwise spend stalled.
# Built here once (cached under ~/.cache/torch_extensions; a second run only checks it).
if ! out=$(DS_ACCELERATOR=cpu .venv/bin/python -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('CPUAdamBuilder').load(verbose=False)
" 2>&1); then
  echo "$out" | tail -30
  echo "[setup] DeepSpeed could not build its CPU Adam op (the offload configs need it): is a C++ compiler installed?"
  exit 1
fi
echo "[setup] ready: $(DS_ACCELERATOR=cpu .venv/bin/python -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")')"
