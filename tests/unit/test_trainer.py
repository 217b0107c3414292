"""The training loop's pieces (tokenize, collate, weighted loss) and short real in-process training runs."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from see_ray.config import SEEConfig
from see_ray.core.model import load_base_model
from see_ray.core.prompts import Query
from see_ray.core.rehearsal import Example, RehearsalBuffer, reconstruct
from see_ray.core.trainer import (
    IGNORE,
    META_FILE,
    collate,
    deepspeed_config,
    loss_positions,
    tokenize,
    train_adapter,
    weighted_loss,
    write_adapter_atomically,
)

from support import tiny_overrides

DEF = "Add the two numbers and answer with the sum only."
EXAMPLES = [
    Example(Query("17 + 25", DEF), "accept", "42", "arithmetic"),
    Example(Query("what is the weather like"), "reject", None, "general"),
    Example(Query("1 + 1", DEF), None, "2", "arithmetic"),
    Example(Query("a longer query with several words in it", "Some definition."), "accept", "A LONGER", "shout"),
]


# -- tokenize -----------------------------------------------------------------------------------------
def test_tokenize_masks_prompt_and_weights_indicator(encoder):
    rows = tokenize(EXAMPLES, encoder, max_target_tokens=8, indicator_weight=30.0)
    assert len(rows) == len(EXAMPLES)
    for ex, row in zip(EXAMPLES, rows):
        prompt = encoder.encode_query(ex.query)
        target = encoder.encode_target(ex.indicator, ex.answer, 8)
        n = len(prompt)
        assert row["input_ids"] == prompt + target
        assert len(row["labels"]) == len(row["weights"]) == len(row["input_ids"])
        assert row["labels"][:n] == [IGNORE] * n  # the prompt carries no loss
        assert row["labels"][n:] == target
        assert row["weights"][:n] == [0.0] * n
        if ex.indicator is None:
            assert row["weights"][n:] == [1.0] * len(target)
        else:
            assert row["weights"][n] == 30.0  # the indicator position
            assert row["weights"][n + 1 :] == [1.0] * (len(target) - 1)
    accept, reject = rows[0], rows[1]
    assert accept["labels"][len(encoder.encode_query(EXAMPLES[0].query))] == encoder.accept_id
    assert reject["labels"][-1] == encoder.reject_id and sum(w > 0 for w in reject["weights"]) == 1


def test_tokenize_default_weight_is_plain_sft(encoder):
    rows = tokenize(EXAMPLES, encoder, max_target_tokens=8)
    for row in rows:
        assert row["weights"] == [0.0 if lab == IGNORE else 1.0 for lab in row["labels"]]


# -- collate ------------------------------------------------------------------------------------------
def test_collate_right_pads(encoder):
    rows = tokenize(EXAMPLES, encoder, max_target_tokens=8, indicator_weight=5.0)
    b = collate(rows, pad_id=encoder.pad_id)
    n = max(len(r["input_ids"]) for r in rows)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == b["weights"].shape
    assert b["input_ids"].shape == (len(rows), n)
    assert b["input_ids"].dtype == torch.long and b["weights"].dtype == torch.float32
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        assert b["input_ids"][i, :k].tolist() == r["input_ids"]  # content left-aligned
        assert b["labels"][i, :k].tolist() == r["labels"]
        assert b["weights"][i, :k].tolist() == r["weights"]
        assert b["attention_mask"][i, :k].tolist() == [1] * k
        assert (b["input_ids"][i, k:] == encoder.pad_id).all()  # padding on the right
        assert (b["labels"][i, k:] == IGNORE).all()
        assert (b["attention_mask"][i, k:] == 0).all() and (b["weights"][i, k:] == 0).all()
    assert b["attention_mask"].sum().item() == sum(len(r["input_ids"]) for r in rows)


# -- weighted loss ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    cfg = SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path))
    model, _ = load_base_model(cfg.model, tiny_model_path)
    return model


def test_weighted_loss_equals_hf_loss_with_unit_weights(encoder, tiny_model):
    rows = tokenize(EXAMPLES, encoder, max_target_tokens=8, indicator_weight=1.0)
    b = collate(rows, encoder.pad_id)
    with torch.no_grad():
        out = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        ours = weighted_loss(out.logits, b["labels"], b["weights"])
    assert out.loss.item() > 1.0  # a random model: a real, non-trivial loss
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_loss_on_kept_logits_equals_full_loss(encoder, tiny_model):
    """The training loop asks the model for logits at the target positions only; the loss must not change."""
    rows = tokenize(EXAMPLES, encoder, max_target_tokens=8, indicator_weight=3.0)
    b = collate(rows, encoder.pad_id)
    pos = loss_positions(b["labels"])
    assert 0 < len(pos) < b["input_ids"].shape[1] - 1  # fewer logits than positions, yet every target covered
    with torch.no_grad():
        full = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        kept = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=pos).logits
    assert kept.shape[1] == len(pos)
    assert weighted_loss(kept, b["labels"], b["weights"], pos).item() == pytest.approx(
        weighted_loss(full, b["labels"], b["weights"]).item(), rel=1e-5
    )


def test_weighted_loss_weights_tokens(encoder, tiny_model):
    rows = tokenize(EXAMPLES[:1], encoder, max_target_tokens=8, indicator_weight=7.0)
    b = collate(rows, encoder.pad_id)
    with torch.no_grad():
        logits = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss = weighted_loss(logits, b["labels"], b["weights"])
    # by hand: token t is predicted at position t-1
    lp = torch.log_softmax(logits[0].float(), -1)
    labels, w = b["labels"][0], b["weights"][0]
    num = den = 0.0
    for t in range(1, labels.shape[0]):
        if labels[t] != IGNORE:
            num += -lp[t - 1, labels[t]].item() * w[t].item()
            den += w[t].item()
    assert den == 7.0 + (len(rows[0]["input_ids"]) - len(encoder.encode_query(EXAMPLES[0].query)) - 1)
    assert loss.item() == pytest.approx(num / den, rel=1e-5)


# -- DeepSpeed config ---------------------------------------------------------------------------------
def test_deepspeed_config_fills_batch_optimizer_and_cpu_adam(tmp_path):
    cfg = SEEConfig.from_yaml(None, ["training.deepspeed={zero_optimization: {stage: 1}, optimizer: {type: AdamW, params: {lr: 0.5}}}"])
    ds = deepspeed_config(cfg.training, micro_batch=4, world_size=2, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"] == {"stage": 1}  # the user's value wins
    assert ds["optimizer"]["params"]["lr"] == 0.5 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is False  # no DeepSpeed bf16 on CPU
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 999, "gradient_clipping": 0.5}))
    ds2 = deepspeed_config(cfg.training.model_copy(update={"deepspeed": str(p)}), 8, 1, on_gpu=False)
    assert ds2["train_batch_size"] == 8 and ds2["gradient_clipping"] == 0.5
    assert ds2["zero_optimization"] == {"stage": 2} and ds2["optimizer"]["params"]["lr"] == cfg.training.lr


def test_write_adapter_atomically_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "adapters" / "a1"

    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_adapter_atomically(boom, out)
    assert not out.exists() and list((tmp_path / "adapters").iterdir()) == []
    write_adapter_atomically(lambda tmp: (tmp / "v").write_text("1"), out)
    write_adapter_atomically(lambda tmp: (tmp / "v").write_text("2"), out)  # replaces the old one
    assert (out / "v").read_text() == "2" and len(list((tmp_path / "adapters").iterdir())) == 1


# -- real training ------------------------------------------------------------------------------------
def _examples(two_tasks, pool, cfg):
    return reconstruct(two_tasks[0], RehearsalBuffer.empty(), pool, cfg.rehearsal)


def _check_adapter(out, tiny_model_path, encoder, meta_name):
    from peft import PeftModel

    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()
    assert not (out / "adapter_model.bin").exists()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["name"] == meta_name and meta["training"]["steps"] > 0
    base, _ = load_base_model(SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path)).model, tiny_model_path)
    ids = torch.tensor([encoder.encode_query(Query("17 + 25", DEF))])
    with torch.no_grad():
        before = base(input_ids=ids).logits[0, -1]
        peft_model = PeftModel.from_pretrained(base, str(out))
        after = peft_model(input_ids=ids).logits[0, -1]
    assert not torch.allclose(before, after, atol=1e-4)  # the trained adapter changes the output
    return meta


def test_train_adapter_writes_a_loadable_adapter_and_learns(tmp_path, tiny_model_path, two_tasks, pool, encoder):
    cfg = SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path, **{"training.steps": 12, "training.log_every": 4}))
    out = tmp_path / "expert-1"
    res = train_adapter(_examples(two_tasks, pool, cfg), cfg, tiny_model_path, out, meta={"name": "expert-1"})
    assert res["steps"] == 12 and res["workers"] == 1 and res["deepspeed"] is False
    # what it actually trained with, read back from the run (docs/results.md's GPU run reads the same fields)
    assert res["device"] == "cpu" and res["backend"] is None and res["optimizer"] == "AdamW" and res["bf16"] is False
    assert res["examples"] == len(_examples(two_tasks, pool, cfg))
    assert res["tokens"] > 0 and res["tokens_per_s"] > 0
    assert res["final_loss"] < res["first_loss"], res  # it learns
    meta = _check_adapter(out, tiny_model_path, encoder, "expert-1")
    assert meta["training"]["final_loss"] == pytest.approx(res["final_loss"])
    assert [p.name for p in tmp_path.iterdir()] == ["expert-1"]  # no temporary folder left behind


@pytest.fixture
def single_process_env(monkeypatch):
    """The env vars DeepSpeed's one-process group sets, restored afterwards; the group is torn down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"), ("LOCAL_RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(k, v)
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def test_train_adapter_with_deepspeed_zero2_in_process(
    tmp_path, tiny_model_path, two_tasks, pool, encoder, single_process_env, monkeypatch
):
    # DeepSpeed would JIT-compile its CPU shared-memory op here (46 s on 2 cores) although training never uses it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch-extensions"))
    cfg = SEEConfig.from_yaml(
        None,
        tiny_overrides(
            tiny_model_path,
            **{"training.steps": 6, "training.log_every": 3, "training.deepspeed": "{zero_optimization: {stage: 2}}"},
        ),
    )
    out = tmp_path / "expert-ds"
    res = train_adapter(_examples(two_tasks, pool, cfg), cfg, tiny_model_path, out, meta={"name": "expert-ds"})
    assert res["deepspeed"] is True and res["steps"] == 6 and res["workers"] == 1
    assert res["device"] == "cpu" and res["backend"] == "gloo" and res["bf16"] is False
    assert res["optimizer"].startswith("DeepSpeedZeroOptimizer"), res["optimizer"]  # ZeRO-2 wrapping torch's Adam
    assert res["final_loss"] < res["first_loss"], res
    _check_adapter(out, tiny_model_path, encoder, "expert-ds")
    import deepspeed.ops

    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert not (tmp_path / "torch-extensions" / "deepspeed_shm_comm").exists()
