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

SIGTERM_POLL_STEPS = 5
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
    """Rank 0's record of training. Losses stay on the device until a flush, so the hot loop
    never waits for the GPU; a flush (every `progress_every_seconds`) syncs once."""

    def __init__(self, cfg: TrainConfig, storage: Storage, world: int, start_step: int, tb_dir: Path | None, json_logs: bool):
        self.cfg, self.storage, self.world = cfg, storage, world
        self.tb_dir = tb_dir
        self.json_logs = json_logs
        self.lines: list[str] = read_metrics(storage, start_step)
        self.pending: list[tuple[int, torch.Tensor, float, float]] = []  # step, loss (device), lr, time
        self.step_seconds: float | None = None
        self.last_step_time = time.monotonic()
        self.last_flush = 0.0
        self.loss_sum: torch.Tensor | None = None
        self.loss_count = 0
        self.last_loss = math.nan
        self.step = start_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_count += 1
        if trainer.global_step == self.step:
            return  # still accumulating
        now = time.monotonic()
        elapsed = now - self.last_step_time
        self.last_step_time = now
        self.step_seconds = elapsed if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * elapsed
        mean_loss = self.loss_sum / self.loss_count
        if self.world > 1:
            mean_loss = trainer.strategy.reduce(mean_loss, reduce_op="mean")
        self.loss_sum, self.loss_count = None, 0
        self.step = trainer.global_step
        if not trainer.is_global_zero:
            return
        self.pending.append((self.step, mean_loss, trainer.optimizers[0].param_groups[0]["lr"], time.time()))
        if now - self.last_flush >= self.cfg.output.progress_every_seconds or self.step >= self.cfg.training.max_steps:
            self.flush()

    def drain(self) -> None:
        """Move pending losses to metric lines: one device sync for all of them."""
        if not self.pending:
            return
        values = torch.stack([loss.float() for _, loss, _, _ in self.pending]).cpu().tolist()
        for (step, _, lr, stamp), value in zip(self.pending, values):
            self.lines.append(json.dumps({"step": step, "loss": value, "lr": lr, "time": stamp}))
        self.last_loss = values[-1]
        self.pending.clear()

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
        self.drain()
        self.last_flush = time.monotonic()
        record = self.progress_record(state)
        if self.json_logs:
            log.info("progress", extra=record)
        self.storage.write_text(METRICS, "\n".join(self.lines) + ("\n" if self.lines else ""))
        self.storage.write_text(PROGRESS, json.dumps(record))
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

    def stop_requested(self, trainer: pl.Trainer, step: int) -> bool:
        """Did any rank get SIGTERM? Asked every SIGTERM_POLL_STEPS steps in a gang: the
        all-reduce makes the host wait for the GPU, and the grace period allows a few steps."""
        if trainer.world_size == 1:
            return self.sigterm
        if step % SIGTERM_POLL_STEPS and step < self.max_steps:
            return False
        flag = torch.tensor(1.0 if self.sigterm else 0.0, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.seen_step:
            return  # mid-accumulation: the optimizer has not stepped
        self.seen_step = step
        stop = self.on_sigterm and self.stop_requested(trainer, step)
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
