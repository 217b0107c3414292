#!/usr/bin/env bash
# Reproduces docs/results/quality.json: SEE vs SeqFT / Replay / MTL / Oracle on the first 5 SuperNI-CL tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/superni-cl}"
OUT="${2:-see-ray-output/quality}"
see-ray -v bench quality --data "$DATA" --tasks 5 --train-per-task 64 --dev-per-task 10 --test-per-task 20 \
  --pool-per-task 12 --config benchmarks/quality.yaml --out "$OUT"
