"""``see-ray bench quality``: SEE against the continual-learning baselines on one task sequence.

Methods, all on the same base model, the same data and the same budget rule (``TrainConfig.steps_for``:
``training.epochs`` passes over each adapter's own training set, within the step bounds):
- SEE: one expert per task on the reconstructed set (positives + rehearsal and general negatives), routed
  sequentially with calibrated thresholds;
- SeqFT: one LoRA trained task after task on plain targets (no indicator);
- Replay: SeqFT with the same rehearsal samples SEE keeps, mixed in with their answers;
- MTL: one LoRA on all tasks at once (the same epochs over all tasks' examples, step cap x T), the usual upper
  bound; evaluated once at the end, with its dev curve over the budget (adapter snapshots of the same run);
- Oracle: each task answered by its own SEE expert (task id given): the ceiling for SEE's routing.
R[s][j] is ROUGE-L (points) on task j's test set after stage s, evaluated for j <= s.

SEE's stages are evaluated with the real Router over a caching backend (``tools/eval_cache.py``): adapters never
change after training, so an expert's decision and answer for a query are computed once, kept on disk under
``--cache`` and reused in later stages and later runs; a stage costs the new expert's decisions plus the answers
whose answering expert changed. Adapters are cached by the content of what trains them (examples, config, start
adapter), so a re-run or another protocol with the same first tasks trains nothing twice. The walk itself is the
production code path. Each expert's threshold is calibrated as the add-expert job does it: own dev queries
against held-out negatives (``core.routing.calibrate``).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections import Counter
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
from see_ray.core.routing import ExpertSpec, calibrate_on_held_out
from see_ray.core.trainer import train_adapter
from see_ray.tools.eval_cache import AdapterCache, CachedBackend, Store, adapter_key, model_context, train_key

log = logging.getLogger(__name__)
METHODS = ("SEE", "SeqFT", "Replay", "MTL", "Oracle")


def machine_description() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, CPU"


@dataclass
class MethodResult:
    matrix: list[list[float | None]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = metrics.summarize(self.matrix) if self.matrix and self.matrix[-1] else {}
        return {**out, **self.extra, "matrix": self.matrix}


def _scores(answers: list[str | None], task: Task, split: str = "test") -> float:
    return metrics.mean_rouge_l([a or "" for a in answers], [x.outputs for x in getattr(task, split)])


def _test_queries(task: Task, with_definition: bool = True) -> list[Query]:
    return [task.query(x, with_definition) for x in task.test]


class QualityBench:
    def __init__(self, tasks: list[Task], pool: list[Query], ood: list[Task], cfg: SEEConfig, out_dir: Path,
                 reuse_adapters: Path | None = None, cache_dir: Path | None = None, recompute: bool = False):
        """``reuse_adapters``: a folder of adapters trained by an earlier run (``<out>/adapters``); an adapter
        found there under the name this run would train is used as it is, and listed in ``self.reused``.
        ``cache_dir``: where decisions, answers and trained adapters are kept across runs (None: this run only).
        ``recompute``: take trained adapters from ``cache_dir`` but compute every decision and answer again, keeping
        them in memory only (what the evaluation itself costs, ``eval_wall_s``)."""
        from see_ray.core.model import fingerprint

        self.tasks, self.pool, self.ood, self.cfg = tasks, pool, ood, cfg
        self.out = out_dir
        self.reuse_adapters = reuse_adapters
        self.reused: dict[str, str] = {}
        (self.out / "adapters").mkdir(parents=True, exist_ok=True)
        self.model = SEEModel(cfg)
        self.model_key = fingerprint(self.model.model_path)
        context = model_context(self.model)  # everything besides the adapter and the query that changes a result
        self.store = Store(cache_dir / "decisions.sqlite") if cache_dir is not None and not recompute else None
        self.adapter_cache = AdapterCache(cache_dir / "adapters") if cache_dir is not None else None
        self.backend = CachedBackend(self.model, self.store, context)
        self.max_new = cfg.routing.max_new_tokens
        self.timings: dict[str, float] = {}
        self.train_s = 0.0  # wall time spent training (0 for cached adapters)
        self.steps: dict[str, int] = {}  # optimizer steps per trained adapter
        self.cached_adapters: list[str] = []
        self.experts: list[ExpertSpec] = []

    def _train(self, name: str, examples, init: str | None = None, cfg: SEEConfig | None = None,
               snapshot_steps: list[int] | None = None) -> str:
        """Train (or find in the caches) the adapter ``name`` on ``examples``; returns its folder."""
        cfg = cfg or self.cfg
        steps = cfg.training.steps_for(len(examples))
        self.steps[name] = steps
        if self.reuse_adapters is not None and (self.reuse_adapters / name / "adapter_config.json").exists():
            found = self.reuse_adapters / name
            log.info("reusing %s from %s (not trained in this run)", name, found)
            self.reused[name] = str(found)
            return str(found)
        key = None
        if self.adapter_cache is not None:
            trained_with = {
                "model": cfg.model.model_dump(mode="json", include={"name_or_path", "max_prompt_tokens"}),
                "lora": cfg.lora.model_dump(mode="json"),
                "indicators": cfg.indicators.model_dump(mode="json", include={"accept", "reject"}),
                "training": cfg.training.resolved(len(examples)).model_dump(mode="json", exclude={"progress", "log_every"}),
                "snapshots": sorted(snapshot_steps or []),
            }
            key = train_key(examples, trained_with, adapter_key(init) if init else None, self.model_key)
            found = self.adapter_cache.get(key)
            if found is not None:
                log.info("%s: trained before with the same inputs, taken from the cache (%s)", name, found)
                self.cached_adapters.append(name)
                return str(found)
        path = self.out / "adapters" / name
        log.info("training %s on %d examples for %d steps%s", name, len(examples), steps,
                 f", starting from {init}" if init else "")
        meta = {"name": name, **({"init_from": str(init)} if init else {})}
        t0 = time.perf_counter()
        train_adapter(examples, cfg, self.model.model_path, path, init_adapter=init, meta=meta,
                      snapshot_steps=snapshot_steps)
        self.train_s += time.perf_counter() - t0
        if key is not None:
            snaps = Path(f"{path}.snapshots")
            if snaps.is_dir():  # snapshots travel with the adapter
                shutil.copytree(snaps, path / "snapshots", dirs_exist_ok=True)
            return str(self.adapter_cache.put(key, path))
        return str(path)

    def _eval_single(self, adapter: str, upto: int) -> list[float | None]:
        row: list[float | None] = [None] * len(self.tasks)
        for j in range(upto + 1):
            t = self.tasks[j]
            row[j] = _scores(self.backend.generate(_test_queries(t), adapter, self.max_new), t)
        return row

    # -- methods ----------------------------------------------------------------------------------------
    def run_see(self) -> tuple[MethodResult, MethodResult]:
        buffer = RehearsalBuffer.empty()
        experts: list[ExpertSpec] = []
        calibrations: dict[str, dict] = {}
        res = MethodResult()
        eval_s = 0.0  # SEE's evaluation wall time: calibration, the stage matrix, routing figures, the Oracle
        for s, task in enumerate(self.tasks):
            name = f"see-{task.name}"
            examples = reconstruct(task, buffer, self.pool, self.cfg.rehearsal)
            warm = experts[-1].adapter_path if self.cfg.training.warm_start and experts else None
            path = self._train(name, examples, init=warm)
            t0 = time.perf_counter()
            self.backend.load_adapter(name, path)
            cal = calibrate_on_held_out(lambda qs: self.backend.decide(qs, name), task, buffer, self.pool,
                                        self.cfg).calibration
            calibrations[name] = cal.to_dict()
            experts.append(ExpertSpec(name, task.name, path, cal.threshold))
            buffer.add_task(task, self.cfg.rehearsal)
            if self.cfg.routing.recalibrate:  # older experts' thresholds, against the new task's held-out queries too
                for e, t in zip(experts[:-1], self.tasks):
                    e.threshold = calibrate_on_held_out(lambda qs, n=e.name: self.backend.decide(qs, n), t, buffer,
                                                        self.pool, self.cfg).calibration.threshold
            router = Router(self.backend, experts, self.cfg.routing)
            row: list[float | None] = [None] * len(self.tasks)
            for j in range(s + 1):
                t = self.tasks[j]
                row[j] = _scores([r.answer for r in router.route(_test_queries(t))], t)
            res.matrix.append(row)
            eval_s += time.perf_counter() - t0
            log.info("SEE stage %d: %s (threshold %.3f, dev false rejection %.3f, held-out negatives accepted %s)",
                     s + 1, [None if v is None else round(v, 1) for v in row], cal.threshold, cal.false_rejection,
                     None if cal.false_acceptance is None else round(cal.false_acceptance, 3))
        t0 = time.perf_counter()
        # Routing figures at the end of the sequence, in both prompt modes, and on out-of-distribution tasks.
        router = Router(self.backend, experts, self.cfg.routing)
        labels = [e.name for e in experts]
        routing = {}
        for mode, with_def in (("definition", True), ("input_only", False)):
            truth, routed = [], []
            for e, t in zip(experts, self.tasks):
                rr = router.route(_test_queries(t, with_def), generate=False)
                truth += [e.name] * len(rr)
                routed += [r.expert for r in rr]
            ood_by_task = {t.name: [r.expert for r in router.route(_test_queries(t, with_def), generate=False)]
                           for t in self.ood}
            ood_routed = [x for xs in ood_by_task.values() for x in xs]
            routing[mode] = {
                "accuracy": metrics.routing_accuracy(truth, routed),
                "confusion": metrics.routing_confusion(truth, routed, labels),
                "false_rejection": metrics.false_rejection_rate(routed),
                "ood_rejection": metrics.ood_rejection_rate(ood_routed) if ood_routed else None,
                # which expert took which unknown task's queries (the base model = rejected by all)
                "ood_taken_by": {t: dict(sorted(Counter(xs).items())) for t, xs in ood_by_task.items()},
            }
        # Oracle: every task answered by its own expert; experts never change, so R[s][j] = R[j][j].
        oracle_scores = [
            _scores(self.backend.generate(_test_queries(t), e.name, self.max_new, after_accept=True), t)
            for e, t in zip(experts, self.tasks)
        ]
        eval_s += time.perf_counter() - t0
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
            "calibration": calibrations,
            "steps_per_expert": {e.name: self.steps[e.name] for e in experts},
            "eval_wall_s": eval_s,
            "eval_cache": {op: dict(c) for op, c in self.backend.stats.items()},
        }
        oracle = MethodResult(
            [[oracle_scores[j] if j <= s else None for j in range(len(self.tasks))] for s in range(len(self.tasks))]
        )
        self.experts = experts  # the final sequence, for analyses of the same experts (benchmarks/second_signal.py)
        return res, oracle

    def run_sequential(self, replay: bool) -> MethodResult:
        label = "replay" if replay else "seqft"
        buffer = RehearsalBuffer.empty()
        res, prev = MethodResult(), None
        for s, task in enumerate(self.tasks):
            name = f"{label}-{s + 1}"
            examples = plain_sft(task, self.cfg.rehearsal, buffer if replay else None)
            prev = self._train(name, examples, init=prev)
            self.backend.load_adapter(name, prev)
            res.matrix.append(self._eval_single(name, s))
            buffer.add_task(task, self.cfg.rehearsal)
            log.info("%s stage %d: %s", label, s + 1, [None if v is None else round(v, 1) for v in res.matrix[-1]])
        res.extra = {"steps_per_stage": [self.steps[f"{label}-{s + 1}"] for s in range(len(self.tasks))]}
        return res

    def run_mtl(self) -> MethodResult:
        """One adapter on every task's examples, the same epoch budget; its step cap is T times the per-adapter
        cap, as T adapters' worth of data is one set here. The dev curve (mean dev ROUGE-L over the tasks) is read
        from snapshots of the same run at fractions of the budget, to show whether the budget let MTL converge."""
        import random

        examples = [ex for t in self.tasks for ex in plain_sft(t, self.cfg.rehearsal)]
        random.Random(self.cfg.training.seed).shuffle(examples)
        tcfg = self.cfg.training
        cfg = self.cfg.model_copy(update={"training": tcfg.model_copy(update={"max_steps": tcfg.max_steps * len(self.tasks)})})
        steps = cfg.training.steps_for(len(examples))
        snapshots = sorted({max(1, round(steps * f)) for f in (0.25, 0.5, 0.75)} - {steps})
        path = self._train("mtl", examples, cfg=cfg, snapshot_steps=snapshots)
        curve = []
        for step in [*snapshots, steps]:
            name = "mtl" if step == steps else f"mtl-step-{step}"
            folder = path if step == steps else self._snapshot(path, step)
            if folder is None:
                continue
            self.backend.load_adapter(name, folder)
            dev = [_scores(self.backend.generate([t.query(x) for x in t.dev], name, self.max_new), t, split="dev")
                   for t in self.tasks]
            curve.append({"step": step, "epochs": step * tcfg.batch_size / len(examples),
                          "dev_rouge_l": sum(dev) / len(dev)})
            log.info("MTL dev curve: step %d, dev ROUGE-L %.2f", step, curve[-1]["dev_rouge_l"])
        final = self._eval_single("mtl", len(self.tasks) - 1)
        return MethodResult(extra={"ap": sum(final) / len(final), "bwt": None, "fra": None, "final_scores": final,
                                   "steps": steps, "dev_curve": curve})

    @staticmethod
    def _snapshot(path: str, step: int) -> str | None:
        for folder in (Path(path) / "snapshots" / f"step-{step}", Path(f"{path}.snapshots") / f"step-{step}"):
            if (folder / "adapter_config.json").exists():
                return str(folder)
        return None

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
        return {m: out[m] for m in methods if m in out}


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
