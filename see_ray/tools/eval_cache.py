"""Results of the benchmark that outlive a run: experts' decisions and answers, and trained adapters, kept on
disk under keys made of everything that determines them.

What is cached
- Decisions and answers (``CachedBackend`` over a ``Store``): p(ACCEPT) of an adapter for a query, and the
  answer an adapter (or the base model) generates for it. Computed once per key, kept in memory for the
  process and, with a ``Store``, in an SQLite file read by every later run and process.
- Trained adapters (``AdapterCache``): an adapter folder per training key, so that a training whose inputs
  were all seen before is not run again.

The keys (sha256, hex)
- ``adapter_key(path)``: the adapter folder's content, every file's relative name and bytes. The same weights
  give the same key wherever they lie; a name given to an adapter plays no part.
- A decision: ("decide", context, adapter content key, query definition, query input). The base model has
  the adapter key ``"base"``. ``context`` is a dict the caller passes with everything else that changes a
  result: the base model's fingerprint, dtype and device, ``model.max_prompt_tokens``, the indicator tokens
  (``model_context`` builds it from a loaded ``SEEModel``).
- An answer: ("generate", context, adapter content key, max_new_tokens, after_accept, definition, input).
- ``train_key``: the training examples (``Example.to_dict``, in order), the training-relevant config (a dict
  the caller passes), the init adapter's key and the base model's key.

Why this is correct
An adapter never changes after it is trained (a retrained one is a new folder with new content, hence a new
key), the base model is frozen, and decoding is greedy: a decision or answer is a function of its key's
parts alone. Values of one key computed in different batches differ only by the floating-point noise of
padding; the first one computed is the one kept.

What invalidates it
Nothing has to be invalidated by hand: different adapter content, a different base model, prompt budget,
indicators, generation length or config gives different keys, and the old entries are simply not read again.
Delete the store file or the adapter cache folder to reclaim space. Something that changes results and is in
no key (a change of the decoding code, of the tokenizer's files when the caller's context does not cover
them) is the one case that needs a fresh store: pass a new ``context`` entry (e.g. a code version) or delete
the file.

Concurrency: the store is an SQLite file in WAL mode, for one writing process and any number of concurrent
readers, on a local filesystem (WAL does not work over NFS). ``AdapterCache.put`` renames a complete temporary
copy into place, so ``get`` never returns a half-written folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from see_ray.core.prompts import Query
from see_ray.core.routing import accepts

BASE_KEY = "base"  # the content key of "no adapter": the base model answers
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a complete PEFT adapter
SQL_VARIABLES = 500  # keys per SELECT: below SQLite's bound-parameter limit (999 before 3.32)


def _canonical(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no whitespace; non-JSON values (paths) as their str."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _sha256(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


# -- adapter identity -------------------------------------------------------------------------------------------
def adapter_key(path: str | Path) -> str:
    """sha256 of an adapter folder's content: every file's path relative to the folder and its bytes, in sorted
    order. Independent of where the folder lies and of file times."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter folder {root} does not exist")
    h = hashlib.sha256()
    for f in sorted((f for f in root.rglob("*") if f.is_file()), key=lambda f: f.relative_to(root).as_posix()):
        name = f.relative_to(root).as_posix().encode()
        # length prefixes: no two different folders hash the same byte stream
        h.update(len(name).to_bytes(8, "big") + name + f.stat().st_size.to_bytes(8, "big"))
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def model_context(model) -> dict:
    """The decision/answer context of a loaded ``SEEModel``: what, besides the adapter and the query, changes
    its results (the base weights, their dtype and device, the prompt budget, the indicators, the chat template
    the base model answers through)."""
    from see_ray.core.model import fingerprint

    cfg = model.cfg
    template = getattr(model.tokenizer, "chat_template", None)
    return {
        "model": fingerprint(model.model_path),
        "dtype": cfg.model.dtype,
        "device": model.device.type,
        "max_prompt_tokens": cfg.model.max_prompt_tokens,
        "indicators": cfg.indicators.model_dump(),
        "chat_template": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
    }


