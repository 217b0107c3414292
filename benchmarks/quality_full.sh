#!/usr/bin/env bash
# Protocol (a) of issue 16, docs/results/quality-full.json: the standard hold-out of SuperNI-CL, the last two tasks
# of order.txt (sentiment140, emotion: siblings of sst2) held out as unknown tasks, the first 8 in sequence.
# Everything else as protocol (b) (benchmarks/quality_family_holdout.sh, which this script runs with another hold-out).
set -euo pipefail
cd "$(dirname "$0")/.."
HOLDOUT=task1687_sentiment140_classification,task875_emotion_classification \
PROTOCOL="a: sentiment140 and emotion held out (sst2's siblings)" COMMAND=benchmarks/quality_full.sh \
    bash benchmarks/quality_family_holdout.sh "${1:-see-ray-output/quality-full}"
