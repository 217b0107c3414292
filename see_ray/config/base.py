"""The one base class of every typed config, and its YAML / override loader.

Every field carries its help text (``Field(description=...)``) and every object validates itself at
construction, so a typo in a YAML file or a ``--set`` override fails with the exact field name instead of
being silently ignored (``extra="forbid"``). Every config loads the same way::

    cfg = SEEConfig.from_yaml("see.yaml", overrides=["training.steps=60", "routing.order=oldest_first"])
    scfg = ServeConfig.from_yaml("serve.yaml", ["dispatch.mode=concurrent"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and field."""


class ConfigBase(BaseModel):
    """Base of every config: unknown fields are refused, assignments are validated, YAML in and out."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # A top-level section a file may wrap this config in (``serve:``); overrides may carry it as a prefix too.
    yaml_section: ClassVar[str | None] = None

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None):
        """Load a YAML file (optional) and apply ``a.b=value`` overrides (values parsed as YAML)."""
        data = read_yaml_mapping(path)
        overrides = list(overrides or [])
        if cls.yaml_section:
            data = dict(data.get(cls.yaml_section, data))
            overrides = [o.strip().removeprefix(f"{cls.yaml_section}.") for o in overrides]
        apply_overrides(data, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            source = str(path) if path is not None else "overrides" if overrides else "defaults"
            raise ConfigError(f"{source}: invalid {cls.__name__}:\n{describe(e)}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_yaml_mapping(path: str | Path | None) -> dict[str, Any]:
    """The mapping at the top of a YAML config file ({} for None or an empty file); ConfigError otherwise."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return dict(loaded or {})


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place (values parsed as YAML); the dotted path names nested keys."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.field=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def describe(e: ValidationError) -> str:
    """One line per field error: ``  section.field: message``."""
    return "\n".join(f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
