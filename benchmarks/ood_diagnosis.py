"""Why do out-of-distribution queries not reach the base model? Per expert p(ACCEPT) on the held-out tasks.

    python benchmarks/ood_diagnosis.py --adapters see-ray-output/quality-full/see-warm/adapters \
        --quality-json docs/results/quality-full.json

Reads the experts of a finished quality run (its ``adapters/`` folder) and the run's JSON (tasks, OOD tasks,
subsample, config and the calibrated thresholds), then, for both prompt modes, prints:

1. which expert takes each held-out task's test queries in the newest-first walk with the run's thresholds
   (the queries that "should" reach the base model, and who stops them);
2. each expert's median p(ACCEPT) on every held-out task and on its own task, i.e. whether the held-out queries look
   like one particular expert's task or like any task at all;
3. OOD rejection and false rejection of the in-sequence test queries for a range of global thresholds, i.e. whether
   any threshold separates the two (if none does, no calibration can reach both targets with these experts).

Decisions only (one prompt forward pass per query and expert): 20 minutes on one core for the 8-expert run (2026-11-26,
beside another 1-thread job).
Writes the figures to ``--out`` (JSON) as well.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from see_ray.config import SEEConfig
from see_ray.core.data import load_benchmark
from see_ray.core.expert import SEEModel
from see_ray.core.routing import ordered

REPO = Path(__file__).resolve().parents[1]
SWEEP = (0.5, 0.7, 0.9, 0.95, 0.99, 0.999)  # global thresholds tried in part 3


def load_run(quality_json: str, data_dir: str) -> tuple[dict, SEEConfig, dict]:
    """A finished quality run: its JSON, its configuration, and its tasks by name, subsampled as the run did."""
    run = json.loads(Path(quality_json).read_text())
    by_name = {t.name: t.subsample(**run["subsample"]) for t in load_benchmark(data_dir)}
    return run, SEEConfig.model_validate(run["config"]), by_name


def first_accept(ps: dict[str, list[float]], order: list[str], thr: dict[str, float], i: int) -> str:
    """The expert that answers query ``i`` in the walk over ``order`` (``base`` if all reject)."""
    return next((e for e in order if ps[e][i] >= thr[e]), "base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", required=True, help="the adapters/ folder of a quality run")
    ap.add_argument("--quality-json", default=str(REPO / "docs" / "results" / "quality-full.json"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "superni-cl"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "ood-diagnosis.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    run, cfg, by_name = load_run(args.quality_json, args.data)
    thresholds: dict[str, float] = run["methods"]["SEE"]["thresholds"]
    seq = [by_name[n] for n in run["tasks"]]
    ood = [by_name[n] for n in run["ood_tasks"]]
    experts = [f"see-{t.name}" for t in seq]  # registration order
    order = ordered(experts, cfg.routing.order)  # the router's own rule (newest first by default)
    model = SEEModel(cfg)
    for e in experts:
        model.load_adapter(e, Path(args.adapters) / e)

    report: dict = {"quality_json": args.quality_json, "adapters": args.adapters, "thresholds": thresholds, "modes": {}}
    for mode, with_def in (("definition", True), ("input_only", False)):
        groups = {t.name: [t.query(x, with_def) for x in t.test] for t in seq + ood}
        # p[task][expert] = p(ACCEPT) of that expert on each of the task's test queries
        p = {tn: {e: model.decide(qs, e) for e in experts} for tn, qs in groups.items()}
        m: dict = {"taken_by": {}, "median_p_accept": {}, "sweep": []}
        print(f"\n## {mode}\n\n### 1. who takes the held-out queries (run's thresholds, {cfg.routing.order})")
        for t in ood:
            n = len(t.test)
            taken = [first_accept(p[t.name], order, thresholds, i) for i in range(n)]
            m["taken_by"][t.name] = {e: taken.count(e) for e in dict.fromkeys(taken)}
            print(f"- {t.name} ({n} queries): {m['taken_by'][t.name]}")
        print("\n### 2. median p(ACCEPT), expert x task (own task on the diagonal)\n")
        print("| expert | own task | " + " | ".join(t.name for t in ood) + " |\n|---|---|" + "---|" * len(ood))
        for e, t in zip(experts, seq):
            row = {tn: statistics.median(p[tn][e]) for tn in [t.name] + [o.name for o in ood]}
            m["median_p_accept"][e] = row
            print(f"| {e} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
        print("\n### 3. one global threshold for every expert\n\n| threshold | OOD rejection | false rejection |\n|---|---|---|")
        for thr in SWEEP:
            flat = dict.fromkeys(experts, thr)
            ood_base = sum(first_accept(p[t.name], order, flat, i) == "base" for t in ood for i in range(len(t.test)))
            n_ood = sum(len(t.test) for t in ood)
            in_base = sum(first_accept(p[t.name], order, flat, i) == "base" for t in seq for i in range(len(t.test)))
            n_in = sum(len(t.test) for t in seq)
            row = {"threshold": thr, "ood_rejection": ood_base / n_ood, "false_rejection": in_base / n_in}
            m["sweep"].append(row)
            print(f"| {thr} | {row['ood_rejection']:.1%} | {row['false_rejection']:.1%} |", flush=True)
        report["modes"][mode] = m
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
