"""Tasks: loading SuperNI JSON and JSONL task data, with errors that name the file and the problem.

Accepted layouts (``load_task(path)``):
- a folder with ``train.json`` / ``dev.json`` / ``test.json`` (SuperNI: ``Definition`` + ``Instances``),
- a folder with ``train.jsonl`` / ``dev.jsonl`` / ``test.jsonl`` (one ``{"input", "output"}`` per line) and
  the instruction in ``definition.txt`` or passed as ``definition=``,
- a single ``.json`` (SuperNI) or ``.jsonl`` file, used as the training split.
Missing dev/test splits are carved off the training split (deterministically), so every task has
held-out data for threshold calibration and validation.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from see_ray.core.prompts import Query

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
INSTANCE_FIELDS = {"id", "input", "output"}
# Names become deployment names, folder names and metric labels: keep them boring (no traversal, no shell).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TaskDataError(ValueError):
    """Task data is missing or malformed; the message names the file (and line/instance) and the problem."""


@dataclass(frozen=True)
class Instance:
    input: str
    outputs: tuple[str, ...]  # references; outputs[0] is the training target
    id: str | None = None


@dataclass
class Task:
    name: str
    definition: str
    train: list[Instance]
    dev: list[Instance] = field(default_factory=list)
    test: list[Instance] = field(default_factory=list)

    def query(self, inst: Instance, with_definition: bool = True) -> Query:
        return Query(inst.input, self.definition if with_definition else None)

    def subsample(self, train: int | None = None, dev: int | None = None, test: int | None = None) -> "Task":
        """The first K instances of each split (deterministic, as the benchmark's README suggests)."""
        return replace(
            self,
            train=self.train[:train] if train else self.train,
            dev=self.dev[:dev] if dev else self.dev,
            test=self.test[:test] if test else self.test,
        )


def validate_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"{what} {name!r} is invalid: use 1-64 characters from letters, digits, '_', '-', '.', "
            "starting with a letter or digit"
        )
    return name


def _parse_instance(raw, where: str, strict: bool) -> Instance | None:
    """One instance; ``strict`` (user JSONL) also refuses unknown fields and an empty answer. Non-strict
    (published SuperNI files) returns None for an empty answer: task511's train.json holds six of them."""
    if not isinstance(raw, dict):
        raise TaskDataError(f"{where}: expected an object with 'input' and 'output', got {type(raw).__name__}")
    if strict:
        unknown = set(raw) - INSTANCE_FIELDS
        if unknown:
            raise TaskDataError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(INSTANCE_FIELDS)}")
    if "input" not in raw:
        raise TaskDataError(f"{where}: missing field 'input'")
    if not isinstance(raw["input"], str) or not raw["input"].strip():
        raise TaskDataError(f"{where}: 'input' must be a non-empty string")
    if "output" not in raw:
        raise TaskDataError(f"{where}: missing field 'output' (every instance needs an answer)")
    out = raw["output"]
    outputs = [out] if isinstance(out, str) else out
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise TaskDataError(f"{where}: 'output' must be a string or a non-empty list of strings")
    if not outputs[0].strip():
        if not strict:
            return None
        raise TaskDataError(f"{where}: 'output' is empty")
    return Instance(raw["input"], tuple(outputs), None if raw.get("id") is None else str(raw["id"]))


def _read_superni(path: Path) -> tuple[str, list[Instance]]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise TaskDataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise TaskDataError(f"{path}: expected a SuperNI task object with 'Definition' and 'Instances'")
    if "Instances" not in doc:
        raise TaskDataError(f"{path}: missing field 'Instances'")
    definition = doc.get("Definition")
    if isinstance(definition, list):
        definition = " ".join(d for d in definition if isinstance(d, str))
    if not isinstance(definition, str) or not definition.strip():
        raise TaskDataError(f"{path}: missing or empty field 'Definition'")
    instances = doc["Instances"]
    if not isinstance(instances, list):
        raise TaskDataError(f"{path}: 'Instances' must be a list")
    parsed = [_parse_instance(r, f"{path}: Instances[{i}]", False) for i, r in enumerate(instances)]
    kept = [x for x in parsed if x is not None]
    if len(kept) < len(parsed):
        log.warning("%s: skipped %d instance(s) with an empty answer", path, len(parsed) - len(kept))
    return definition.strip(), kept


