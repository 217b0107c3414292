"""Training one LoRA adapter on the frozen base: the single training loop of the project.

``train_loop_per_worker(config)`` is both the in-process trainer (``train_adapter`` calls it directly) and
Ray Train's ``train_loop_per_worker`` (``see_ray/training/ray_train.py`` hands it to a TorchTrainer). Only three things
differ between the two, and they are explicit in ``config``:
- where examples come from: ``WorkerJob.examples`` (a list) or the Ray Data shard ``"train"``;
- how metrics and the finished adapter leave the worker: returned / written to ``output_dir``, or
  ``ray.train.report(metrics, checkpoint=...)``;
- the process group: DeepSpeed initialises a one-process gloo group in-process; TorchTrainer sets it up.

Loss is computed on the target tokens only (prompt tokens are masked with -100). Every worker runs exactly
``steps`` optimizer steps, cycling through its shard, so collective ops never wait on a worker that ran out
of data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from see_ray.config import SEEConfig, TrainConfig
from see_ray.config.train import WorkerJob
from see_ray.core.model import load_base_model
from see_ray.core.prompts import PromptEncoder
from see_ray.core.rehearsal import Example

log = logging.getLogger(__name__)

META_FILE = "see_meta.json"
IGNORE = -100  # label value ignored by the loss (prompt and padding positions)


# -- data ------------------------------------------------------------------------------------------------
def tokenize(
    examples: list[Example], encoder: PromptEncoder, max_target_tokens: int, indicator_weight: float = 1.0
) -> list[dict]:
    """Prompt ids + target ids per example, with labels masking the prompt and per-token loss weights."""
    rows = []
    for ex in examples:
        prompt = encoder.encode_query(ex.query)
        target = encoder.encode_target(ex.indicator, ex.answer, max_target_tokens)
        weights = [0.0] * len(prompt) + [1.0] * len(target)
        if ex.indicator is not None:
            weights[len(prompt)] = indicator_weight  # the first target token is the indicator
        rows.append({"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target, "weights": weights})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch (training never generates, so right padding is the simple choice)."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    weights = torch.zeros((len(rows), n), dtype=torch.float32)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
        weights[i, :k] = torch.tensor(r["weights"])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions whose next token is a target in some row of the batch: the only logits the loss
    reads. Targets are short (an indicator, a few answer tokens) next to their prompts, so asking the model for
    logits at these positions only (``logits_to_keep``) skips most of the output head over the 49k vocabulary and
    its float32 logits, with the same losses (docs/results.md, training throughput)."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy on target tokens, weighted per token (see TrainConfig.indicator_loss_weight).

    ``logits`` cover every position, or only ``positions`` (``loss_positions``) when given. With all weights 1
    this is exactly the usual token-mean SFT loss.
    """
    if positions is None:  # position t predicts token t + 1
        logits, labels, weights = logits[:, :-1], labels[:, 1:], weights[:, 1:]
    else:
        labels, weights = labels[:, positions + 1], weights[:, positions + 1]
    # Select the target positions first: log-softmax over the 49k vocabulary is a large share of a step, and
    # the prompt positions (most of them) would only be masked out afterwards.
    keep = labels != IGNORE
    ce = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    w = weights[keep]
    return (ce * w).sum() / w.sum().clamp(min=1e-9)


