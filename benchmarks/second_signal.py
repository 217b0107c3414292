"""Issue 16, item 6: would a second signal beside p(ACCEPT) reject more unknown-task queries at the same false
rejection?

The signal tried: how close a query is to the expert's own training queries, in the frozen base model's
representation (mean of the last hidden layer over the prompt's tokens, cosine similarity, the highest over the
expert's training prompts in the forms it was trained on). It keeps SEE's property: each expert decides alone, from
what its own record would carry (its training queries' embeddings), and nothing is retrained. An expert accepts
when p(ACCEPT) reaches its threshold AND the similarity reaches its similarity threshold, which is calibrated like
the first, on held-out data: the largest value that keeps false rejection of the expert's own dev queries within
``routing.calibration_max_false_rejection``.

Usage: the arguments of the ``see-ray bench quality`` run to analyse (same data, pool, config and cache), e.g.::

    python benchmarks/second_signal.py --out docs/results/second-signal-family-holdout.json -- \\
        --data ../shared/data/superni-cl --tasks 8 --holdout ... --config benchmarks/quality.yaml ...

The run's adapters and p(ACCEPT) values come from the benchmark's cache (SEE's experts are not retrained when the
cache holds them); only the base model's embeddings are computed here. The test split is used for the figures, as
in the run's own report; the dev split only for calibration.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from see_ray.config.constants import BASE
from see_ray.core import metrics
from see_ray.core.prompts import Query
from see_ray.core.routing import accepts, calibration_queries, ordered, prompt_forms, threshold_of


@torch.inference_mode()
def embed(model, queries: list[Query], batch: int = 16) -> torch.Tensor:
    """Unit-norm mean of the base model's last hidden layer over each prompt's tokens (adapters off)."""
    out = []
    with model._use(None) as m:  # the frozen base: the signal must not depend on any expert's adapter
        for i in range(0, len(queries), batch):
            seqs = [model.encoder.encode_query(q) for q in queries[i : i + batch]]
            ids, mask = model._left_pad(seqs)
            h = m(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                  output_hidden_states=True).hidden_states[-1]
            w = mask.to(h.device).unsqueeze(-1).to(h.dtype)
            v = (h * w).sum(1) / w.sum(1)
            out.append(torch.nn.functional.normalize(v.float(), dim=-1).cpu())
    return torch.cat(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then the see-ray bench quality arguments")
    a = ap.parse_args()
    from see_ray.tools.cli import build_parser, prepare_quality_bench

    bench_argv = a.bench_args[1:] if a.bench_args[:1] == ["--"] else a.bench_args
    args = build_parser().parse_args(["bench", "quality", *bench_argv, "--methods", "SEE"])
    t0 = time.perf_counter()
    bench, facts, _ = prepare_quality_bench(args)
    bench.run_see()  # from the cache: the run's experts, thresholds and decisions
    cfg, model, backend = bench.cfg, bench.model, bench.backend
    share, bound = cfg.rehearsal.input_only_share, cfg.routing.calibration_max_false_rejection
    seq = ordered(bench.experts, cfg.routing.order)
    tasks = {t.name: t for t in bench.tasks}

    # each expert's record would keep its training queries' embeddings; its dev queries calibrate the threshold
    own = {e.name: embed(model, prompt_forms([tasks[e.task].query(x) for x in tasks[e.task].train], share))
           for e in bench.experts}

    def similarity(e, emb: torch.Tensor) -> torch.Tensor:
        return (emb @ own[e.name].T).max(dim=1).values

    sim_threshold = {}
    for e in bench.experts:
        s = sorted(similarity(e, embed(model, calibration_queries(tasks[e.task], share))).tolist())
        sim_threshold[e.name] = s[math.floor(bound * len(s))]

    def route(queries: list[Query], use_similarity: bool) -> list[str]:
        emb = embed(model, queries)
        sims = {e.name: similarity(e, emb) for e in seq}
        p = {e.name: backend.decide(queries, e.name) for e in seq}
        out = []
        for i in range(len(queries)):
            who = BASE
            for e in seq:
                ok = accepts(p[e.name][i], threshold_of(e.threshold, cfg.routing))
                if use_similarity:
                    ok = ok and float(sims[e.name][i]) >= sim_threshold[e.name]
                if ok:
                    who = e.name
                    break
            out.append(who)
        return out

    result = {"command": "python benchmarks/second_signal.py " + " ".join(sys.argv[1:]), **facts,
              "similarity_thresholds": sim_threshold, "variants": {}}
    for variant, use in (("p_accept", False), ("p_accept_and_similarity", True)):
        fig = {}
        for mode, with_def in (("definition", True), ("input_only", False)):
            truth, routed = [], []
            for e in bench.experts:
                t = tasks[e.task]
                r = route([t.query(x, with_def) for x in t.test], use)
                truth += [e.name] * len(r)
                routed += r
            ood = [x for t in bench.ood for x in route([t.query(x, with_def) for x in t.test], use)]
            fig[mode] = {"routing_accuracy": metrics.routing_accuracy(truth, routed),
                         "false_rejection": metrics.false_rejection_rate(routed),
                         "ood_rejection": metrics.ood_rejection_rate(ood)}
        result["variants"][variant] = fig
        print(variant, json.dumps(fig), flush=True)
    result["wall_s"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
