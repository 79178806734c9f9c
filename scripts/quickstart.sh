#!/usr/bin/env bash
# Set up, build the tiny offline assets, and run the quickstart PoFT job on CPU
# (2 ZeRO-3 trainer ranks + 2 reference ranks). Output: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd examples/quickstart
../../.venv/bin/python build_assets.py
rm -rf ../../runs/quickstart
OMP_NUM_THREADS=1 ../../.venv/bin/poft-ds launch job.yaml
echo
echo "metrics:     runs/quickstart/metrics.jsonl"
echo "checkpoints: runs/quickstart/checkpoints/ (DeepSpeed, 'latest' names the newest)"
echo "model:       runs/quickstart/final_model/ (AutoModelForCausalLM.from_pretrained loads it)"
