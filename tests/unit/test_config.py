"""SEEConfig: defaults, YAML loading, ``--set`` overrides and validation errors that name the field; the add-expert
job's config (SEE sections plus ``ray_train``) and the shipped DeepSpeed configs."""

from __future__ import annotations

import pytest
import yaml

from see_ray.config import (
    DEFAULT_MODEL,
    ConfigError,
    RehearsalConfig,
    RoutingConfig,
    SEEConfig,
    TrainConfig,
)
from see_ray.config.train import SHIPPED_DEEPSPEED, JobConfig, RayTrainConfig


# -- defaults ------------------------------------------------------------------------------------------
def test_defaults_are_valid_and_match_the_spec():
    cfg = SEEConfig()
    assert cfg.model.name_or_path == DEFAULT_MODEL
    assert cfg.routing.order == "newest_first"  # the SEE method's order
    assert cfg.routing.threshold is None
    assert cfg.routing.default_threshold == 0.5
    assert cfg.indicators.accept == " accept" and cfg.indicators.reject == " reject"
    assert cfg.rehearsal.per_task_fraction == 0.02
    # defaults survive a round trip through YAML
    again = SEEConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_from_yaml_without_file_gives_defaults():
    assert SEEConfig.from_yaml(None) == SEEConfig()


# -- YAML loading ----------------------------------------------------------------------------------------
def test_load_yaml_file(tmp_path):
    p = tmp_path / "see.yaml"
    p.write_text(
        "training:\n  steps: 7\n  lr: 0.0005\nrouting:\n  order: oldest_first\n  threshold: 0.7\n"
        "lora:\n  target_modules: [q_proj, v_proj]\n"
    )
    cfg = SEEConfig.from_yaml(p)
    assert cfg.training.steps == 7
    assert cfg.training.lr == 0.0005
    assert cfg.routing.order == "oldest_first"
    assert cfg.routing.threshold == 0.7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.batch_size == 8  # untouched fields keep their defaults


def test_empty_yaml_file_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert SEEConfig.from_yaml(p) == SEEConfig()


def test_overrides_apply_on_top_of_the_file(tmp_path):
    p = tmp_path / "see.yaml"
    p.write_text("training:\n  steps: 7\n  batch_size: 4\n")
    cfg = SEEConfig.from_yaml(p, ["training.steps=5", "routing.order=oldest_first", "model.dtype=bfloat16"])
    assert cfg.training.steps == 5  # override wins over the file
    assert cfg.training.batch_size == 4  # the file's other values stay
    assert cfg.routing.order == "oldest_first"
    assert cfg.model.dtype == "bfloat16"


def test_override_values_are_parsed_as_yaml():
    cfg = SEEConfig.from_yaml(
        None,
        [
            "training.bf16_autocast=false",
            "routing.calibration_bounds=[0.6, 0.9]",
            "rehearsal.per_task_max=null",
            "training.deepspeed={zero_optimization: {stage: 1}}",
        ],
    )
    assert cfg.training.bf16_autocast is False
    assert cfg.routing.calibration_bounds == (0.6, 0.9)
    assert cfg.rehearsal.per_task_max is None
    assert cfg.training.deepspeed == {"zero_optimization": {"stage": 1}}


# -- errors --------------------------------------------------------------------------------------------
def test_unknown_field_in_override_names_the_field():
    with pytest.raises(ConfigError) as ei:
        SEEConfig.from_yaml(None, ["training.stepz=5"])
    assert "training.stepz" in str(ei.value)


def test_unknown_section_in_yaml_names_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainig:\n  steps: 3\n")
    with pytest.raises(ConfigError) as ei:
        SEEConfig.from_yaml(p)
    msg = str(ei.value)
    assert "trainig" in msg and str(p) in msg


@pytest.mark.parametrize(
    "override, field",
    [
        ("routing.threshold=1.5", "routing.threshold"),
        ("routing.threshold=0", "routing.threshold"),
        ("training.steps=0", "training.steps"),
        ("routing.order=random", "routing.order"),
        ("model.dtype=int8", "model.dtype"),
        ("rehearsal.input_only_share=2", "rehearsal.input_only_share"),
        ("training.lr=-1", "training.lr"),
        ("model.max_prompt_tokens=3", "model.max_prompt_tokens"),
    ],
)
def test_bad_values_are_config_errors_naming_the_field(override, field):
    with pytest.raises(ConfigError) as ei:
        SEEConfig.from_yaml(None, [override])
    assert field in str(ei.value)


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="section.field=value"):
        SEEConfig.from_yaml(None, ["training.steps"])
    with pytest.raises(ConfigError):
        SEEConfig.from_yaml(None, ["=5"])


