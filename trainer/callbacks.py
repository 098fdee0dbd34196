"""Lightning callbacks: every side effect of training (files, uploads, signals) lives here.

- ProgressReporter (rank 0): metrics.jsonl (a line per optimizer step), progress.json every few
  seconds, TensorBoard events mirrored to storage, JSON log lines in pods. The step loop only
  hands device tensors over; reading them back and writing happen on a BackgroundWriter thread.
- CheckpointTrigger: a checkpoint every N steps, at the last step, and on SIGTERM. Ranks agree on
  stopping over a host-side (gloo) channel every few steps, so no poll waits for the GPU.
- ValidationSampler (rank 0): an image grid of the validation prompts every N steps.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

from .checkpoint import checkpoint_key
from .config import TrainConfig
from .storage import Storage

if TYPE_CHECKING:
    from .selection import FidelityLedger

log = logging.getLogger("dreambooth.train")

SIGTERM_POLL_STEPS = 5
METRICS = "metrics.jsonl"
PROGRESS = "progress.json"
FIDELITY = "fidelity.json"
BACKBONES = "fidelity/backbones"
EMBEDDING_SCORES = ("fidelity/dino", "fidelity/clip_i", "fidelity/clip_t", "fidelity/prior_similarity")


def images_per_optimizer_step(cfg: TrainConfig, world: int) -> int:
    per_micro = cfg.training.batch_size * (2 if cfg.prior.enabled else 1)
    return per_micro * cfg.training.gradient_accumulation_steps * world


def read_metrics(storage: Storage, up_to_step: int) -> list[dict[str, Any]]:
    """Metric lines of earlier runs up to the resume step (later ones are re-done)."""
    if not storage.exists(METRICS):
        return []
    lines = []
    for text in storage.read_text(METRICS).splitlines():
        try:
            line = json.loads(text)
            if line["step"] <= up_to_step:
                lines.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return lines


class BackgroundWriter:
    """One thread running rank 0's writes (metrics, progress, TensorBoard, samples) in order, so
    the step loop never waits for storage or for values to come back from the GPU."""

    def __init__(self) -> None:
        self.tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="progress-writer", daemon=True)
        self.thread.start()

    def submit(self, task: Callable[[], None]) -> None:
        self.tasks.put(task)

    def _run(self) -> None:
        while (task := self.tasks.get()) is not None:
            try:
                task()
            except Exception:  # a failed progress write must never stop training
                log.exception("progress write failed")
            finally:
                self.tasks.task_done()
        self.tasks.task_done()

    def drain(self) -> None:
        """Wait until every submitted write is done."""
        self.tasks.join()

    def close(self) -> None:
        self.tasks.put(None)
        self.thread.join()


class DeviceValues:
    """Values still on the device, copied to host memory without making the host wait; `get`
    (on the writer thread) waits for the copy."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.is_cuda:
            self.host = values.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def get(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class ProgressReporter(pl.Callback):
    """Rank 0's record of training: a metrics line per optimizer step (its loss is the mean over
    its micro-batches, on rank 0), progress.json every `progress_every_seconds`."""

    def __init__(self, cfg: TrainConfig, storage: Storage, world: int, start_step: int, tb_dir: Path | None,
                 json_logs: bool, rank: int = 0, ledger: "FidelityLedger | None" = None):
        self.cfg, self.storage, self.world = cfg, storage, world
        self.ledger = ledger  # the scores per checkpoint: their summary goes into every progress record
        self.tb_dir = tb_dir
        self.json_logs = json_logs
        self.writer = BackgroundWriter() if rank == 0 else None
        # One line per optimizer step: its loss, lr and time, and any validation figures of that
        # step; figures taken before training (step 0) get a line of their own, without a loss.
        self.lines: list[dict[str, Any]] = read_metrics(storage, start_step) if rank == 0 else []
        self.pending: list[tuple[int, float, float]] = []  # step, lr, time
        self.pending_losses: list[torch.Tensor] = []
        self.step_seconds: float | None = None
        self.last_step_time = time.monotonic()
        self.last_handoff = 0.0
        self.last_loss = math.nan
        self.step = start_step
        self.tb_writer: Any = None
        self.figures: dict[int, dict[str, float]] = {}  # step -> validation figures, until written
        self.latest_figures: dict[str, float] = {}  # shown in every later progress record

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            return  # still accumulating
        loss = module.take_step_loss()
        now = time.monotonic()
        elapsed = now - self.last_step_time
        self.last_step_time = now
        self.step_seconds = elapsed if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * elapsed
        self.step = trainer.global_step
        if self.writer is None or loss is None:
            return
        self.pending.append((self.step, trainer.optimizers[0].param_groups[0]["lr"], time.time()))
        self.pending_losses.append(loss)
        if now - self.last_handoff >= self.cfg.output.progress_every_seconds or self.step >= self.cfg.training.max_steps:
            self.hand_off()

    def record(self, step: int, figures: dict[str, float]) -> None:
        """Validation figures of a step, for its metrics line and the progress records after it."""
        self.figures.setdefault(step, {}).update(figures)

    def hand_off(self, state: str = "training") -> None:
        """Give what is pending to the writer thread; the step loop does not wait."""
        if self.writer is None:
            return
        self.last_handoff = time.monotonic()
        pending, self.pending = self.pending, []
        losses = DeviceValues(torch.stack(self.pending_losses).float()) if self.pending_losses else None
        self.pending_losses = []
        snapshot = {"step": self.step, "step_seconds": self.step_seconds, "figures": self.figures}
        self.figures = {}
        self.writer.submit(lambda: self._write(pending, losses, snapshot, state))

    def written_marker(self) -> threading.Event:
        """Hand off what is pending; the event is set once that (and all before it) is written.
        A checkpoint commits only after it: the metrics of the steps it covers are never lost."""
        done = threading.Event()
        if self.writer is None:
            done.set()
            return done
        self.hand_off()
        self.writer.submit(done.set)
        return done

    def flush(self, state: str = "training") -> None:
        """Hand off and wait until written (end of run)."""
        self.hand_off(state)
        if self.writer is not None:
            self.writer.drain()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- on the writer thread ------------------------------------------------------------------
    def _write(self, pending: list[tuple[int, float, float]], losses: DeviceValues | None, snapshot: dict[str, Any], state: str) -> None:
        values = losses.get() if losses is not None else []
        new_lines = [{"step": step, "loss": value, "lr": lr, "time": stamp} for (step, lr, stamp), value in zip(pending, values)]
        if values:
            self.last_loss = values[-1]
        self.lines.extend(new_lines)
        by_step = {line["step"]: line for line in self.lines}
        for step in sorted(snapshot["figures"]):
            figures = snapshot["figures"][step]
            if step not in by_step:
                by_step[step] = {"step": step}
                self.lines.append(by_step[step])
                new_lines.append(by_step[step])
            by_step[step].update(figures)
            if self.ledger is not None and self.ledger.backbones and any(name in figures for name in EMBEDDING_SCORES):
                by_step[step][BACKBONES] = self.ledger.backbones  # what these scores were measured with
            self.latest_figures.update(figures)
        self.lines.sort(key=lambda line: line["step"])
        record = self.progress_record(snapshot, state)
        if self.json_logs:
            log.info("progress", extra=record)
        self.storage.write_text(METRICS, "".join(json.dumps(line) + "\n" for line in self.lines))
        if snapshot["figures"] and self.ledger is not None:
            self.storage.write_text(FIDELITY, json.dumps(fidelity_document(self.ledger), indent=1))
        self.storage.write_text(PROGRESS, json.dumps(record))
        self._tensorboard(new_lines, record)

    def _tensorboard(self, lines: list[dict[str, Any]], record: dict[str, Any]) -> None:
        if self.tb_dir is None:
            return
        if self.tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(str(self.tb_dir))
        for line in lines:
            for name, value in line.items():
                if name not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb_writer.add_scalar(name, value, line["step"])
        if record.get("images_per_second"):
            self.tb_writer.add_scalar("images_per_second", record["images_per_second"], record["step"])
        self.tb_writer.flush()
        self.storage.upload_tree("tb", self.tb_dir)

    def progress_record(self, snapshot: dict[str, Any], state: str = "training") -> dict[str, Any]:
        total = self.cfg.training.max_steps
        step, step_seconds = snapshot["step"], snapshot["step_seconds"]
        remaining = max(0, total - step)
        rate = images_per_optimizer_step(self.cfg, self.world) / step_seconds if step_seconds else None
        record = {
            "state": state,
            "step": step,
            "total_steps": total,
            "percent": round(100.0 * step / total, 1),
            "loss": None if math.isnan(self.last_loss) else round(self.last_loss, 6),
            "images_per_second": round(rate, 3) if rate else None,
            "eta_seconds": round(remaining * step_seconds, 1) if step_seconds else None,
            "time": time.time(),
        }
        record.update({name: round(value, 6) for name, value in self.latest_figures.items()})
        summary = self.ledger.summary() if self.ledger is not None else None
        if summary:
            record["fidelity"] = summary
        return record

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.last_step_time = time.monotonic()
        self.hand_off()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.flush("stopped" if self.step < self.cfg.training.max_steps else "trained")


def fidelity_document(ledger: "FidelityLedger", kept: set[int] | None = None, exports: dict[str, str] | None = None) -> dict[str, Any]:
    """fidelity.json: every scored step, the rule, the backbones, the best (and, at the end, which
    checkpoints are still stored and where the exports are)."""
    kept = ledger.kept if kept is None else kept
    exports = ledger.exports if exports is None else exports
    best = ledger.best(kept)
    document: dict[str, Any] = {
        "select": ledger.rule.text() if ledger.rule else None,
        "score": ledger.rule.figure if ledger.rule else None,
        "backbones": ledger.backbones,
        "best": {"step": best.step, "floor_met": best.floor_met} if best else None,
        "steps": [{**row, "checkpoint": ledger.is_checkpoint_step(row["step"]),
                   **({"kept": row["step"] in kept} if kept is not None else {})} for row in ledger.rows()],
    }
    if exports:
        document["exports"] = exports
    return document


def control_group(trainer: pl.Trainer) -> Any:
    """A host-side (gloo) process group for agreeing on flags without touching the GPU; the
    default group when it already is gloo. Every rank calls this at the same point."""
    import torch.distributed as dist

    if trainer.world_size == 1 or not dist.is_initialized():
        return None
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


# A checkpoint waits at most this long for the metrics of its steps (a stuck store must not hold it).
COMMIT_WAIT_SECONDS = 120.0


class CheckpointTrigger(pl.Callback):
    def __init__(self, cfg: TrainConfig, progress: ProgressReporter | None = None, attempt: int | None = None):
        self.progress = progress
        self.attempt = attempt
        self.every = cfg.checkpointing.every_n_steps
        self.max_steps = cfg.training.max_steps
        self.on_sigterm = cfg.checkpointing.on_sigterm
        self.sigterm = False
        self.stopped_by_sigterm = False
        self.last_saved_step: int | None = None
        self.seen_step: int | None = None
        self.control: Any = None
        self.stalls: list[float] = []

    def _handle_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Replaces Lightning's own handler (registered just before): we decide when to stop.
        self.previous_handler = signal.signal(signal.SIGTERM, self._handle_sigterm)
        self.seen_step = trainer.global_step
        self.control = control_group(trainer)

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if getattr(self, "previous_handler", None) is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
            self.previous_handler = None

    def stop_requested(self, trainer: pl.Trainer, step: int) -> bool:
        """Did any rank get SIGTERM? Asked every SIGTERM_POLL_STEPS steps in a gang, over the
        host-side channel (a CPU tensor: nothing waits for the GPU); the grace period allows it."""
        if trainer.world_size == 1:
            return self.sigterm
        if step % SIGTERM_POLL_STEPS and step < self.max_steps:
            return False
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.sigterm else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag[0] > 0)

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
        """What the step loop pays for a checkpoint: state to host buffers; the write runs behind."""
        if self.last_saved_step == step:
            return
        started = time.monotonic()
        if self.progress is not None:
            marker = self.progress.written_marker()
            trainer.strategy.checkpoint_io.commit_after = lambda: marker.wait(COMMIT_WAIT_SECONDS)
        trainer.save_checkpoint(checkpoint_key(step, self.attempt))
        self.stalls.append(time.monotonic() - started)
        self.last_saved_step = step
        log.info("checkpoint started", extra={"step": step, "stall_seconds": round(self.stalls[-1], 3)})


