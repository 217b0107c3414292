"""Merge the quality.json files of runs that split the methods between processes (benchmarks/quality_full.sh,
benchmarks/quality_family_holdout.sh).

The runs must share tasks, OOD tasks, pool, subsample and configuration: the merge refuses otherwise, so a
published table never mixes methods measured under different settings.
"""
import argparse
import json
from pathlib import Path

from see_ray.tools.bench import METHODS, write_report

SAME = ("tasks", "general_pool_tasks", "ood_tasks", "subsample", "config")
# Config fields that act only on SEE's experts (answers after ACCEPT; how a new expert is initialised; which
# negatives it is trained on): a run of the baselines alone may differ from the SEE run in them (or predate them),
# and is still comparable. The baselines never use negatives, so the general pool is SEE-only too.
BASELINES = {"SeqFT", "Replay", "MTL"}
SEE_ONLY = (("indicators", "keep_out_of_answers"), ("training", "warm_start"), ("rehearsal", "negatives_per_task"),
            ("rehearsal", "general_pool_size"))
SEE_ONLY_KEYS = ("general_pool_tasks",)


# Fields added to the configuration after some published runs were made, with the value that gives the behaviour
# those runs had: a run that predates a field is compared as if it had set that value.
ADDED_LATER = {("model", "device"): "auto", ("indicators", "keep_out_of_answers"): False,
               ("training", "warm_start"): False}


def with_added_fields(config: dict) -> dict:
    c = json.loads(json.dumps(config))
    for (section, field), old_behaviour in ADDED_LATER.items():
        c.setdefault(section, {}).setdefault(field, old_behaviour)
    return c


def without_see_only(config: dict) -> dict:
    c = json.loads(json.dumps(config))
    for section, field in SEE_ONLY:
        c.get(section, {}).pop(field, None)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("inputs", nargs="+", help="quality.json files, methods taken in this order")
    ap.add_argument("--out", required=True, help="folder for the merged quality.json, quality.md and plots/")
    ap.add_argument("--command", default="bash benchmarks/quality_full.sh", help="the command recorded as the run's")
    ap.add_argument("--note", action="append", default=[], help="a note stored in the merged JSON (repeatable)")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.inputs]
    first = runs[0]
    for p, r in zip(args.inputs[1:], runs[1:]):
        baselines_only = set(r["methods"]) <= BASELINES or set(first["methods"]) <= BASELINES
        for k in SAME:
            a, b = r[k], first[k]
            if k in SEE_ONLY_KEYS and baselines_only:
                continue
            if k == "config":
                a, b = with_added_fields(a), with_added_fields(b)
                if baselines_only:
                    a, b = without_see_only(a), without_see_only(b)
            if a != b:
                raise SystemExit(f"{p}: {k!r} differs from {args.inputs[0]}; these runs cannot be merged")
    merged = {k: v for k, v in first.items() if k not in ("methods", "timings_s", "command", "complete")}
    merged["command"] = args.command
    merged["executed_as"] = [r["command"] for r in runs]
    merged["methods"] = {m: v for r in runs for m, v in r["methods"].items()}
    # a run reports a method only once it has finished it (partial reports of a stopped run hold the methods it
    # completed), so the table is complete when every method is there
    merged["complete"] = set(METHODS) <= set(merged["methods"])
    merged["timings_s"] = {f"process{i + 1}": r["timings_s"] for i, r in enumerate(runs)}
    if args.note:
        merged["notes"] = args.note
    write_report(merged, Path(args.out))
    print((Path(args.out) / "quality.md").read_text())


if __name__ == "__main__":
    main()