def test_override_through_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="not a section"):
        SEEConfig.from_yaml(None, ["training.steps=5", "training.steps.x=1"])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        SEEConfig.from_yaml(missing)
    assert str(missing) in str(ei.value) and "not found" in str(ei.value)


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SEEConfig.from_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        SEEConfig.from_yaml(lst)


def test_identical_indicators_are_rejected():
    with pytest.raises(ConfigError, match="differ"):
        SEEConfig.from_yaml(None, ["indicators.accept=' yes'", "indicators.reject=' yes'"])


def test_assignment_is_validated():
    cfg = SEEConfig()
    with pytest.raises(ValueError):
        cfg.training.steps = -3


# -- calibration bounds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bounds", [(0.0, 0.9), (0.9, 0.5), (0.5, 1.0), (-0.1, 0.5)])
def test_calibration_bounds_must_be_ordered_inside_0_1(bounds):
    with pytest.raises(ValueError, match="calibration_bounds"):
        RoutingConfig(calibration_bounds=bounds)
    with pytest.raises(ConfigError, match="calibration_bounds"):
        SEEConfig.from_yaml(None, [f"routing.calibration_bounds=[{bounds[0]}, {bounds[1]}]"])


@pytest.mark.parametrize("bounds", [(0.5, 0.95), (0.7, 0.7), (0.01, 0.99)])
def test_valid_calibration_bounds(bounds):
    assert RoutingConfig(calibration_bounds=bounds).calibration_bounds == bounds


# -- rehearsal keep count ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, n_train, expected",
    [
        ({}, 1000, 32),  # 2% of 1000 = 20 < min 32
        ({}, 5000, 100),  # 2% of 5000 = 100
        ({}, 10, 10),  # never more than the task has
        ({"per_task_max": 50}, 5000, 50),  # capped
        ({"per_task_min": 0, "per_task_fraction": 0.1}, 55, 6),  # round(5.5) = 6 (banker's: 6)
        ({"per_task_min": 0, "per_task_fraction": 0.0}, 1000, 0),
        ({"per_task_min": 4, "per_task_max": 2}, 100, 2),  # max wins over min
    ],
)
def test_keep_count(kw, n_train, expected):
    assert RehearsalConfig(**kw).keep_count(n_train) == expected


# -- the add-expert job's config: SEE sections + ray_train -------------------------------------------------
def test_job_config_splits_ray_section(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("training:\n  steps: 7\nray_train:\n  num_workers: 2\n  deepspeed: zero3\n")
    see, rt = JobConfig.from_yaml(str(y), ["ray_train.cpus_per_worker=0.25", "lora.r=4"]).split()
    assert see.training.steps == 7 and see.lora.r == 4
    assert rt.num_workers == 2 and rt.cpus_per_worker == 0.25
    assert rt.deepspeed_dict(see)["zero_optimization"]["stage"] == 3
    assert rt.worker_resources() == {"CPU": 0.25} and rt.threads(see) == 1 and rt.torch_backend() == "gloo"
    gpu = RayTrainConfig(use_gpu=True, cpus_per_worker=2)
    assert gpu.worker_resources() == {"CPU": 2, "GPU": 1.0} and gpu.torch_backend() == "nccl"


def test_job_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="training.stepz"):
        JobConfig.from_yaml(None, ["training.stepz=3"])
    with pytest.raises(ConfigError, match="num_workers"):
        JobConfig.from_yaml(None, ["ray_train.num_workers=0"])
    with pytest.raises(ConfigError, match="neither a shipped config"):
        RayTrainConfig(deepspeed="/nope.json").deepspeed_dict(SEEConfig())


@pytest.mark.parametrize("name", sorted(SHIPPED_DEEPSPEED))
def test_shipped_deepspeed_configs_parse(name):
    ds = RayTrainConfig(deepspeed=name).deepspeed_dict(SEEConfig())
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert isinstance(ds["optimizer"]["params"]["eps"], float)  # JSON read as JSON (YAML 1.1 says str)


@pytest.mark.parametrize(
    "kw, n, steps",
    [
        ({}, 100, 38),  # ceil(3 epochs x 100 / 8)
        ({"epochs": 2.0}, 100, 25),
        ({"epochs": 2.0, "max_steps": 20}, 100, 20),  # the cap
        ({"epochs": 1.0, "min_steps": 8}, 10, 8),  # the floor
        ({"steps": 7}, 100, 7),  # a fixed count replaces the budget
    ],
)
def test_epoch_budget(kw, n, steps):
    """The budget counts passes over the whole training set (every own example once, every negative once), within
    [min_steps, max_steps]; ``resolved`` fixes it for the loop."""
    t = TrainConfig(**kw)
    assert t.steps_for(n) == steps and t.resolved(n).steps == steps
    assert t.steps == kw.get("steps")  # the config itself is unchanged


def test_min_steps_above_max_steps_is_refused():
    with pytest.raises(ValueError, match="min_steps"):
        TrainConfig(min_steps=10, max_steps=5)
