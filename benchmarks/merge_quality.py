"""Merge the quality.json files of runs that split the methods between processes (benchmarks/quality_full.sh).

The runs must share tasks, OOD tasks, pool, subsample and configuration: the merge refuses otherwise, so a
published table never mixes methods measured under different settings.
"""
import argparse
import json
from pathlib import Path

from see_ray.bench import write_report

SAME = ("tasks", "general_pool_tasks", "ood_tasks", "subsample", "config")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("inputs", nargs="+", help="quality.json files, methods taken in this order")
    ap.add_argument("--out", required=True, help="folder for the merged quality.json, quality.md and plots/")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.inputs]
    first = runs[0]
    for p, r in zip(args.inputs[1:], runs[1:]):
        for k in SAME:
            if r[k] != first[k]:
                raise SystemExit(f"{p}: {k!r} differs from {args.inputs[0]}; these runs cannot be merged")
    merged = {k: v for k, v in first.items() if k not in ("methods", "timings_s", "command", "complete")}
    merged["command"] = "bash benchmarks/quality_full.sh"
    merged["executed_as"] = [r["command"] for r in runs]
    merged["complete"] = all(r.get("complete") for r in runs)
    merged["methods"] = {m: v for r in runs for m, v in r["methods"].items()}
    merged["timings_s"] = {f"process{i + 1}": r["timings_s"] for i, r in enumerate(runs)}
    write_report(merged, Path(args.out))
    print((Path(args.out) / "quality.md").read_text())


if __name__ == "__main__":
    main()
