#!/usr/bin/env bash
# Reproduces docs/results/quality-full.json: all 10 SuperNI-CL tasks, 8 in sequence (the standard order) and the
# last 2 held out as out-of-distribution tasks. With every task in use, the general pool is see-ray's built-in
# generic requests (`--general-pool-tasks builtin`), so no OOD task is ever seen as a negative.
# SEE+Oracle and the baselines run as two processes (one thread each) to use both cores; the JSON is merged by
# benchmarks/merge_quality.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/superni-cl}"
OUT="${2:-see-ray-output/quality-full}"
mkdir -p "$OUT"
ARGS=(--data "$DATA" --tasks 8 --ood-tasks task1687_sentiment140_classification,task875_emotion_classification
      --general-pool-tasks builtin --pool-per-task 12 --train-per-task 64 --dev-per-task 10 --test-per-task 16
      --config benchmarks/quality.yaml)
# SEE's experts start from the previous expert's adapter (training.warm_start; docs/results.md: AP 19.4 -> 30.3,
# routing 72.7% -> 99.2% against training each expert from scratch with the same steps)
see-ray -v bench quality "${ARGS[@]}" --set training.warm_start=true --methods SEE,Oracle --out "$OUT/see" \
    > "$OUT-see.log" 2>&1 &
see-ray -v bench quality "${ARGS[@]}" --methods SeqFT,Replay,MTL --out "$OUT/baselines" > "$OUT-baselines.log" 2>&1 &
wait
python benchmarks/merge_quality.py "$OUT/see/quality.json" "$OUT/baselines/quality.json" --out "$OUT"