def _batches(rows: list[dict], micro_batch: int, seed: int):
    """Endless shuffled micro-batches over ``rows`` (a new permutation each pass)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order) - micro_batch + 1 if len(order) >= micro_batch else 1, micro_batch):
            yield [rows[j] for j in order[i : i + micro_batch]]


# -- model ----------------------------------------------------------------------------------------------
def build_trainable(cfg: SEEConfig, model_path: str, init_adapter: str | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, tok = load_base_model(cfg.model.model_copy(update={"dtype": "float32"}), model_path)
    if init_adapter:  # SeqFT / Replay continue the same adapter from stage to stage
        model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    else:
        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(cfg.training.seed)  # adapter init is random (lora_A): make it reproducible
        model = get_peft_model(base, lcfg)
    model.train()
    return model, tok


def deepspeed_config(tcfg: TrainConfig, micro_batch: int, world_size: int, on_gpu: bool) -> dict:
    """The user's DeepSpeed config (file or dict) with batch sizes, optimizer and precision filled in.

    Values the user set win, except batch sizes, which must agree with ``training.batch_size``. On CPU we
    force torch's Adam: DeepSpeed's fused CPU Adam is JIT-compiled on first use, which takes about a minute.
    """
    src = tcfg.deepspeed
    if isinstance(src, str):
        text = Path(src).read_text()
        import yaml

        ds = yaml.safe_load(text)  # YAML is a superset of JSON: one loader for both
        if not isinstance(ds, dict):
            raise ValueError(f"training.deepspeed: {src} must hold a mapping")
    else:
        ds = dict(src or {})
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch * world_size
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for k, v in (("lr", tcfg.lr), ("weight_decay", tcfg.weight_decay)):
        if params.get(k) in (None, "auto"):
            params[k] = v
    if not on_gpu:
        params["torch_adam"] = True
    if "scheduler" not in ds:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": tcfg.lr, "warmup_num_steps": max(1, tcfg.warmup_steps), "warmup_type": "linear"},
        }
    ds.setdefault("gradient_clipping", 1.0)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled") in (None, "auto"):
        bf16["enabled"] = bool(on_gpu and tcfg.bf16_autocast is not False)
    ds.setdefault("zero_optimization", {"stage": 2})
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    return ds


def use_bf16(tcfg: TrainConfig, device: torch.device) -> bool:
    """Resolve ``training.bf16_autocast`` (None = auto) for this device."""
    if tcfg.bf16_autocast is not None:
        return tcfg.bf16_autocast
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # native bf16 kernels, not emulation


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op, which training never calls.

    On CPU, DeepSpeed's communication backend compiles ``deepspeed_shm_comm`` when it is created (most of a
    minute of g++ on a fresh 2-core machine; cached afterwards under TORCH_EXTENSIONS_DIR), but only
    ``inference_all_reduce`` uses it: ZeRO's gradient all-reduce goes through torch.distributed (gloo). The op
    is skipped by marking it incompatible in DeepSpeed's probe of compatible ops, which the backend consults
    before building (``deepspeed.comm.torch.build_shm_op``); if that internal table moves in a later
    DeepSpeed, the op is simply built as before.
    """
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError, ImportError):
        pass


def _init_single_process_group() -> None:
    """DeepSpeed needs a process group even for one in-process worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def save_adapter(model, out_dir: str | Path, meta: dict[str, Any], zero_stage: int = 0) -> None:
    """Write the adapter (PEFT folder format, safetensors) and ``see_meta.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if zero_stage == 3:  # ZeRO-3 partitions parameters: gather them before saving
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            model.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))


