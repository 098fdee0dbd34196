"""Training is a function of (config, seed, world size): sweeps over what must not change it.

Dataloader workers, where a run is stopped and resumed (by max_steps or SIGTERM, once or several
times), gradient-accumulation reporting and EMA must leave every step's loss and the final
weights as an uninterrupted single-process run has them (1e-5 on CPU).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_trainer.checkpoint import LATEST, MANIFEST, checkpoint_key, find_resume_checkpoint
from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.storage import LocalStorage
from dreambooth_trainer.train import run_training

from .conftest import losses, tiny_config_dict, write_config

STEPS = 6
TOLERANCE = 1e-5
# Pixels (no latent cache), random flips, gradient accumulation and EMA: every path the data
# position, the RNG and the EMA take through a resume.
SWEEP = {
    "data": {"random_flip": True},
    "training": {"max_steps": STEPS, "gradient_accumulation_steps": 2, "ema": True, "ema_decay": 0.8, "learning_rate": 1e-3},
    "checkpointing": {"every_n_steps": 1, "keep_last": 2},
}


def sections(**overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {name: dict(value) for name, value in SWEEP.items()}
    for name, value in overrides.items():
        merged[name] = {**merged.get(name, {}), **value}
    return merged


def train_in_process(out: Path, **overrides: dict[str, Any]) -> None:
    assert run_training(config_from_dict(tiny_config_dict(str(out), **sections(**overrides)))) == 0


def unet_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((out / "final" / "unet").glob("*.safetensors"))))


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = losses(run), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=TOLERANCE), f"step {step}"
    mine, theirs = unet_weights(run), unet_weights(reference)
    assert mine.keys() == theirs.keys()
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert worst <= TOLERANCE, f"final (EMA) weights differ by {worst}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run everything is compared with: one process, no dataloader workers."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(out, data={"num_workers": 0})
    return out


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_the_number_of_dataloader_workers_changes_nothing(reference: Path, tmp_path: Path, workers: int) -> None:
    out = tmp_path / "run"
    train_in_process(out, data={"num_workers": workers})
    assert_same_run(out, reference)


@pytest.mark.parametrize(("stop_at", "workers"), [(1, 0), (2, 0), (3, 0), (STEPS - 1, 0), (3, 2)],
                         ids=["first", "early", "middle", "last-but-one", "middle-2-workers"])
def test_stopping_anywhere_and_resuming_continues_the_same_curve(reference: Path, tmp_path: Path, stop_at: int, workers: int) -> None:
    out = tmp_path / "run"
    train_in_process(out, training={"max_steps": stop_at}, data={"num_workers": workers})
    assert losses(out).keys() == set(range(1, stop_at + 1))
    train_in_process(out, data={"num_workers": workers})
    assert_same_run(out, reference)


def test_resuming_several_times_in_a_row_continues_the_same_curve(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for stop_at in (2, 3, 5, STEPS):
        train_in_process(out, training={"max_steps": stop_at})
    assert_same_run(out, reference)


def test_the_metrics_line_holds_the_mean_of_the_accumulated_micro_batches(tmp_path: Path) -> None:
    """Step 1's loss is the mean of micro-batches 0 and 1, both computed with the initial weights."""
    from dreambooth_trainer.data import DreamBoothBatches, ImageSet, list_images, read_images
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.storage import open_storage
    from dreambooth_trainer.families import FAMILIES
    from dreambooth_trainer.tiny import tiny_pipeline

    from .conftest import SUBJECT

    out = tmp_path / "run"
    overrides = {"prior": {"enabled": False}, "training": {"max_steps": 1, "gradient_accumulation_steps": 2, "ema": False}}
    train_in_process(out, **overrides)
    cfg = config_from_dict(tiny_config_dict(str(out), **sections(**overrides)))
    pipeline = tiny_pipeline(seed=0)
    module = DreamBoothModule(cfg, FAMILIES["sd"], pipeline)
    storage = open_storage(str(SUBJECT))
    instance = ImageSet(read_images(storage, list_images(storage, "instance image"), "instance image"), cfg.data.instance_prompt)
    batches = DreamBoothBatches(instance, None, 32, True, True, 1, 0, 0, 1, 0, 2)
    with torch.no_grad():
        micro = [float(module.compute_loss(batches.batch_at(m))) for m in (0, 1)]
    assert losses(out)[1] == pytest.approx(sum(micro) / 2, abs=TOLERANCE)
    assert abs(losses(out)[1] - sum(micro) / 4) > 10 * TOLERANCE, "not divided by the accumulation count"


def test_with_lora_the_ema_covers_the_adapters_only(make_config) -> None:
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.families import FAMILIES
    from dreambooth_trainer.tiny import tiny_pipeline

    cfg = make_config(training={"ema": True, "lora": {"enabled": True, "rank": 2}})
    pipeline = tiny_pipeline(seed=0)
    module = DreamBoothModule(cfg, FAMILIES["sd"], pipeline)
    shadow = module.ema.shadow_params
    adapters = [p for n, p in module.unet.named_parameters() if "lora_" in n]
    assert len(shadow) == len(adapters) > 0
    assert sum(p.numel() for p in shadow) == sum(p.numel() for p in adapters) < sum(p.numel() for p in module.unet.parameters()) // 10


