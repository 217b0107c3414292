"""A base model built around shared, read-only weights (shared_weights.build_around) is the same model as a
private copy: identical decisions, KV-cache generation and fallback answers with a trained adapter; tied
embeddings, buffers and dtypes survive the trip through numpy. No Ray here: the arrays are made read-only
like the plasma-backed ones a replica gets (the Ray path is tested in cluster/test_serve.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from see_ray.config import SEEConfig
from see_ray.core.expert import SEEModel
from see_ray.core.model import load_base_model
from see_ray.serve.shared_weights import build_around, mapping_of, pss_mib, to_arrays

from support import tiny_overrides

MAX_NEW = 6


def read_only_arrays(cfg, path: str) -> dict:
    """A separately loaded copy's parameters as read-only arrays (what ray.get returns from plasma)."""
    model, _ = load_base_model(cfg.model, path)
    shared = to_arrays(model)
    for a in shared["params"].values():
        a.setflags(write=False)
    return shared


@pytest.fixture(scope="module")
def pair(tiny_cfg, tiny_model_path, see_expert1):
    """(private model, shared model, the shared arrays), both with the trained adapter e1."""
    shared = read_only_arrays(tiny_cfg, tiny_model_path)
    private = SEEModel(tiny_cfg, tiny_model_path)
    built = SEEModel(tiny_cfg, tiny_model_path, base=build_around(shared, tiny_cfg.model, tiny_model_path))
    for m in (private, built):
        m.load_adapter("e1", see_expert1["path"])
    return private, built, shared


@pytest.fixture(scope="module")
def queries(two_tasks, pool):
    arith, shout = two_tasks
    return [arith.query(x) for x in arith.test[:4]] + [shout.query(x) for x in shout.test[:3]] + list(pool[:4])


def test_parameters_are_the_shared_arrays_not_copies(pair):
    _, built, shared = pair
    base = built.base
    # peft wrapped the base's linear layers (``...q_proj.base_layer.weight``) and added its own private weights
    params = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if ".lora_" not in n}
    assert set(params) == set(shared["params"])
    for name, p in params.items():
        assert p.data_ptr() == shared["params"][name].ctypes.data, name
        assert not p.requires_grad
    # SmolLM2 (and the tiny model) tie lm_head to embed_tokens: shipped once, tied again after assignment
    assert base.config.tie_word_embeddings
    assert "lm_head.weight" not in shared["params"]
    assert base.lm_head.weight.data_ptr() == shared["params"]["model.embed_tokens.weight"].ctypes.data
    # buffers (rotary inv_freq) are real and equal to the private model's, nothing left on the meta device
    private = pair[0].base
    for (n1, b1), (n2, b2) in zip(private.named_buffers(), base.named_buffers()):
        assert n1 == n2 and not b2.is_meta and torch.equal(b1, b2), n1
    assert base.generation_config.to_dict() == private.generation_config.to_dict()


def test_decide_and_generate_identical_to_private(pair, queries):
    private, built, _ = pair
    for thr in (None, 0.0, 0.5):
        p1, a1 = private.decide_and_generate(queries, "e1", thr, MAX_NEW)
        p2, a2 = built.decide_and_generate(queries, "e1", thr, MAX_NEW)
        assert p1 == p2 and a1 == a2, thr
    # the decisions are not trivial: some accept, some reject at 0.5
    assert 0 < sum(a is not None for a in a1) < len(queries)
    assert private.generate(queries, None, MAX_NEW) == built.generate(queries, None, MAX_NEW)


def test_shared_weights_stay_unwritten(pair, queries):
    _, built, shared = pair
    before = {n: a.copy() for n, a in shared["params"].items()}
    built.decide_and_generate(queries, "e1", 0.0, MAX_NEW)
    built.generate(queries, None, MAX_NEW)
    assert all(np.array_equal(before[n], a) for n, a in shared["params"].items())
    with pytest.raises(ValueError, match="read-only"):
        shared["params"]["model.embed_tokens.weight"][0, 0] = 1.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_other_dtypes_round_trip(tiny_model_path, dtype):
    """numpy has no bfloat16: its bits travel as int16 and are viewed back, bit for bit."""
    cfg = SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path, **{"model.dtype": dtype}))
    private, _ = load_base_model(cfg.model, tiny_model_path)
    shared = to_arrays(private)
    built, _ = build_around(shared, cfg.model, tiny_model_path)
    assert built.dtype == getattr(torch, dtype)
    for (n, a), (_, b) in zip(private.named_parameters(), built.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), n


def test_proc_readers_find_this_process_memory():
    a = np.ones(1 << 20, dtype=np.float32)  # 4 MiB, its own anonymous mapping
    m = mapping_of(os.getpid(), a.ctypes.data)
    assert m is not None and m["start"] <= a.ctypes.data < m["end"]
    assert m["rss_kib"] >= 4096 and "pss_kib" in m
    assert pss_mib(os.getpid()) > 4