# -- the store --------------------------------------------------------------------------------------------------
class Store:
    """A persistent string -> JSON value map in one SQLite file (WAL mode: one writer, concurrent readers)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # timeout: wait for another process's write transaction instead of failing at once
        self._db = sqlite3.connect(str(self.path), timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; a power cut may lose the last writes (recomputed)
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The stored values of those ``keys`` that are in the store (absent keys are left out)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, Any] = {}
        for k in range(0, len(keys), SQL_VARIABLES):
            part = keys[k : k + SQL_VARIABLES]
            rows = self._db.execute(
                f"SELECT key, value FROM kv WHERE key IN ({','.join('?' * len(part))})", part
            ).fetchall()
            out.update((key, json.loads(value)) for key, value in rows)
        return out

    def put_many(self, items: dict[str, Any]) -> None:
        """Store every (key, JSON-serialisable value) pair, in one transaction (replacing equal keys)."""
        if not items:
            return
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in items.items()],
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- decisions and answers --------------------------------------------------------------------------------------
class CachedBackend:
    """The SEEModel interface the Router uses (``adapters``, ``load_adapter``, ``decide``, ``generate``,
    ``decide_and_generate``), computing each (adapter content, query, context) result once.

    Results are memoized in memory and, with a ``store``, read from and written to disk: one ``get_many`` for
    what memory lacks and one ``put_many`` of what was computed, per call. ``stats[op]`` counts, per call and
    per distinct query, the results found in memory (``hits``), found on disk (``disk_hits``) and computed by
    the model (``misses``), for op ``decide`` and ``generate``.
    """

    def __init__(self, model, store: Store | None = None, context: dict | None = None):
        self.model = model
        self.adapters = model.adapters  # name -> path, shared with the model (the Router reads it)
        self.store = store
        self.context = dict(context or {})
        self._context_key = _sha256(self.context)
        self._memo: dict[str, Any] = {}
        self._content: dict[str, tuple[str, str]] = {}  # adapter name -> (path it was keyed at, content key)
        self.stats = {op: {"hits": 0, "disk_hits": 0, "misses": 0} for op in ("decide", "generate")}

    @property
    def misses(self) -> int:
        """Results computed by the model so far (decisions and answers)."""
        return sum(s["misses"] for s in self.stats.values())

    def load_adapter(self, name: str, path) -> None:
        self.model.load_adapter(name, path)
        self._content[name] = (self.model.adapters[name], adapter_key(path))

    def content_key(self, adapter: str | None) -> str:
        """The content key of a loaded adapter (``BASE_KEY`` for None). Adapters loaded on the model directly
        are keyed at first use, and again if reloaded from another folder."""
        if adapter is None:
            return BASE_KEY
        if adapter not in self.model.adapters:
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {sorted(self.model.adapters)}")
        path = self.model.adapters[adapter]
        known = self._content.get(adapter)
        if known is None or known[0] != path:
            known = self._content[adapter] = (path, adapter_key(path))
        return known[1]

    def _key(self, op: str, *parts) -> str:
        return _sha256([op, self._context_key, *parts])

    def _cached(self, op: str, queries: Sequence[Query], keys: list[str], compute: Callable[[list[Query]], list]):
        """Each query's value under its key: from memory, else the store, else ``compute`` of the distinct
        queries still missing (in first-seen order)."""
        stats = self.stats[op]
        wanted = list(dict.fromkeys(k for k in keys if k not in self._memo))
        stats["hits"] += len(set(keys)) - len(wanted)
        if wanted and self.store is not None:
            found = self.store.get_many(wanted)
            self._memo.update(found)
            stats["disk_hits"] += len(found)
        miss = list(dict.fromkeys((q, k) for q, k in zip(queries, keys) if k not in self._memo))
        if miss:
            new = {k: v for (_, k), v in zip(miss, compute([q for q, _ in miss]))}
            self._memo.update(new)
            stats["misses"] += len(new)
            if self.store is not None:
                self.store.put_many(new)
        return [self._memo[k] for k in keys]

    def decide(self, queries: list[Query], adapter: str) -> list[float]:
        a = self.content_key(adapter)
        keys = [self._key("decide", a, q.definition, q.input) for q in queries]
        return self._cached("decide", queries, keys, lambda miss: self.model.decide(miss, adapter))

    def generate(self, queries: list[Query], adapter: str | None, max_new_tokens: int, after_accept: bool = False):
        a = self.content_key(adapter)
        keys = [self._key("generate", a, max_new_tokens, bool(after_accept), q.definition, q.input) for q in queries]
        return self._cached(
            "generate", queries, keys,
            lambda miss: self.model.generate(miss, adapter, max_new_tokens, after_accept=after_accept),
        )

    def decide_and_generate(self, queries, adapter, threshold, max_new_tokens):
        """Decisions, and for the queries accepted at ``threshold`` the answers after ACCEPT (None otherwise;
        ``threshold=None`` only decides)."""
        probs = self.decide(queries, adapter)
        answers: list[str | None] = [None] * len(queries)
        if threshold is not None:
            acc = [i for i, p in enumerate(probs) if accepts(p, threshold)]
            for i, a in zip(acc, self.generate([queries[i] for i in acc], adapter, max_new_tokens, True)):
                answers[i] = a
        return probs, answers


# -- trained adapters -------------------------------------------------------------------------------------------
def train_key(examples, config: dict, init_key: str | None, model_key: str) -> str:
    """sha256 of everything a training's result depends on: the examples in order (``Example`` objects or their
    ``to_dict()``), the training-relevant config, the init adapter's key (None: trained from scratch) and the
    base model's key."""
    return _sha256({
        "examples": [e.to_dict() if hasattr(e, "to_dict") else e for e in examples],
        "config": config,
        "init": init_key,
        "model": model_key,
    })


_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # one plain folder name, never a hidden temp folder


class AdapterCache:
    """Trained adapter folders by training key, under ``root/<key>``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _SAFE_KEY.fullmatch(key):
            raise ValueError(f"adapter cache key {key!r} is not a plain folder name")
        return self.root / key

    def get(self, key: str) -> Path | None:
        """The cached adapter folder of ``key``, or None when there is no complete one."""
        p = self._path(key)
        return p if (p / ADAPTER_CONFIG).is_file() else None

    def put(self, key: str, src_dir: str | Path) -> Path:
        """Copy the adapter folder ``src_dir`` to ``root/<key>`` atomically (a complete temporary copy beside it
        is renamed into place) and return it. If a complete entry is already there (another run put it first),
        that one is kept and returned."""
        src, dst = Path(src_dir), self._path(key)
        if not (src / ADAPTER_CONFIG).is_file():
            raise ValueError(f"{src}: not an adapter folder (no {ADAPTER_CONFIG})")
        if self.get(key) is not None:
            return dst
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            if dst.exists():  # not complete (no adapter_config.json): never handed out, safe to replace
                shutil.rmtree(dst)
            try:
                os.rename(tmp, dst)
            except OSError:
                if self.get(key) is None:  # lost no race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst
