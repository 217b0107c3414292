"""Expert runtime on the tiny model with a really trained adapter: decide, decide_and_generate, generate,
and the adapter-folder checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from see_ray.core.expert import AdapterError, SEEModel, check_adapter_folder, resolve_device
from see_ray.core.prompts import Query

MAX_NEW = 6


@pytest.fixture(scope="module")
def model(tiny_cfg, tiny_model_path, see_expert1):
    m = SEEModel(tiny_cfg, tiny_model_path, batch_size=16)
    m.load_adapter("e1", see_expert1["path"])
    return m


@pytest.fixture(scope="module")
def queries(two_tasks, pool):
    """Mixed lengths (so that left padding matters) and mixed owners (so that decisions differ)."""
    arith, shout = two_tasks
    return (
        [arith.query(x) for x in arith.test[:5]]
        + [shout.query(x) for x in shout.test[:4]]
        + list(pool[:5])
        + [Query(arith.test[0].input)]  # input-only: a much shorter prompt
    )


# -- decide -----------------------------------------------------------------------------------------
def test_decide_gives_probabilities(model, queries, two_tasks):
    p = model.decide(queries, "e1")
    assert len(p) == len(queries)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in p)
    # the adapter was trained on arithmetic vs the general pool: it tells them apart
    assert min(p[:5]) > 0.5, p[:5]
    assert max(p[9:14]) < 0.5, p[9:14]


def test_decide_batched_equals_one_by_one(model, queries):
    batched = model.decide(queries, "e1")
    single = [model.decide([q], "e1")[0] for q in queries]
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, abs=1e-4)
    old = model.batch_size
    try:
        model.batch_size = 3  # several chunks, each sorted by length, results back in input order
        chunked = model.decide(queries, "e1")
    finally:
        model.batch_size = old
    for b, c in zip(batched, chunked):
        assert b == pytest.approx(c, abs=1e-4)


def test_decide_depends_on_the_adapter(model, queries):
    """The same p(ACCEPT) read from the base model (no adapter) differs: the decision is the adapter's."""
    with torch.inference_mode(), model._use(None) as base:
        p_base = []
        for q in queries:
            logits = base(input_ids=torch.tensor([model.encoder.encode_query(q)])).logits[0, -1]
            p_base.append(torch.sigmoid(logits[model.encoder.accept_id] - logits[model.encoder.reject_id]).item())
    p_expert = model.decide(queries, "e1")
    assert max(abs(a - b) for a, b in zip(p_expert, p_base)) > 0.5, (p_expert, p_base)


def test_unknown_adapter(model, queries):
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        model.decide(queries[:1], "nope")


# -- decide_and_generate -----------------------------------------------------------------------------
def test_threshold_zero_reuses_cache_and_equals_recompute(model, queries, monkeypatch):
    """Threshold 0: every row continues from the decide pass's KV cache, and the answers are the ones generated
    from scratch. Each answer is at most MAX_NEW generated tokens: counted on the token ids the decode loop
    produced (a decode -> encode round trip is not length-preserving in BPE)."""
    runs: list[list[torch.Tensor]] = []  # each _decode call's steps: one [rows] tensor of token ids per step
    real_decode = model._decode

    def recording_decode(*args, **kw):
        steps: list[torch.Tensor] = []
        runs.append(steps)
        for step in real_decode(*args, **kw):
            steps.append(step)
            yield step

    monkeypatch.setattr(model, "_decode", recording_decode)
    probs, answers = model.decide_and_generate(queries, "e1", 0.0, MAX_NEW)
    generated = [torch.stack(steps, dim=1) for steps in runs]  # [rows, steps] per chunk of the batch
    monkeypatch.undo()
    recomputed = model.generate(queries, "e1", MAX_NEW, after_accept=True)
    assert all(a is not None for a in answers)
    assert answers == recomputed
    assert probs == pytest.approx(model.decide(queries, "e1"), abs=1e-5)
    assert any(a for a in answers)  # not all empty strings
    assert sum(ids.shape[0] for ids in generated) == len(queries)
    assert all(ids.shape[1] <= MAX_NEW for ids in generated)
    texts = [t.strip() for ids in generated for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert sorted(texts) == sorted(answers)  # the answers are those ids (rows come in length order)


def test_threshold_gates_answers(model, queries):
    probs = model.decide(queries, "e1")
    thr = sorted(probs)[len(probs) // 2]  # about half pass: accepted and rejected rows in one batch
    p2, answers = model.decide_and_generate(queries, "e1", thr, MAX_NEW)
    recomputed = model.generate(queries, "e1", MAX_NEW, after_accept=True)
    passed = [i for i, p in enumerate(p2) if p >= thr]
    assert 0 < len(passed) < len(queries)
    for i, (p, a) in enumerate(zip(p2, answers)):
        if p >= thr:
            assert a == recomputed[i], i  # the cache rows kept for generation are the right ones
        else:
            assert a is None


def test_unreachable_threshold_and_none_give_no_answers(model, queries):
    probs, answers = model.decide_and_generate(queries, "e1", 1.5, MAX_NEW)
    assert answers == [None] * len(queries) and len(probs) == len(queries)
    probs2, answers2 = model.decide_and_generate(queries, "e1", None, MAX_NEW)
    assert answers2 == [None] * len(queries)
    assert probs2 == pytest.approx(probs, abs=1e-6)


def test_stream_decides_then_streams_the_same_answer(model, queries):
    """SEEModel.stream (Serve's token streaming) = decide_and_generate on a batch of one: p first, then the
    answer's pieces if accepted, nothing if rejected."""
    probs = model.decide(queries, "e1")
    thr = sorted(probs)[len(probs) // 2]
    seen = set()
    for q in queries:
        p, answers = model.decide_and_generate([q], "e1", thr, MAX_NEW)
        items = list(model.stream(q, "e1", thr, MAX_NEW))
        assert items[0]["p"] == pytest.approx(p[0], abs=1e-6)
        if p[0] >= thr:
            assert "".join(i["text"] for i in items if "text" in i) == items[-1]["answer"] == answers[0]
        else:
            assert len(items) == 1 and answers[0] is None
        seen.add(p[0] >= thr)
    assert seen == {True, False}


def test_indicators_kept_out_of_expert_answers(model, queries, monkeypatch):
    """An expert that would go on emitting ' accept' after ACCEPT (seen in the 10-task run: 'accept accept ...')
    answers with other tokens when ``indicators.keep_out_of_answers`` is on (the default), in the batched, the
    recomputed and the streamed path alike; with it off, the same model answers the indicator over and over."""
    import contextlib

    accept_id = model.encoder.accept_id
    real_use = model._use

    @contextlib.contextmanager
    def favours_accept(adapter):
        with real_use(adapter) as m:
            def fwd(*a, **kw):
                out = m(*a, **kw)
                out.logits[:, -1, accept_id] = 1e4  # the indicator is every step's best token
                return out
            yield fwd

    monkeypatch.setattr(model, "_use", favours_accept)
    qs = queries[:3]
    on = model.decide_and_generate(qs, "e1", 0.0, MAX_NEW)[1]
    assert on == model.generate(qs, "e1", MAX_NEW, after_accept=True)
    assert on[0] == list(model.stream(qs[0], "e1", 0.0, MAX_NEW))[-1]["answer"]
    for a in on:
        assert "accept" not in a.split() and "reject" not in a.split(), on
    ind = model.cfg.indicators
    monkeypatch.setattr(ind, "keep_out_of_answers", False)
    off = model.decide_and_generate(qs, "e1", 0.0, MAX_NEW)[1]
    assert off == [" ".join(["accept"] * MAX_NEW)] * len(qs)


# -- generate ----------------------------------------------------------------------------------------
def test_base_generate_without_any_adapter(tiny_cfg, tiny_model_path, model, queries):
    fresh = SEEModel(tiny_cfg, tiny_model_path)
    assert fresh.peft is None and fresh.adapters == {}
    out = fresh.generate(queries[:4], adapter=None, max_new_tokens=MAX_NEW)
    assert len(out) == 4 and all(isinstance(a, str) for a in out)
    # with adapters loaded, adapter=None must still be the plain base model
    assert model.generate(queries[:4], adapter=None, max_new_tokens=MAX_NEW) == out
    assert model.generate(queries[:4], "e1", MAX_NEW, after_accept=True) != out


def test_reloading_an_adapter_under_the_same_name(model, see_expert1, queries):
    before = model.decide(queries[:3], "e1")
    model.load_adapter("e1", see_expert1["path"])
    assert model.decide(queries[:3], "e1") == pytest.approx(before, abs=1e-6)
    assert list(model.adapters) == ["e1"]


# -- adapter folder checks ---------------------------------------------------------------------------
@pytest.fixture
def adapter_copy(tmp_path, see_expert1):
    dst = tmp_path / "adapter"
    shutil.copytree(see_expert1["path"], dst)
    return dst


def test_good_adapter_folder(adapter_copy):
    assert check_adapter_folder(adapter_copy) == adapter_copy


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(AdapterError) as ei:
        check_adapter_folder(tmp_path / "gone")
    assert str(tmp_path / "gone") in str(ei.value) and "does not exist" in str(ei.value)


def test_missing_adapter_config(adapter_copy):
    (adapter_copy / "adapter_config.json").unlink()
    with pytest.raises(AdapterError) as ei:
        check_adapter_folder(adapter_copy)
    assert str(adapter_copy) in str(ei.value) and "adapter_config.json" in str(ei.value)


def test_invalid_adapter_config(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON") as ei:
        check_adapter_folder(adapter_copy)
    assert str(adapter_copy / "adapter_config.json") in str(ei.value)


def test_corrupt_safetensors(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").write_bytes(b"\x00garbage\xff" * 100)
    with pytest.raises(AdapterError) as ei:
        check_adapter_folder(adapter_copy)
    msg = str(ei.value)
    assert str(adapter_copy / "adapter_model.safetensors") in msg and "corrupt" in msg


def test_truncated_safetensors(adapter_copy):
    f = adapter_copy / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(AdapterError, match="corrupt"):
        check_adapter_folder(adapter_copy)


def test_pickle_only_adapter_is_refused(adapter_copy, model):
    (adapter_copy / "adapter_model.safetensors").rename(adapter_copy / "adapter_model.bin")
    with pytest.raises(AdapterError) as ei:
        check_adapter_folder(adapter_copy)
    msg = str(ei.value)
    assert str(adapter_copy) in msg and "pickled .bin adapters are refused" in msg
    with pytest.raises(AdapterError):  # and load_adapter checks before peft ever sees the folder
        model.load_adapter("pickled", adapter_copy)
    assert "pickled" not in model.adapters


def test_adapter_config_is_json_of_a_peft_lora(see_expert1):
    conf = json.loads((check_adapter_folder(see_expert1["path"]) / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 16


def test_model_device_resolution(model):
    """model.device: auto is cuda only where a GPU is visible; asking for cuda without one fails clearly. The
    model and every input tensor are on that device (CPU here; the GPU run of docs/results.md is the other case)."""
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want and resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no GPU"):
            resolve_device("cuda")
    assert model.device.type == want and next(model.base.parameters()).device.type == want
    ids, mask = model._left_pad([[1, 2, 3], [4]])
    assert ids.device.type == want and mask.device.type == want