# -- the loop -------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict | WorkerJob) -> dict | None:
    """Train one adapter; ``config`` is a ``WorkerJob`` (see_ray/config/train.py), as a dict under Ray Train."""
    job = config if isinstance(config, WorkerJob) else WorkerJob.model_validate(config)
    cfg = job.see
    tcfg = cfg.training
    if tcfg.steps is None:  # a worker sees its shard only, so the caller fixes the budget on the whole set
        raise ValueError("training.steps must be resolved before the loop (TrainConfig.resolved)")
    in_ray = job.ray
    if in_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
        # 1 per worker: torch's default thread count in every worker and replica would oversubscribe the cores
        torch.set_num_threads(cfg.model.num_threads or 1)
        shard = ray.train.get_dataset_shard("train")
        examples = [Example.from_dict(json.loads(r["example"])) for r in shard.iter_rows()]
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        examples = [Example.from_dict(e) if isinstance(e, dict) else e for e in job.examples or []]
    if not examples:
        raise ValueError("no training examples reached this worker (is the data set smaller than the workers?)")
    t_start = time.perf_counter()

    init = job.init_adapter
    if job.init_expert:  # warm start (training.warm_start): the registry's copy, hash-checked
        from see_ray.registry import ExpertRecord, Registry

        ref = job.init_expert
        init = str(Registry(ref["storage"]).adapter_path(ExpertRecord.model_validate(ref["record"])))
    model, tok = build_trainable(cfg, job.model_path, init)
    encoder = PromptEncoder(tok, cfg.indicators, cfg.model.max_prompt_tokens)
    rows = tokenize(examples, encoder, tcfg.max_target_tokens, tcfg.indicator_loss_weight)
    micro = max(1, tcfg.batch_size // world)
    on_gpu = device.type == "cuda"
    model.to(device)

    zero_stage = 0
    if tcfg.deepspeed is not None:
        import deepspeed

        if not on_gpu:
            _skip_shm_comm_build()
        if not in_ray:
            _init_single_process_group()
        ds = deepspeed_config(tcfg, micro, world, on_gpu)
        zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds
        )
        autocast_on = use_bf16(tcfg, device) and not on_gpu  # on GPU DeepSpeed's own bf16 mode is used
    else:
        engine = None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        warm = max(1, tcfg.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
        autocast_on = use_bf16(tcfg, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_on)

    bar = None
    if tcfg.progress and not in_ray and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, desc=job.meta.get("name", "train"), unit="step")
    t_loop = time.perf_counter()
    tokens = 0
    losses: list[float] = []
    window_t, window_tok = time.perf_counter(), 0
    batches = _batches(rows, micro, tcfg.seed + rank)
    for step in range(1, tcfg.steps + 1):
        batch = {k: v.to(device) for k, v in collate(next(batches), encoder.pad_id).items()}
        n_tok = int(batch["attention_mask"].sum())
        # logits_to_keep takes positions as well as a count; the expert's decide pass (core/expert.py) already
        # relies on the base model accepting it
        positions = loss_positions(batch["labels"])
        with amp:  # no KV cache: training never generates
            logits = (engine or model)(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logits_to_keep=positions,
            ).logits
        loss = weighted_loss(logits, batch["labels"], batch["weights"], positions)
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        tokens += n_tok
        window_tok += n_tok
        losses.append(float(loss.detach()))
        if step in job.snapshot_steps and not in_ray:
            save_adapter(engine.module if engine is not None else model,
                         Path(f"{job.output_dir}.snapshots") / f"step-{step}", {**job.meta, "step": step}, zero_stage)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            now = time.perf_counter()
            metrics = {
                "step": step,
                "steps": tcfg.steps,
                "loss": sum(losses[-tcfg.log_every :]) / len(losses[-tcfg.log_every :]),
                "tokens_per_s": window_tok * world / max(now - window_t, 1e-9),  # global estimate
                "lr": scheduler.get_last_lr()[0],
            }
            window_t, window_tok = now, 0
            if in_ray and step != tcfg.steps:
                ray.train.report(metrics)
            elif not in_ray:
                log.info("step %d loss %.4f tokens/s %.0f", step, metrics["loss"], metrics["tokens_per_s"])
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_loop
    if not all(math.isfinite(x) for x in losses[-3:]):
        raise FloatingPointError(f"training diverged: last losses {losses[-3:]}")
    result = {
        "steps": tcfg.steps,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t_start,
        "tokens": tokens * world,
        "tokens_per_s": tokens * world / max(train_s, 1e-9),
        "final_loss": sum(losses[-tcfg.log_every :]) / len(losses[-tcfg.log_every :]),
        "first_loss": losses[0],
        "examples": len(rows) * world,
        "prompts_truncated": encoder.truncated,
        "workers": world,
        "deepspeed": tcfg.deepspeed is not None,
        **_run_facts(engine, device, autocast_on),
    }
    meta = {**job.meta, "training": result}
    module = engine.module if engine is not None else model
    if in_ray:
        from ray.train import Checkpoint

        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="see-adapter-")
            save_adapter(module, tmp, meta, zero_stage)
            ray.train.report({**result, "step": tcfg.steps}, checkpoint=Checkpoint.from_directory(tmp))
        else:
            if zero_stage == 3:  # every rank joins the gather
                save_adapter(module, tempfile.mkdtemp(prefix="see-adapter-"), meta, zero_stage)
            ray.train.report({**result, "step": tcfg.steps})
        return None
    write_adapter_atomically(lambda tmp: save_adapter(module, tmp, meta, zero_stage), job.output_dir)
    return result


def _run_facts(engine, device: torch.device, autocast_on: bool) -> dict:
    """What the run actually trained with (not what was asked for): device, process-group backend, precision
    and optimizer class, read back from torch.distributed and the DeepSpeed engine."""
    import torch.distributed as dist

    facts = {
        "device": str(device),
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "bf16": bool(engine.bfloat16_enabled()) if engine is not None else autocast_on,
        "optimizer": type(engine.optimizer).__name__ if engine is not None else "AdamW",
    }
    if engine is not None:  # ZeRO wraps the optimizer; name the one that does the update too
        inner = getattr(engine.optimizer, "optimizer", None)
        if inner is not None:
            facts["optimizer"] += f"({type(inner).__name__})"
    if device.type == "cuda":
        facts["gpu_name"] = torch.cuda.get_device_name(device)
        facts["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return facts


def write_adapter_atomically(write, out_dir: str | Path) -> None:
    """Write an adapter into a temporary sibling folder, then rename it into place (never half a folder)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def train_adapter(
    examples: list[Example],
    cfg: SEEConfig,
    model_path: str,
    output_dir: str | Path,
    init_adapter: str | None = None,
    meta: dict | None = None,
    snapshot_steps: list[int] | None = None,
) -> dict:
    """Train one adapter in this process and write it to ``output_dir``; returns the training figures. The step
    count is ``cfg.training``'s budget for ``examples`` (``TrainConfig.steps_for``)."""
    cfg = cfg.model_copy(update={"training": cfg.training.resolved(len(examples))})
    return train_loop_per_worker(
        WorkerJob(see=cfg, model_path=model_path, examples=examples, output_dir=str(output_dir),
                  init_adapter=init_adapter, meta=meta or {}, snapshot_steps=snapshot_steps or [])
    )
