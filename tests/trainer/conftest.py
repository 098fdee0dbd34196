"""Tiny-model training fixtures: a subject folder, a config builder, a CLI runner."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dreambooth_trainer.config import TrainConfig, config_from_dict

REPO = Path(__file__).resolve().parents[2]
SUBJECT = REPO / "examples" / "tiny-subject"
SCORED_PROMPTS = ["a {token} {class} in the snow", "a red {token} {class}"]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def tiny_config_dict(output: str, instance: str = str(SUBJECT), **sections: dict[str, Any]) -> dict[str, Any]:
    base = {
        "model": {"source": "tiny", "tiny_resolution": 32},
        "data": {"instance_uri": instance, "instance_prompt": "a photo of sks toy", "resolution": 32},
        "prior": {"class_prompt": "a photo of toy", "num_class_images": 2, "sample_steps": 2, "sample_batch_size": 2},
        "training": {"max_steps": 2, "seed": 0, "learning_rate": 1e-3},
        "checkpointing": {"every_n_steps": 100},
        # Two prompts, not the paper's 25: every tiny run scores fidelity, and CI pays for each image.
        "validation": {"fidelity": {"prompts": SCORED_PROMPTS}},
        "output": {"uri": output, "tensorboard": False, "progress_every_seconds": 1},
    }
    return deep_merge(base, sections)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Class-image and model caches per test session, never the user's home: session-scoped, so
    module-scoped fixtures (a reference run) get it too."""
    cache = tmp_path_factory.getbasetemp() / "dreambooth-cache"
    patch = pytest.MonkeyPatch()
    patch.setenv("DREAMBOOTH_CACHE", str(cache))
    patch.setenv("DREAMBOOTH_LOG_FORMAT", "json")
    yield cache
    patch.undo()


@pytest.fixture()
def make_config(tmp_path: Path):
    def build(**sections: dict[str, Any]) -> TrainConfig:
        return config_from_dict(tiny_config_dict(str(tmp_path / "out"), **sections))

    return build


def write_config(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `dreambooth` command (the one pods run)."""
    command = [str(Path(sys.executable).with_name("dreambooth")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def all_metric_lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def metric_lines(folder: Path) -> list[dict[str, Any]]:
    """The optimizer steps' lines (a line of figures taken before training has no loss)."""
    return [line for line in all_metric_lines(folder) if "loss" in line]


def losses(folder: Path) -> dict[int, float]:
    """Each optimizer step's loss, by step."""
    return {line["step"]: line["loss"] for line in metric_lines(folder)}


def copy_subject(target: Path) -> Path:
    shutil.copytree(SUBJECT, target)
    return target
