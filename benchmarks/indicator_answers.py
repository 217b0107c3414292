"""Each expert of a quality run answers its own task's dev queries after ACCEPT, with the indicator tokens allowed
in the answer and kept out of it (``indicators.keep_out_of_answers``): ROUGE-L per task, side by side.

    python benchmarks/indicator_answers.py --adapters see-ray-output/quality-full/see/adapters

The adapters are the ``see-<task>`` folders written by ``see-ray bench quality``; tasks, subsample and config must
be those of that run (defaults: the published 10-task run, benchmarks/quality_full.sh). Dev split only, so that the
decision to keep the indicators out was not taken on the test set (docs/results.md).
"""
import argparse
from pathlib import Path

import torch

from see_ray.core import metrics
from see_ray.config import SEEConfig
from see_ray.core.data import load_benchmark
from see_ray.core.expert import SEEModel

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", required=True, help="the adapters/ folder of a quality run")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "superni-cl"))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "quality.yaml"))
    ap.add_argument("--train-per-task", type=int, default=64)
    ap.add_argument("--dev-per-task", type=int, default=10)
    ap.add_argument("--test-per-task", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = SEEConfig.from_yaml(args.config)
    tasks = [t.subsample(train=args.train_per_task, dev=args.dev_per_task, test=args.test_per_task)
             for t in load_benchmark(args.data)[: args.tasks]]
    model = SEEModel(cfg)
    print("| task | indicators allowed | kept out | first answer (kept out) |\n|---|---|---|---|")
    for t in tasks:
        name = f"see-{t.name}"
        model.load_adapter(name, Path(args.adapters) / name)
        queries, refs = [t.query(x, True) for x in t.dev], [x.outputs for x in t.dev]
        row = []
        for keep_out in (False, True):
            model.cfg.indicators.keep_out_of_answers = keep_out
            answers = model.generate(queries, name, cfg.routing.max_new_tokens, after_accept=True)
            row.append((metrics.mean_rouge_l(answers, refs), answers[0]))
        print(f"| {t.name} | {row[0][0]:.1f} | {row[1][0]:.1f} | {row[1][1][:50]!r} |", flush=True)


if __name__ == "__main__":
    main()
