"""Lightning callbacks: every side effect of training (files, uploads, signals) lives here.

- ProgressReporter (rank 0): metrics.jsonl (a line per optimizer step), progress.json every few
  seconds, TensorBoard events mirrored to storage, JSON log lines in pods.
- CheckpointTrigger: a checkpoint every N steps, at the last step, and on SIGTERM (all ranks
  agree on stopping through one tiny all-reduce per step, then exit 143).
- ValidationSampler (rank 0): an image grid of the validation prompts every N steps.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from .checkpoint import checkpoint_key
from .config import TrainConfig
from .storage import Storage

log = logging.getLogger("dreambooth.train")

METRICS = "metrics.jsonl"
PROGRESS = "progress.json"


def images_per_optimizer_step(cfg: TrainConfig, world: int) -> int:
    per_micro = cfg.training.batch_size * (2 if cfg.prior.enabled else 1)
    return per_micro * cfg.training.gradient_accumulation_steps * world


def read_metrics(storage: Storage, up_to_step: int) -> list[str]:
    """Metric lines of earlier runs up to the resume step (later ones are re-done)."""
    if not storage.exists(METRICS):
        return []
    lines = []
    for line in storage.read_text(METRICS).splitlines():
        try:
            if json.loads(line)["step"] <= up_to_step:
                lines.append(line)
        except (ValueError, KeyError):
            continue
    return lines


class ProgressReporter(pl.Callback):
    def __init__(self, cfg: TrainConfig, storage: Storage, world: int, start_step: int, tb_dir: Path | None, json_logs: bool):
        self.cfg, self.storage, self.world = cfg, storage, world
        self.start_step = start_step
        self.tb_dir = tb_dir
        self.json_logs = json_logs
        self.lines: list[str] = read_metrics(storage, start_step)
        self.step_seconds: float | None = None
        self.last_step_time = time.monotonic()
        self.last_flush = 0.0
        self.loss_sum, self.loss_count = 0.0, 0
        self.last_loss = math.nan
        self.step = start_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss_sum += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        self.loss_count += 1
        if trainer.global_step == self.step:
            return  # still accumulating
        now = time.monotonic()
        elapsed = now - self.last_step_time
        self.last_step_time = now
        self.step_seconds = elapsed if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * elapsed
        loss_value = self.loss_sum / max(1, self.loss_count)
        if self.world > 1:
            reduced = trainer.strategy.reduce(torch.tensor(loss_value, device=module.device), reduce_op="mean")
            loss_value = float(reduced)
        self.loss_sum, self.loss_count = 0.0, 0
        self.step, self.last_loss = trainer.global_step, loss_value
        if not trainer.is_global_zero:
            return
        record = {"step": self.step, "loss": loss_value, "lr": trainer.optimizers[0].param_groups[0]["lr"], "time": time.time()}
        self.lines.append(json.dumps(record))
        if self.json_logs:
            log.info("step", extra={**self.progress_record(), "lr": record["lr"]})
        if now - self.last_flush >= self.cfg.output.progress_every_seconds or self.step == self.cfg.training.max_steps:
            self.flush()

    def progress_record(self, state: str = "training") -> dict[str, Any]:
        total = self.cfg.training.max_steps
        remaining = max(0, total - self.step)
        rate = images_per_optimizer_step(self.cfg, self.world) / self.step_seconds if self.step_seconds else None
        return {
            "state": state,
            "step": self.step,
            "total_steps": total,
            "percent": round(100.0 * self.step / total, 1),
            "loss": None if math.isnan(self.last_loss) else round(self.last_loss, 6),
            "images_per_second": round(rate, 3) if rate else None,
            "eta_seconds": round(remaining * self.step_seconds, 1) if self.step_seconds else None,
            "time": time.time(),
        }

    def flush(self, state: str = "training") -> None:
        self.last_flush = time.monotonic()
        self.storage.write_text(METRICS, "\n".join(self.lines) + ("\n" if self.lines else ""))
        self.storage.write_text(PROGRESS, json.dumps(self.progress_record(state)))
        if self.tb_dir is not None and self.tb_dir.exists():
            self.storage.upload_tree("tb", self.tb_dir)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.last_step_time = time.monotonic()
        if trainer.is_global_zero:
            self.flush()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.flush("stopped" if self.step < self.cfg.training.max_steps else "trained")


class CheckpointTrigger(pl.Callback):
    def __init__(self, cfg: TrainConfig):
        self.every = cfg.checkpointing.every_n_steps
        self.max_steps = cfg.training.max_steps
        self.on_sigterm = cfg.checkpointing.on_sigterm
        self.sigterm = False
        self.stopped_by_sigterm = False
        self.last_saved_step: int | None = None
        self.seen_step: int | None = None

    def _handle_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Replaces Lightning's own handler (registered just before): we decide when to stop.
        self.previous_handler = signal.signal(signal.SIGTERM, self._handle_sigterm)
        self.seen_step = trainer.global_step

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if getattr(self, "previous_handler", None) is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
            self.previous_handler = None

    def stop_requested(self, trainer: pl.Trainer) -> bool:
        flag = torch.tensor(1.0 if self.sigterm else 0.0, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.seen_step:
            return  # mid-accumulation: the optimizer has not stepped
        self.seen_step = step
        stop = self.on_sigterm and self.stop_requested(trainer)
        if stop or step % self.every == 0 or step >= self.max_steps:
            self.save(trainer, step)
        if stop:
            self.stopped_by_sigterm = True
            trainer.should_stop = True
            log.info("stopping after SIGTERM", extra={"step": step})

    def save(self, trainer: pl.Trainer, step: int) -> None:
        if self.last_saved_step != step:
            trainer.save_checkpoint(checkpoint_key(step))
            self.last_saved_step = step


class ValidationSampler(pl.Callback):
    def __init__(self, cfg: TrainConfig, storage: Storage, render: "Any"):
        self.cfg, self.storage, self.render = cfg, storage, render
        self.seen_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, every = trainer.global_step, self.cfg.validation.every_n_steps
        if step == self.seen_step:
            return
        self.seen_step = step
        if every and step % every == 0 and trainer.is_global_zero and self.cfg.validation.prompts:
            self.storage.write_bytes(f"samples/step-{step:08d}.png", self.render(module))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    SKIP = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        payload = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        payload.update({k: v for k, v in record.__dict__.items() if k not in self.SKIP})
        if record.exc_info:
            payload["error"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(json_logs: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