def read_jsonl(path: Path) -> list[tuple[str, object]]:
    """``(where, value)`` for every non-blank line of a JSON Lines file, ``where`` being ``file:line``; a
    missing file, non-UTF-8 text or a line that is not JSON is a TaskDataError naming the file and line."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise TaskDataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def _read_jsonl(path: Path) -> list[Instance]:
    return [_parse_instance(raw, where, True) for where, raw in read_jsonl(path)]


def load_query_pool(path: str | Path) -> list[Query]:
    """A general query pool: a JSONL file of ``{"input": str, "definition": str?}`` objects (or bare strings)."""
    p = Path(path)
    if not p.is_file():
        raise TaskDataError(f"{p}: no such file")
    out = []
    for where, raw in read_jsonl(p):
        if isinstance(raw, str):
            raw = {"input": raw}
        if not isinstance(raw, dict) or not isinstance(raw.get("input"), str) or not raw["input"].strip():
            raise TaskDataError(f"{where}: expected {{'input': str, 'definition': str?}}")
        d = raw.get("definition")
        if d is not None and not isinstance(d, str):
            raise TaskDataError(f"{where}: 'definition' must be a string")
        out.append(Query(raw["input"], d or None))
    if not out:
        raise TaskDataError(f"{p}: the general pool is empty (the SEE method requires one: it is not optional)")
    return out


def _read_split(path: Path) -> tuple[str | None, list[Instance]]:
    if path.suffix == ".jsonl":
        return None, _read_jsonl(path)
    return _read_superni(path)


def load_task(
    path: str | Path,
    name: str | None = None,
    definition: str | None = None,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Load one task from a file or folder (see the module docstring); raise TaskDataError on bad data."""
    p = Path(path)
    if not p.exists():
        raise TaskDataError(f"{p}: no such file or folder")
    splits: dict[str, list[Instance]] = {}
    defs: list[str] = []
    if p.is_dir():
        for split in SPLITS:
            candidates = [p / f"{split}.json", p / f"{split}.jsonl"]
            present = [c for c in candidates if c.exists()]
            if len(present) > 1:
                raise TaskDataError(f"{p}: both {split}.json and {split}.jsonl exist; keep one")
            if present:
                d, insts = _read_split(present[0])
                splits[split] = insts
                if d:
                    defs.append(d)
        if "train" not in splits:
            raise TaskDataError(f"{p}: no train.json or train.jsonl in this folder")
        if (p / "definition.txt").exists():
            defs.insert(0, (p / "definition.txt").read_text().strip())
    else:
        if p.suffix not in (".json", ".jsonl"):
            raise TaskDataError(f"{p}: unsupported file type {p.suffix!r}; use .json (SuperNI) or .jsonl")
        d, splits["train"] = _read_split(p)
        if d:
            defs.append(d)
    definition = (definition or (defs[0] if defs else "")).strip()
    if not definition:
        raise TaskDataError(f"{p}: no task definition: pass definition= (--definition) or add definition.txt")
    try:
        task_name = validate_name(name or (p.name if p.is_dir() else p.stem), "task name")
    except ValueError as e:
        raise TaskDataError(f"{p}: {e}") from None
    if not splits["train"]:
        raise TaskDataError(f"{p}: the training split is empty")
    rng = random.Random(seed)
    train = list(splits["train"])
    for split, frac in (("dev", dev_fraction), ("test", test_fraction)):
        if split not in splits:  # carve off a deterministic held-out slice, keeping >= 1 training instance
            k = min(max(1, round(frac * len(train))), len(train) - 1) if len(train) > 1 else 0
            idx = set(rng.sample(range(len(train)), k))
            splits[split] = [x for i, x in enumerate(train) if i in idx]
            train = [x for i, x in enumerate(train) if i not in idx]
    return Task(task_name, definition, train, splits["dev"], splits["test"])


def load_tasks(paths: list[str | Path], **kw) -> list[Task]:
    tasks = [load_task(p, **kw) for p in paths]
    seen: dict[str, str] = {}
    for t, p in zip(tasks, paths):
        if t.name in seen:
            raise TaskDataError(f"duplicate task name {t.name!r}: {seen[t.name]} and {p}")
        seen[t.name] = str(p)
    return tasks


def load_benchmark(data_dir: str | Path, names: list[str] | None = None) -> list[Task]:
    """Tasks of a SuperNI-CL folder in the order of its ``order.txt`` (or sorted folder names)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise TaskDataError(f"{d}: benchmark folder not found")
    order_file = d / "order.txt"
    order = (
        [ln.strip() for ln in order_file.read_text().splitlines() if ln.strip()]
        if order_file.exists()
        else sorted(c.name for c in d.iterdir() if c.is_dir())
    )
    if names is not None:
        missing = [n for n in names if n not in order]
        if missing:
            raise TaskDataError(f"{d}: unknown task(s) {missing}")
        order = names
    return load_tasks([d / n for n in order])
