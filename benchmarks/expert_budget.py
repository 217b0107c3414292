"""What limits an SEE expert's answers at the published step budget? Retrain one expert under variants and score it.

    python benchmarks/expert_budget.py --adapters see-ray-output/quality-full/see-warm/adapters \
        --tasks task181_outcome_extraction,task1290_xsum_summarization

For each named task of a finished 10-task quality run (its JSON gives the sequence, subsample and config; its
``adapters/`` folder the experts), the task's expert is trained again, in this process, exactly as the run did
(``reconstruct`` with the rehearsal buffer of the earlier tasks and the run's general pool, warm-started from the
previous expert when the run was), and under variants that change one thing:

- ``published``: the run's recipe (the control: close to the run's own Oracle score, up to training noise);
- ``positives_only``: the same steps on the task's own examples only (no negatives): what the negatives cost the
  answers at this budget, since a negative's target is one REJECT token and teaches no answer;
- ``double_steps``: the run's set, twice the steps: what the step budget costs.

Each variant's expert answers the task's dev and test queries after ACCEPT (the Oracle's way: task known) and is
scored with ROUGE-L. Prints a table and writes ``--out`` (JSON). About 2-4 minutes per variant on one core.
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch
from ood_diagnosis import load_run  # benchmarks/ is on sys.path when this script runs

from see_ray.core import metrics
from see_ray.tools.builtin import builtin_pool
from see_ray.core.expert import SEEModel
from see_ray.core.rehearsal import RehearsalBuffer, reconstruct
from see_ray.core.trainer import train_adapter

REPO = Path(__file__).resolve().parents[1]


def run_pool(run: dict, pool_per_task: int) -> list:
    """The general pool of the run (built-in pools only: the published 10-task runs use them). The report lists a
    built-in pool as its --general-pool-tasks value followed by a description."""
    kind = run["general_pool_tasks"][0].split()[0]
    try:
        return builtin_pool(kind, pool_per_task)
    except ValueError:
        raise SystemExit(f"this script rebuilds built-in pools only, not {run['general_pool_tasks']}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", required=True, help="the adapters/ folder of the quality run")
    ap.add_argument("--quality-json", default=str(REPO / "docs" / "results" / "quality-full.json"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "superni-cl"))
    ap.add_argument("--tasks", required=True, help="comma-separated tasks of the run's sequence")
    ap.add_argument("--pool-per-task", type=int, default=12, help="the run's --pool-per-task")
    ap.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                    help="start from the previous expert's adapter, as the published (warm-start) run did")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "expert-budget.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    run, cfg, by_name = load_run(args.quality_json, args.data)
    seq = [by_name[n] for n in run["tasks"]]
    pool = run_pool(run, args.pool_per_task)
    model = SEEModel(cfg)
    work = Path(tempfile.mkdtemp(prefix="see-budget-"))
    steps = cfg.training.steps
    report: dict = {"quality_json": args.quality_json, "adapters": args.adapters, "steps": steps,
                    "batch_size": cfg.training.batch_size, "tasks": {}}
    print("| task | variant | examples (positives) | positives seen | dev ROUGE-L | test ROUGE-L | run's Oracle |\n"
          "|---|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        if name not in run["tasks"]:
            raise SystemExit(f"--tasks: {name!r} is not in the run's sequence {run['tasks']}")
        j = run["tasks"].index(name)
        task = seq[j]
        buffer = RehearsalBuffer.empty()
        for t in seq[:j]:
            buffer.add_task(t, cfg.rehearsal)
        full = reconstruct(task, buffer, pool, cfg.rehearsal)
        init = str(Path(args.adapters) / f"see-{seq[j - 1].name}") if args.warm_start and j > 0 else None
        oracle = run["methods"].get("Oracle", {}).get("matrix", [[None] * len(seq)])[-1][j]
        variants = {
            "published": (full, steps),
            "positives_only": ([e for e in full if e.indicator == "accept"], steps),
            "double_steps": (full, 2 * steps),
        }
        rows = {}
        for variant, (examples, n_steps) in variants.items():
            vcfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": n_steps})})
            path = work / f"{task.name}-{variant}"
            train_adapter(examples, vcfg, model.model_path, path, init_adapter=init, meta={"name": variant})
            model.load_adapter(variant + task.name, path)
            n_pos = sum(e.indicator == "accept" for e in examples)
            seen = round(n_steps * cfg.training.batch_size * n_pos / len(examples))
            scores = {}
            for split, insts in (("dev", task.dev), ("test", task.test)):
                answers = model.generate([task.query(x) for x in insts], variant + task.name,
                                         cfg.routing.max_new_tokens, after_accept=True)
                scores[split] = metrics.mean_rouge_l(answers, [x.outputs for x in insts])
            rows[variant] = {"examples": len(examples), "positives": n_pos, "steps": n_steps,
                             "positives_seen": seen, **scores}
            print(f"| {task.name} | {variant} | {len(examples)} ({n_pos}) | {seen} | {scores['dev']:.1f} | "
                  f"{scores['test']:.1f} | {oracle if oracle is None else round(oracle, 1)} |", flush=True)
        report["tasks"][task.name] = {"run_oracle_test": oracle, "variants": rows}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")  # after every task: a long run keeps its part
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
