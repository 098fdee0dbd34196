"""The training config as the trainer reads it: a YAML file plus `--set dotted.key=value` overrides,
validated by the API's sections (`dreambooth_api.v1alpha1.sections`, the single source of truth,
re-exported here for the trainer's modules)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dreambooth_api.v1alpha1.sections import *  # noqa: F401,F403 - the trainer's view of the API sections
from dreambooth_api.v1alpha1.sections import ConfigError, TrainConfig, config_from_dict


def config_yaml(config: TrainConfig) -> str:
    """The config as the YAML file `dreambooth train` reads (the operator's ConfigMap holds it)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.max_steps=6` -> (['training', 'max_steps'], 6); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `--set dotted.key=value` overrides, validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    return config_from_dict(apply_overrides(data, overrides or []))
