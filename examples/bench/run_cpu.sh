#!/usr/bin/env bash
# Build the tiny assets and benchmark SFT vs PoFT on CPU (about 3-5 minutes on 2 cores).
# Output: runs/bench-cpu/bench/ (bench.json, each run's spec, log and run directory).
set -euo pipefail
cd "$(dirname "$0")"
[ -f ../../runs/bench-assets/cpu/data/train.jsonl ] || ../../.venv/bin/python build_assets.py cpu
OMP_NUM_THREADS=1 ../../.venv/bin/poft-ds bench cpu.yaml "$@"
