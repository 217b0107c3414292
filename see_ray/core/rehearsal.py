"""Rehearsal buffer, general negative pool and task reconstruction (SEE's step 1).

When task t arrives its training set is rebuilt as
- positives: every training instance of t, target ACCEPT + answer;
- negatives: queries from the rehearsal buffer of tasks 1..t-1, target REJECT (nothing after it);
- general negatives: queries that belong to no task (without them expert 1 never learns to say no,
  and unknown queries stop at it instead of reaching the base model), target REJECT.
A configurable share of all prompts is written without the task definition, so that experts recognise raw
client queries too. After training, a small sample of t's own queries joins the buffer.

A fixed share of the negatives (``rehearsal.calibration_share``) is never trained on: ``held_out`` picks them by
their text alone, so every expert holds out the same ones, and ``calibration_negatives`` hands them to the
calibration of the new expert's threshold (core/routing.calibrate), which thus measures rejection on queries the
expert never saw.

Everything here is plain data and pure functions, so it runs the same in a job, a test or a Ray worker.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from see_ray.config import RehearsalConfig
from see_ray.core.data import Task
from see_ray.core.prompts import Query


@dataclass(frozen=True)
class Example:
    """One training example: a query and its target (indicator and/or answer)."""

    query: Query
    indicator: str | None  # "accept", "reject", or None for the baselines (plain SFT)
    answer: str | None  # None for REJECT
    source: str  # task the query came from, or "general"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["query"] = asdict(self.query)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(Query(**d["query"]), d["indicator"], d["answer"], d["source"])


@dataclass
class RehearsalBuffer:
    """Per-task rehearsal samples: queries (with their definition) and reference answers.

    Answers are kept so that the Replay baseline can rehearse with them; SEE only uses the queries.
    """

    samples: dict[str, list[dict]]

    @classmethod
    def empty(cls) -> "RehearsalBuffer":
        return cls({})

    def tasks(self) -> list[str]:
        return list(self.samples)

    def add_task(self, task: Task, cfg: RehearsalConfig) -> list[dict]:
        """Keep ``cfg.keep_count`` of the task's training instances (seeded sample); replaces older ones."""
        rng = random.Random(f"{cfg.seed}:{task.name}")
        k = cfg.keep_count(len(task.train))
        chosen = rng.sample(task.train, k)
        self.samples[task.name] = [
            {"input": x.input, "definition": task.definition, "output": x.outputs[0]} for x in chosen
        ]
        return self.samples[task.name]

    def remove_task(self, name: str) -> None:
        self.samples.pop(name, None)

    def to_json(self) -> str:
        return json.dumps(self.samples, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "RehearsalBuffer":
        return cls(json.loads(text))


def held_out(q: Query, share: float) -> bool:
    """Whether a negative query is kept out of training for calibration: a hash of its text (definition and
    input) below ``share``, so the choice never depends on the expert, the order or the sampling seed."""
    if share <= 0.0:
        return False
    digest = hashlib.sha256(f"{q.definition or ''}\x00{q.input}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def calibration_negatives(
    buffer: "RehearsalBuffer", general_pool: list[Query], cfg: RehearsalConfig, exclude: set[str] = frozenset()
) -> dict[str, list[Query]]:
    """The held-out negatives of a new expert, by source: each earlier task's held-out rehearsal queries (with
    their definitions) and the general pool's held-out queries under ``"general"``. Empty sources are left out."""
    out: dict[str, list[Query]] = {}
    for name, samples in buffer.samples.items():
        if name in exclude:
            continue
        qs = [q for q in (Query(s["input"], s.get("definition")) for s in samples) if held_out(q, cfg.calibration_share)]
        if qs:
            out[name] = qs
    general = [q for q in general_pool if held_out(q, cfg.calibration_share)]
    if general:
        out["general"] = general
    return out


def _maybe_strip(q: Query, rng: random.Random, share: float) -> Query:
    return Query(q.input, None) if rng.random() < share else q


def reconstruct(
    task: Task,
    buffer: RehearsalBuffer,
    general_pool: list[Query],
    cfg: RehearsalConfig,
    exclude: set[str] = frozenset(),
) -> list[Example]:
    """SEE's reconstructed training set for ``task``: positives + rehearsal negatives + general negatives.

    ``exclude`` names tasks whose rehearsal samples must not be used as negatives (the task itself when a new
    version of an existing expert is trained). Negatives that ``held_out`` reserves for calibration are left out.
    """
    rng = random.Random(f"{cfg.seed}:reconstruct:{task.name}")
    share = cfg.input_only_share
    out = [
        Example(_maybe_strip(task.query(x), rng, share), "accept", x.outputs[0], task.name) for x in task.train
    ]
    for name, samples in buffer.samples.items():
        if name == task.name or name in exclude:
            continue
        chosen = [s for s in samples if not held_out(Query(s["input"], s["definition"]), cfg.calibration_share)]
        if cfg.negatives_per_task is not None and len(chosen) > cfg.negatives_per_task:
            chosen = rng.sample(chosen, cfg.negatives_per_task)
        for s in chosen:
            out.append(Example(_maybe_strip(Query(s["input"], s["definition"]), rng, share), "reject", None, name))
    pool = [q for q in general_pool if not held_out(q, cfg.calibration_share)]
    if cfg.general_pool_size is not None and len(pool) > cfg.general_pool_size:
        pool = rng.sample(pool, cfg.general_pool_size)
    for q in pool:
        out.append(Example(_maybe_strip(q, rng, share), "reject", None, "general"))
    rng.shuffle(out)
    return out


def plain_sft(task: Task, cfg: RehearsalConfig, buffer: RehearsalBuffer | None = None) -> list[Example]:
    """Baseline training set: the task's instances as plain SFT targets (no indicator).

    With ``buffer`` (the Replay baseline) the rehearsal samples of earlier tasks are mixed in, with their
    answers: the same samples SEE uses as negatives, so every method sees the same data.
    """
    rng = random.Random(f"{cfg.seed}:sft:{task.name}")
    share = cfg.input_only_share
    out = [Example(_maybe_strip(task.query(x), rng, share), None, x.outputs[0], task.name) for x in task.train]
    if buffer is not None:
        for name, samples in buffer.samples.items():
            if name == task.name:
                continue
            for s in samples:
                q = _maybe_strip(Query(s["input"], s["definition"]), rng, share)
                out.append(Example(q, None, s["output"], name))
    rng.shuffle(out)
    return out


def general_pool_from_tasks(tasks: list[Task], per_task: int | None = None) -> list[Query]:
    """General-pool queries taken from tasks kept out of the sequence (with their definitions)."""
    pool = []
    for t in tasks:
        insts = t.train[:per_task] if per_task else t.train
        pool.extend(t.query(x) for x in insts)
    return pool
