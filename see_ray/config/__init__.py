"""Typed configuration: one documented object per concern, all on one base class (``base.ConfigBase``), each
validated at construction, loadable from YAML and overridable from the CLI (``--set section.field=value``).

- ``base``: the base class, ``ConfigError`` and the YAML / override loader;
- ``see``: the SEE method (model, LoRA, indicators, rehearsal, training, routing);
- ``serve``: serving on Ray Serve (replicas, batching, the walk, limits, auth);
- ``train``: Ray Train, the add-expert job's file and validation bars, what a training worker receives;
- ``app``: the arguments of the Serve application builder (``see_ray.serve:build_app``);
- ``constants``: names shared across the package; ``deepspeed/``: the shipped DeepSpeed configs.
"""

from see_ray.config.base import ConfigBase, ConfigError, apply_overrides, read_yaml_mapping
from see_ray.config.constants import DEFAULT_MODEL
from see_ray.config.see import (
    IndicatorConfig,
    LoraSettings,
    ModelConfig,
    RehearsalConfig,
    RoutingConfig,
    SEEConfig,
    TrainConfig,
)

__all__ = [
    "DEFAULT_MODEL", "ConfigBase", "ConfigError", "IndicatorConfig", "LoraSettings", "ModelConfig", "RehearsalConfig",
    "RoutingConfig", "SEEConfig", "TrainConfig", "apply_overrides", "read_yaml_mapping",
]