class ValidationSampler(pl.Callback):
    """Rank 0: subject-fidelity scores before training (a fresh run) and at every checkpoint step
    before the last (the end of the run scores the last), sample grids every
    `validation.every_n_steps`; the writer thread uploads the images."""

    def __init__(self, cfg: TrainConfig, storage: Storage, validate: Callable[..., "ValidationResult"],
                 progress: ProgressReporter, ledger: "FidelityLedger | None" = None):
        self.cfg, self.storage, self.validate, self.progress = cfg, storage, validate, progress
        self.ledger = ledger
        self.seen_step: int | None = None

    def scored_at(self, step: int) -> bool:
        """A checkpoint step is scored, so the best checkpoint can be chosen from the scores."""
        return self.cfg.validation.fidelity.enabled and step % self.cfg.checkpointing.every_n_steps == 0 and step < self.cfg.training.max_steps

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seen_step = trainer.global_step
        if trainer.global_step == 0:
            self.run(trainer, module, 0, with_samples=False)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, every = trainer.global_step, self.cfg.validation.every_n_steps
        if step == self.seen_step:
            return
        self.seen_step = step
        samples = bool(every and step % every == 0)
        if samples or self.scored_at(step):
            self.run(trainer, module, step, with_samples=samples)

    def run(self, trainer: pl.Trainer, module: pl.LightningModule, step: int, with_samples: bool = True) -> None:
        if not trainer.is_global_zero or self.progress.writer is None:
            return
        result = self.validate(module, step, with_samples)
        self.progress.record(step, result.figures)
        if self.ledger is not None:
            self.ledger.add(step, result.figures)
        for key, data in result.files.items():
            self.progress.writer.submit(lambda key=key, data=data: self.storage.write_bytes(key, data))


@dataclass
class ValidationResult:
    files: dict[str, bytes]  # storage key -> PNG
    figures: dict[str, float]


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
