"""The benchmark's persistent caches (see_ray/tools/eval_cache.py): decisions and answers keyed by adapter
content, query and context, kept in an SQLite store across processes; trained adapters by training key."""

from __future__ import annotations

import shutil

import pytest

from see_ray.core.expert import SEEModel
from see_ray.core.model import fingerprint
from see_ray.core.rehearsal import RehearsalBuffer, reconstruct
from see_ray.core.routing import accepts
from see_ray.tools.eval_cache import AdapterCache, CachedBackend, Store, adapter_key, model_context, train_key

from support import fake_adapter

MAX_NEW = 8


class Counted:
    """A SEEModel whose decide / generate calls are counted (the wrapped model does the work)."""

    def __init__(self, model: SEEModel):
        self.inner, self.calls = model, 0
        self.adapters = model.adapters
        self.load_adapter = model.load_adapter
        self.model_path, self.cfg, self.tokenizer, self.device = model.model_path, model.cfg, model.tokenizer, model.device

    def decide(self, *a, **kw):
        self.calls += 1
        return self.inner.decide(*a, **kw)

    def generate(self, *a, **kw):
        self.calls += 1
        return self.inner.generate(*a, **kw)

    def decide_and_generate(self, *a, **kw):
        self.calls += 1
        return self.inner.decide_and_generate(*a, **kw)


@pytest.fixture(scope="module")
def plain(tiny_cfg, see_expert1) -> SEEModel:
    m = SEEModel(tiny_cfg)
    m.load_adapter("e1", see_expert1["path"])
    return m


@pytest.fixture
def queries(two_tasks) -> list:
    qs = [t.query(x) for t in two_tasks for x in t.test[:6]]
    return qs + qs[:3]  # repeated queries are answered like the others


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


# -- adapter keys -------------------------------------------------------------------------------------------------
def test_adapter_key_follows_content_not_location(tmp_path):
    a = fake_adapter(tmp_path / "a", seed=1)
    b = copy_adapter(a, tmp_path / "elsewhere" / "b")
    assert adapter_key(a) == adapter_key(b)
    flip_a_byte(b / "adapter_model.safetensors")
    assert adapter_key(a) != adapter_key(b)
    assert adapter_key(fake_adapter(tmp_path / "c", seed=2)) != adapter_key(a)


def test_adapter_key_of_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        adapter_key(tmp_path / "nope")


