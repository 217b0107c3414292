#!/usr/bin/env bash
# Protocol (b) of issue 16, docs/results/quality-family-holdout.json: both QA tasks of SuperNI-CL (commonsenseqa,
# sciq) held out as unknown task types; the other 8 tasks in order.txt's order form the sequence. General pool: the
# add-expert job's default pool plus ../shared/data/superni-pool (11 SuperNI tasks of other types, 16 queries each)
# as task-shaped negatives; the held-out QA tasks are the only unknown-task probes, so no probe is ever a negative.
# SEE+Oracle and the baselines run as two one-thread processes on the two cores and share one cache (decisions,
# answers, adapters: see_ray/tools/eval_cache.py); benchmarks/merge_quality.py merges their JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/superni-cl}"
POOL="${POOL:-../shared/data/superni-pool}"
OUT="${1:-see-ray-output/quality-family-holdout}"
HOLDOUT="${HOLDOUT:-task073_commonsenseqa_answer_generation,task591_sciq_answer_generation}"
PROTOCOL="${PROTOCOL:-b: both QA tasks held out as unknown task types}"
mkdir -p "$OUT"
ARGS=(--data "$DATA" --tasks 8 --holdout "$HOLDOUT" --protocol-name "$PROTOCOL"
      --general-pool-tasks default --pool-dir "$POOL" --pool-per-task 16
      --train-per-task 64 --dev-per-task 10 --test-per-task 16 --config benchmarks/quality.yaml)
see-ray -v bench quality "${ARGS[@]}" --methods SEE,Oracle --out "$OUT/see" > "$OUT-see.log" 2>&1 &
see-ray -v bench quality "${ARGS[@]}" --methods SeqFT,Replay,MTL --out "$OUT/baselines" > "$OUT-baselines.log" 2>&1 &
wait
python benchmarks/merge_quality.py "$OUT/see/quality.json" "$OUT/baselines/quality.json" --out "$OUT" \
    --command "bash ${COMMAND:-benchmarks/quality_family_holdout.sh}"