# -- SIGTERM and kills, through the command pods run --------------------------------------------

def dreambooth(config: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("dreambooth")), "train", str(config), *args],
                            env={**os.environ, "DREAMBOOTH_LOG_FORMAT": "json", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def progress_step(out: Path) -> int:
    try:
        return json.loads((out / "progress.json").read_text()).get("step") or 0
    except (OSError, ValueError):
        return 0


# Test-side fault injection, loaded by the trainer process through PYTHONPATH: slow checkpoint
# uploads (to kill or SIGTERM during one) and slow steps (so a signal lands mid-run).
SLOWDOWNS = '''
import os, time
from pathlib import Path
from dreambooth_trainer import module, storage

_upload = storage.LocalStorage.upload_file
def upload_file(self, key, path):
    if "tensors-" in key and os.environ.get("SLOW_UPLOAD_MATCH", "tensors-") in key and "SLOW_UPLOAD_SECONDS" in os.environ:
        Path(os.environ["SLOW_UPLOAD_MARKER"]).write_text(key)
        time.sleep(float(os.environ["SLOW_UPLOAD_SECONDS"]))
    _upload(self, key, path)
storage.LocalStorage.upload_file = upload_file

_step = module.DreamBoothModule.training_step
def training_step(self, batch, batch_idx):
    time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))
    return _step(self, batch, batch_idx)
module.DreamBoothModule.training_step = training_step
'''


@pytest.fixture()
def slowdowns(tmp_path: Path) -> dict[str, str]:
    """Env that loads the fault injection into a trainer process."""
    folder = tmp_path / "inject"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SLOWDOWNS)
    return {"PYTHONPATH": str(folder), "SLOW_UPLOAD_MARKER": str(tmp_path / "uploading")}


def test_sigterm_several_times_in_a_row_then_finishing_continues_the_same_curve(reference: Path, tmp_path: Path,
                                                                                 slowdowns: dict[str, str]) -> None:
    out = tmp_path / "run"
    # Progress every 0.25 s and 0.6 s steps: the SIGTERM lands a step or two after the one seen,
    # well before the run's end (a 1 s progress record lagged past it once).
    data = tiny_config_dict(str(out), **sections(checkpointing={"every_n_steps": 100}))
    data["output"]["progress_every_seconds"] = 0.25
    config = write_config(tmp_path / "c.yaml", data)
    env = {**slowdowns, "DREAMBOOTH_CACHE": str(tmp_path.parent / "cache"), "SLOW_STEP_SECONDS": "0.6"}
    stops = []
    for _ in range(2):
        start = progress_step(out)
        process = dreambooth(config, env)
        wait_for(lambda: progress_step(out) > start or process.poll() is not None)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 143, stderr[-3000:]
        stops.append(int((out / LATEST).read_text().rsplit("-", 1)[1]))
    train_in_process(out)
    assert 1 <= stops[0] < stops[1] < STEPS, stops
    assert_same_run(out, reference)


def test_sigterm_waits_for_the_checkpoint_being_written(tmp_path: Path, slowdowns: dict[str, str]) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(str(out), training={"max_steps": 500},
                                                                checkpointing={"every_n_steps": 1000}))
    process = dreambooth(config, {**slowdowns, "DREAMBOOTH_CACHE": str(tmp_path / "cache"), "SLOW_UPLOAD_SECONDS": "3"})
    wait_for(lambda: progress_step(out) >= 2 or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert Path(slowdowns["SLOW_UPLOAD_MARKER"]).exists(), "the SIGTERM checkpoint's upload was slowed"
    key = (out / LATEST).read_text()
    assert (out / key / MANIFEST).exists(), "the process exited only after its checkpoint was complete"


def test_a_kill_during_a_background_write_leaves_no_usable_half_checkpoint(reference: Path, tmp_path: Path,
                                                                         slowdowns: dict[str, str]) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(str(out), **sections()))
    env = {**slowdowns, "DREAMBOOTH_CACHE": str(tmp_path.parent / "cache"), "SLOW_UPLOAD_MATCH": "step-00000004",
           "SLOW_UPLOAD_SECONDS": "60"}
    process = dreambooth(config, env)
    marker = Path(slowdowns["SLOW_UPLOAD_MARKER"])
    wait_for(lambda: marker.exists() or process.poll() is not None)
    assert marker.exists(), process.communicate()[1][-3000:]
    process.kill()  # SIGKILL mid-write: nothing gets to clean up
    process.communicate(timeout=60)
    storage = LocalStorage(out)
    assert not storage.exists(checkpoint_key(4) + "/" + MANIFEST)
    assert find_resume_checkpoint(storage) == checkpoint_key(3)
    train_in_process(out)
    assert losses(out).keys() == set(range(1, STEPS + 1))
    assert_same_run(out, reference)