# -- the store ----------------------------------------------------------------------------------------------------
def test_store_round_trip_across_connections(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    with Store(path) as s:
        s.put_many({"a": 0.25, "b": "text", "c": None, "d": [1, {"x": 2}]})
        s.put_many({"a": 0.5})
        reader = Store(path)  # a second connection (another process) sees what was committed
        assert reader.get_many(["a", "b", "c", "d", "missing"]) == {"a": 0.5, "b": "text", "c": None, "d": [1, {"x": 2}]}
        reader.close()
    with Store(path) as s:
        assert len(s) == 4
        assert s.get_many([]) == {}
        keys = [f"k{i}" for i in range(1200)]  # more keys than one SELECT binds
        s.put_many({k: i for i, k in enumerate(keys)})
        assert s.get_many(keys) == {k: i for i, k in enumerate(keys)}


# -- decisions and answers ----------------------------------------------------------------------------------------
def test_cached_results_equal_the_model_and_persist_across_processes(tmp_path, tiny_cfg, plain, see_expert1, queries):
    """One backend computes and stores; a second one, on a fresh model and the same store file (as another
    process would), computes nothing and returns the same values, for a copy of the adapter under another name."""
    ref_p = plain.decide(queries, "e1")
    ref_a = plain.generate(queries, "e1", MAX_NEW, after_accept=True)
    ref_base = plain.generate(queries, None, MAX_NEW)
    thr = sorted(ref_p)[len(ref_p) // 2]  # about half accepted

    ctx = model_context(plain)
    b1 = CachedBackend(plain, Store(tmp_path / "c.sqlite"), ctx)
    p = b1.decide(queries, "e1")
    assert p == pytest.approx(ref_p, abs=1e-5)
    assert b1.generate(queries, "e1", MAX_NEW, after_accept=True) == ref_a
    assert b1.generate(queries, None, MAX_NEW) == ref_base
    probs, answers = b1.decide_and_generate(queries, "e1", thr, MAX_NEW)
    assert probs == p
    assert answers == [a if accepts(pa, thr) else None for pa, a in zip(p, ref_a)]
    assert any(a is not None for a in answers) and None in answers
    distinct = len(set(queries))
    assert b1.stats["decide"]["misses"] == distinct and b1.stats["generate"]["misses"] == 2 * distinct
    assert b1.stats["decide"]["hits"] == distinct  # decide_and_generate's decisions came from memory
    b1.store.close()

    fresh = Counted(SEEModel(tiny_cfg))
    b2 = CachedBackend(fresh, Store(tmp_path / "c.sqlite"), model_context(fresh))
    b2.load_adapter("same-weights", copy_adapter(see_expert1["path"], tmp_path / "copy"))
    assert b2.decide(queries, "same-weights") == p
    assert b2.generate(queries, "same-weights", MAX_NEW, after_accept=True) == ref_a
    assert b2.generate(queries, None, MAX_NEW) == ref_base
    assert b2.decide_and_generate(queries, "same-weights", thr, MAX_NEW) == (probs, answers)
    assert b2.misses == 0 and fresh.calls == 0
    assert b2.stats["decide"]["disk_hits"] == distinct and b2.stats["generate"]["disk_hits"] == 2 * distinct
    b2.store.close()


def test_a_changed_adapter_is_computed_anew(tmp_path, plain, see_expert1, queries):
    changed = copy_adapter(see_expert1["path"], tmp_path / "changed")
    meta = changed / "see_meta.json"
    meta.write_text(meta.read_text() + " ")  # one byte more, the weights untouched: still a new key
    model = Counted(plain)
    b = CachedBackend(model, Store(tmp_path / "c.sqlite"), {"v": 1})
    b.decide(queries, "e1")
    b.load_adapter("e1-changed", changed)
    assert b.content_key("e1-changed") != b.content_key("e1")
    b.decide(queries, "e1-changed")
    assert b.stats["decide"]["misses"] == 2 * len(set(queries)) and model.calls == 2


def test_context_and_generation_settings_are_part_of_the_key(tmp_path, plain, queries):
    store = Store(tmp_path / "c.sqlite")
    qs = queries[:2]
    first = CachedBackend(plain, store, {"model": "a", "max_prompt_tokens": 64})
    first.decide(qs, "e1")
    first.generate(qs, "e1", MAX_NEW, after_accept=True)

    same = CachedBackend(plain, store, {"max_prompt_tokens": 64, "model": "a"})  # key order does not matter
    same.decide(qs, "e1")
    same.generate(qs, "e1", MAX_NEW, after_accept=True)
    assert same.misses == 0

    other = CachedBackend(plain, store, {"model": "b", "max_prompt_tokens": 64})
    other.decide(qs, "e1")
    assert other.stats["decide"]["misses"] == 2
    same.generate(qs, "e1", MAX_NEW - 1, after_accept=True)
    same.generate(qs, "e1", MAX_NEW, after_accept=False)
    assert same.stats["generate"]["misses"] == 4
    store.close()


def test_model_context_names_the_base_model(plain, tiny_model_path, tiny_cfg):
    ctx = model_context(plain)
    assert ctx["model"] == fingerprint(tiny_model_path)
    assert ctx["max_prompt_tokens"] == tiny_cfg.model.max_prompt_tokens
    assert ctx["indicators"]["accept"] == tiny_cfg.indicators.accept


# -- trained adapters ---------------------------------------------------------------------------------------------
def test_adapter_cache_round_trip(tmp_path):
    cache = AdapterCache(tmp_path / "cache")
    src = fake_adapter(tmp_path / "src", seed=3)
    assert cache.get("k1") is None
    got = cache.put("k1", src)
    assert cache.get("k1") == got == tmp_path / "cache" / "k1"
    assert adapter_key(got) == adapter_key(src)
    assert cache.put("k1", fake_adapter(tmp_path / "other", seed=4)) == got  # the first entry is kept
    assert adapter_key(got) == adapter_key(src)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1"]  # no temporary folders left


def test_adapter_cache_ignores_incomplete_folders(tmp_path):
    cache = AdapterCache(tmp_path / "cache")
    half = tmp_path / "cache" / "k2"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    assert cache.get("k2") is None
    assert cache.put("k2", fake_adapter(tmp_path / "src", seed=5)) == half
    assert cache.get("k2") == half and (half / "adapter_config.json").is_file()
    with pytest.raises(ValueError):
        cache.put("k3", tmp_path / "cache" / "nothing-here")
    with pytest.raises(ValueError):
        cache.get("../escape")


def test_train_key_changes_with_every_input(two_tasks, pool, tiny_cfg):
    examples = reconstruct(two_tasks[0], RehearsalBuffer.empty(), pool, tiny_cfg.rehearsal)
    config = {"training": tiny_cfg.training.model_dump(), "lora": tiny_cfg.lora.model_dump()}
    key = train_key(examples, config, None, "m")
    assert train_key(list(examples), dict(config), None, "m") == key
    assert train_key([e.to_dict() for e in examples], config, None, "m") == key
    assert train_key(examples[:-1], config, None, "m") != key
    assert train_key(examples[::-1], config, None, "m") != key
    changed = {**config, "training": {**config["training"], "steps": 7}}
    assert train_key(examples, changed, None, "m") != key
    assert train_key(examples, config, "init", "m") != key
    assert train_key(examples, config, None, "other-model") != key
