"""GPU-only checks (marked `gpu`; skipped only where CUDA is absent): precisions, 8-bit Adam,
inductor compile, and the step loop never waiting for the device."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.train import resolved_precision, run_training

from .conftest import metric_lines, tiny_config_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def train(tmp_path: Path, name: str, **sections) -> Path:
    out = tmp_path / name
    assert run_training(config_from_dict(tiny_config_dict(str(out), **sections))) == 0
    return out


@pytest.mark.parametrize("precision", ["fp16", "bf16", "auto"])
def test_mixed_precisions_train_on_gpu(tmp_path: Path, precision: str) -> None:
    lines = metric_lines(train(tmp_path, precision, training={"max_steps": 3, "mixed_precision": precision}))
    assert [line["step"] for line in lines] == [1, 2, 3] and all(math.isfinite(line["loss"]) for line in lines)


def test_auto_precision_is_bf16_where_the_gpu_has_it(make_config) -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported() else "no"
    assert resolved_precision(make_config(training={"mixed_precision": "auto"})) == expected


def test_eight_bit_adam_trains(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="the gpu extra (bitsandbytes) is not installed")
    lines = metric_lines(train(tmp_path, "adam8", training={"max_steps": 3, "optimizer": "adamw_8bit"}))
    assert all(math.isfinite(line["loss"]) for line in lines)


def test_inductor_compiled_unet_trains_to_the_eager_losses(tmp_path: Path) -> None:
    common = {"max_steps": 3, "mixed_precision": "no"}
    eager = metric_lines(train(tmp_path, "eager", training=common, prior={"enabled": False}))
    compiled = metric_lines(train(tmp_path, "compiled", training={**common, "compile": True}, prior={"enabled": False}))
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)


class SyncTrap(pl.Callback):
    """Makes any device->host synchronisation an error between the end of step `start` and the
    end of step `stop` - 1 (the last step writes a checkpoint, which waits once by design)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.trapped_steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        step = trainer.global_step
        if step == self.start:
            torch.cuda.set_sync_debug_mode("error")
        elif self.start < step < self.stop:
            self.trapped_steps += 1
        if step >= self.stop - 1:
            torch.cuda.set_sync_debug_mode("default")


def test_twenty_steps_never_wait_for_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole step loop (data, forward, backward, optimizer, EMA, progress hand-off) runs 20
    steps with synchronisation made an error."""
    from dreambooth_trainer import train as train_module

    trap = SyncTrap(start=3, stop=24)
    make_trainer = train_module.make_trainer
    monkeypatch.setattr(train_module, "make_trainer",
                        lambda *args, **kwargs: make_trainer(*args, **{**kwargs, "extra_callbacks": [trap]}))
    try:
        train(tmp_path, "nosync", training={"max_steps": 24, "mixed_precision": "bf16", "ema": True},
              checkpointing={"every_n_steps": 1000}, validation={"fidelity": False}, output={"progress_every_seconds": 0.05})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trap.trapped_steps == 20
