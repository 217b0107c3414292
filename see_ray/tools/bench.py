"""``see-ray bench quality``: SEE against the continual-learning baselines on one task sequence.

Methods, all on the same base model, the same data and the same number of optimizer steps per task:
- SEE: one expert per task on the reconstructed set (positives + rehearsal and general negatives), routed
  sequentially with calibrated thresholds;
- SeqFT: one LoRA trained task after task on plain targets (no indicator);
- Replay: SeqFT with the same rehearsal samples SEE keeps, mixed in with their answers;
- MTL: one LoRA on all tasks at once (T x steps), the usual upper bound; evaluated once at the end;
- Oracle: each task answered by its own SEE expert (task id given): the ceiling for SEE's routing.
R[s][j] is ROUGE-L (points) on task j's test set after stage s, evaluated for j <= s.

SEE's stages are evaluated with the real Router over a memoizing backend: adapters never change after
training, so an expert's decision and answer for a query are computed once and reused in later stages;
the walk itself is the production code path.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from see_ray.core import metrics
from see_ray.config import SEEConfig
from see_ray.core.data import Task
from see_ray.core.expert import SEEModel
from see_ray.core.prompts import Query
from see_ray.core.rehearsal import RehearsalBuffer, plain_sft, reconstruct
from see_ray.core.router import Router
from see_ray.core.routing import ExpertSpec, accepts, calibrate_threshold, calibration_queries
from see_ray.core.trainer import train_adapter

log = logging.getLogger(__name__)
METHODS = ("SEE", "SeqFT", "Replay", "MTL", "Oracle")


def machine_description() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, CPU"


class CachedBackend:
    """The SEEModel interface the Router uses, memoizing decisions and answers per (adapter, query)."""

    def __init__(self, model: SEEModel):
        self.model = model
        self.adapters = model.adapters
        self._p: dict[tuple[str, Query], float] = {}
        self._a: dict[tuple[str | None, Query], str] = {}

    def load_adapter(self, name, path):
        self.model.load_adapter(name, path)

    def decide(self, queries: list[Query], adapter: str) -> list[float]:
        miss = list(dict.fromkeys(q for q in queries if (adapter, q) not in self._p))
        if miss:
            for q, p in zip(miss, self.model.decide(miss, adapter)):
                self._p[(adapter, q)] = p
        return [self._p[(adapter, q)] for q in queries]

    def generate(self, queries: list[Query], adapter: str | None, max_new_tokens: int, after_accept: bool = False):
        miss = list(dict.fromkeys(q for q in queries if (adapter, q) not in self._a))
        if miss:
            for q, a in zip(miss, self.model.generate(miss, adapter, max_new_tokens, after_accept=after_accept)):
                self._a[(adapter, q)] = a
        return [self._a[(adapter, q)] for q in queries]

    def decide_and_generate(self, queries, adapter, threshold, max_new_tokens):
        probs = self.decide(queries, adapter)
        answers: list[str | None] = [None] * len(queries)
        if threshold is not None:
            acc = [i for i, p in enumerate(probs) if accepts(p, threshold)]
            for i, a in zip(acc, self.generate([queries[i] for i in acc], adapter, max_new_tokens, True)):
                answers[i] = a
        return probs, answers


@dataclass
class MethodResult:
    matrix: list[list[float | None]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = metrics.summarize(self.matrix) if self.matrix and self.matrix[-1] else {}
        return {**out, **self.extra, "matrix": self.matrix}


def _scores(answers: list[str | None], task: Task) -> float:
    return metrics.mean_rouge_l([a or "" for a in answers], [x.outputs for x in task.test])


def _test_queries(task: Task, with_definition: bool = True) -> list[Query]:
    return [task.query(x, with_definition) for x in task.test]


class QualityBench:
    def __init__(self, tasks: list[Task], pool: list[Query], ood: list[Task], cfg: SEEConfig, out_dir: Path,
                 reuse_adapters: Path | None = None):
        """``reuse_adapters``: a folder of adapters trained by an earlier run (``<out>/adapters``); an adapter
        found there under the name this run would train is used as it is, and listed in ``self.reused``."""
        self.tasks, self.pool, self.ood, self.cfg = tasks, pool, ood, cfg
        self.out = out_dir
        self.reuse_adapters = reuse_adapters
        self.reused: dict[str, str] = {}
        (self.out / "adapters").mkdir(parents=True, exist_ok=True)
        self.model = SEEModel(cfg)
        self.max_new = cfg.routing.max_new_tokens
        self.timings: dict[str, float] = {}

    def _train(self, name: str, examples, init: str | None = None, steps: int | None = None) -> str:
        cfg = self.cfg
        if steps is not None:
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": steps})})
        path = self.out / "adapters" / name
        if self.reuse_adapters is not None and (self.reuse_adapters / name / "adapter_config.json").exists():
            found = self.reuse_adapters / name
            log.info("reusing %s from %s (not trained in this run)", name, found)
            self.reused[name] = str(found)
            return str(found)
        log.info("training %s on %d examples for %d steps%s", name, len(examples), cfg.training.steps,
                 f", starting from {init}" if init else "")
        meta = {"name": name, **({"init_from": str(init)} if init else {})}
        train_adapter(examples, cfg, self.model.model_path, path, init_adapter=init, meta=meta)
        return str(path)

    def _eval_single(self, adapter: str, upto: int) -> list[float | None]:
        row: list[float | None] = [None] * len(self.tasks)
        for j in range(upto + 1):
            t = self.tasks[j]
            row[j] = _scores(self.model.generate(_test_queries(t), adapter, self.max_new), t)
        return row

    # -- methods ----------------------------------------------------------------------------------------
    def run_see(self) -> tuple[MethodResult, MethodResult]:
        buffer = RehearsalBuffer.empty()
        experts: list[ExpertSpec] = []
        backend = CachedBackend(self.model)
        res = MethodResult()
        for s, task in enumerate(self.tasks):
            name = f"see-{task.name}"
            examples = reconstruct(task, buffer, self.pool, self.cfg.rehearsal)
            warm = experts[-1].adapter_path if self.cfg.training.warm_start and experts else None
            path = self._train(name, examples, init=warm)
            self.model.load_adapter(name, path)
            dev = calibration_queries(task, self.cfg.rehearsal.input_only_share)
            thr = calibrate_threshold(self.model.decide(dev, name), self.cfg.routing)
            experts.append(ExpertSpec(name, task.name, path, thr))
            buffer.add_task(task, self.cfg.rehearsal)
            router = Router(backend, experts, self.cfg.routing)
            row: list[float | None] = [None] * len(self.tasks)
            for j in range(s + 1):
                t = self.tasks[j]
                row[j] = _scores([r.answer for r in router.route(_test_queries(t))], t)
            res.matrix.append(row)
            log.info("SEE stage %d: %s", s + 1, [None if v is None else round(v, 1) for v in row])
        # Routing figures at the end of the sequence, in both prompt modes, and on out-of-distribution tasks.
        router = Router(self.model, experts, self.cfg.routing)
        labels = [e.name for e in experts]
        routing = {}
        for mode, with_def in (("definition", True), ("input_only", False)):
            truth, routed = [], []
            for e, t in zip(experts, self.tasks):
                rr = router.route(_test_queries(t, with_def), generate=False)
                truth += [e.name] * len(rr)
                routed += [r.expert for r in rr]
            ood_routed = [
                r.expert for t in self.ood for r in router.route(_test_queries(t, with_def), generate=False)
            ]
            routing[mode] = {
                "accuracy": metrics.routing_accuracy(truth, routed),
                "confusion": metrics.routing_confusion(truth, routed, labels),
                "false_rejection": metrics.false_rejection_rate(routed),
                "ood_rejection": metrics.ood_rejection_rate(ood_routed) if ood_routed else None,
            }
        res.extra = {
            "routing_accuracy": routing["definition"]["accuracy"],
            "routing_accuracy_input_only": routing["input_only"]["accuracy"],
            "ood": {
                "rejection": routing["definition"]["ood_rejection"],
                "false_rejection": routing["definition"]["false_rejection"],
                "rejection_input_only": routing["input_only"]["ood_rejection"],
                "false_rejection_input_only": routing["input_only"]["false_rejection"],
            },
            "routing": routing,
            "thresholds": {e.name: e.threshold for e in experts},
        }
        # Oracle: every task answered by its own expert; experts never change, so R[s][j] = R[j][j].
        oracle_scores = [
            _scores(backend.generate(_test_queries(t), e.name, self.max_new, after_accept=True), t)
            for e, t in zip(experts, self.tasks)
        ]
        oracle = MethodResult(
            [[oracle_scores[j] if j <= s else None for j in range(len(self.tasks))] for s in range(len(self.tasks))]
        )
        return res, oracle

    def run_sequential(self, replay: bool) -> MethodResult:
        label = "replay" if replay else "seqft"
        buffer = RehearsalBuffer.empty()
        res, prev = MethodResult(), None
        for s, task in enumerate(self.tasks):
            name = f"{label}-{s + 1}"
            examples = plain_sft(task, self.cfg.rehearsal, buffer if replay else None)
            prev = self._train(name, examples, init=prev)
            self.model.load_adapter(name, prev)
            res.matrix.append(self._eval_single(name, s))
            buffer.add_task(task, self.cfg.rehearsal)
            log.info("%s stage %d: %s", label, s + 1, [None if v is None else round(v, 1) for v in res.matrix[-1]])
        return res

    def run_mtl(self) -> MethodResult:
        import random

        examples = [ex for t in self.tasks for ex in plain_sft(t, self.cfg.rehearsal)]
        random.Random(self.cfg.training.seed).shuffle(examples)
        path = self._train("mtl", examples, steps=self.cfg.training.steps * len(self.tasks))
        self.model.load_adapter("mtl", path)
        final = self._eval_single("mtl", len(self.tasks) - 1)
        return MethodResult(extra={"ap": sum(final) / len(final), "bwt": None, "fra": None, "final_scores": final})

    def run(self, methods: tuple[str, ...] = METHODS, on_method_done=None) -> dict:
        """Run ``methods``; ``on_method_done(partial_results)`` is called after each (partial reports)."""
        out: dict[str, dict] = {}
        runs = (
            ("SEE", self.run_see),
            ("SeqFT", lambda: self.run_sequential(False)),
            ("Replay", lambda: self.run_sequential(True)),
            ("MTL", self.run_mtl),
        )
        for m, fn in runs:
            if m not in methods and not (m == "SEE" and "Oracle" in methods):
                continue
            t0 = time.perf_counter()
            res = fn()
            self.timings[m] = time.perf_counter() - t0
            if m == "SEE":
                see, oracle = res
                for name, r in (("SEE", see), ("Oracle", oracle)):
                    if name in methods:
                        out[name] = r.summary()
            else:
                out[m] = res.summary()
            if on_method_done is not None:
                on_method_done(out)
        return {m: out[m] for m in methods}


def write_report(result: dict, out_dir: Path) -> None:
    """quality.json, quality.md and PNG plots (score matrices, routing confusion)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=2))
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    labels = [t.split("_")[0] for t in result["tasks"]]
    for m, r in result["methods"].items():
        if r.get("matrix"):
            metrics.plot_score_matrix(r["matrix"], labels, f"{m}: ROUGE-L R[stage][task]", str(plots / f"matrix-{m}.png"))
    see = result["methods"].get("SEE")
    if see:
        for mode, r in see["routing"].items():
            metrics.plot_confusion(r["confusion"], f"SEE routing ({mode})", str(plots / f"confusion-{mode}.png"))
    (out_dir / "quality.md").write_text(markdown_table(result))


def _fmt(v, pct=False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def markdown_table(result: dict) -> str:
    lines = [
        "| Method | AP | BWT | F.Ra | Routing acc. (definition) | Routing acc. (input only) |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in result["methods"].items():
        lines.append(
            f"| {m} | {_fmt(r.get('ap'))} | {_fmt(r.get('bwt'))} | {_fmt(r.get('fra'))} | "
            f"{_fmt(r.get('routing_accuracy'), True)} | {_fmt(r.get('routing_accuracy_input_only'), True)} |"
        )
    see = result["methods"].get("SEE")
    if see and see.get("ood"):
        o = see["ood"]
        lines += [
            "",
            f"SEE out of distribution ({', '.join(result.get('ood_tasks', [])) or 'none'}): "
            f"{_fmt(o['rejection'], True)} reach the base model (input only: {_fmt(o['rejection_input_only'], True)}); "
            f"false rejection of in-sequence queries {_fmt(o['false_rejection'], True)} "
            f"(input only: {_fmt(o['false_rejection_input_only'], True)}).",
        ]
    return "\n".join(lines) + "\n"
