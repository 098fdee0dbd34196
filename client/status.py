"""A DreamboothJob's status as the client shows it: typed, and rendered as a line or a panel.

Pure: dicts in, dataclasses and strings out. Progress comes from the job's status (the operator
copies it every few seconds) or, fresher, from the progress record rank 0 writes to storage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from dreambooth_api.v1alpha1.spec import TokenSecretRef

TERMINAL_PHASES = ("Succeeded", "Failed")
BAR_WIDTH = 30
Until = Literal["created", "running", "finished", "serving"]


@dataclass(frozen=True)
class Progress:
    """Where training is: optimizer step of total, last loss, throughput, time left."""

    step: int
    total_steps: int
    loss: float | None = None
    images_per_second: float | None = None
    eta_seconds: float | None = None
    updated: float | None = None  # epoch seconds of the record

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class JobStatus:
    """One reading of a DreamboothJob."""

    name: str
    namespace: str
    phase: str = "Pending"
    message: str = ""
    restarts: int = 0
    progress: Progress | None = None
    conditions: tuple[Condition, ...] = ()
    endpoint: str | None = None
    output_uri: str | None = None
    serving_enabled: bool = True
    model_name: str | None = None
    lora: bool = False
    created: str | None = None
    token_secret: tuple[str, str] | None = None  # (Secret, key) of the server's token, when it has one

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded"

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"

    @property
    def serving_ready(self) -> bool:
        ready = self.condition("ServingReady")
        return ready is not None and ready.status == "True"

    def reached(self, until: Until) -> bool:
        """Whether there is nothing more to wait for (a failed job reaches every goal)."""
        if self.failed or until == "created":
            return True
        if until == "running":
            return self.phase != "Pending" or self.progress is not None
        if until == "finished" or not self.serving_enabled:
            return self.finished
        return self.succeeded and self.serving_ready

    @property
    def failure(self) -> str:
        """Why the job failed, from its Failed condition (or its message)."""
        failed = self.condition("Failed")
        if failed and failed.status == "True":
            return f"{failed.reason}: {failed.message}" if failed.message else failed.reason
        return self.message or "failed"


def job_status(body: dict[str, Any]) -> JobStatus:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    serving = status.get("serving") if isinstance(status.get("serving"), dict) else {}
    return JobStatus(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        phase=status.get("phase") or "Pending",
        message=status.get("message") or "",
        restarts=int(status.get("restarts") or 0),
        progress=progress_from_status(status.get("progress")),
        conditions=tuple(Condition(c.get("type", ""), c.get("status", ""), c.get("reason", ""), c.get("message", ""))
                         for c in status.get("conditions") or []),
        endpoint=serving.get("url") or status.get("endpoint"),
        output_uri=status.get("outputUri"),
        serving_enabled=bool((spec.get("serving") or {}).get("enabled", True)),
        model_name=serving.get("model"),
        lora=bool(((spec.get("training") or {}).get("lora") or {}).get("enabled")),
        created=meta.get("creationTimestamp"),
        token_secret=token_secret(spec),
    )


def token_secret(spec: dict[str, Any]) -> tuple[str, str] | None:
    """spec.serving.auth.tokenSecretRef as (Secret, key); the key defaults as in the API."""
    ref = (((spec.get("serving") or {}).get("auth") or {}).get("tokenSecretRef") or {})
    return (ref["name"], ref.get("key") or TokenSecretRef.model_fields["key"].default) if ref.get("name") else None


def progress_from_status(progress: dict[str, Any] | None) -> Progress | None:
    """status.progress (camelCase, as the operator writes it)."""
    if not progress or progress.get("step") is None or not progress.get("totalSteps"):
        return None
    updated = progress.get("updateTime")
    return Progress(
        step=int(progress["step"]), total_steps=int(progress["totalSteps"]), loss=progress.get("loss"),
        images_per_second=progress.get("imagesPerSecond"), eta_seconds=progress.get("etaSeconds"),
        updated=_epoch(updated) if updated else None,
    )


def progress_from_record(record: dict[str, Any] | None) -> Progress | None:
    """progress.json (snake_case, as rank 0 writes it)."""
    if not record or record.get("step") is None or not record.get("total_steps"):
        return None
    return Progress(
        step=int(record["step"]), total_steps=int(record["total_steps"]), loss=record.get("loss"),
        images_per_second=record.get("images_per_second"), eta_seconds=record.get("eta_seconds"),
        updated=record.get("time"),
    )


def with_fresher_progress(status: JobStatus, record: Progress | None) -> JobStatus:
    """The status with the storage record's progress when that one is newer (while training)."""
    current = status.progress
    if record is None or status.finished:
        return status
    if current is None or (record.step, record.updated or 0) > (current.step, current.updated or 0):
        return replace(status, progress=record)
    return status


def _epoch(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- rendering -----------------------------------------------------------------------------


def change_key(status: JobStatus) -> tuple[Any, ...]:
    """What makes a new line: phase, step, restarts, serving readiness, the operator's message."""
    progress = status.progress
    return (status.phase, progress and progress.step, progress and progress.total_steps, status.restarts,
            status.serving_ready, status.message)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_text(progress: Progress) -> str:
    parts = [f"step {progress.step}/{progress.total_steps} ({progress.percent:.0f}%)"]
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.images_per_second:
        parts.append(f"{progress.images_per_second:.2f} images/s")
    if progress.step < progress.total_steps:
        parts.append(f"ETA {format_seconds(progress.eta_seconds)}")
    return "  ".join(parts)


def serving_text(status: JobStatus) -> str:
    if not status.serving_enabled:
        return "serving off"
    if status.serving_ready:
        return f"serving at {status.endpoint}"
    ready = status.condition("ServingReady")
    return f"serving: {ready.message}" if ready and ready.message else "serving: starting"


def plain_line(status: JobStatus, now: float | None = None) -> str:
    """One line per change, for logs and pipes: time, job, phase, progress, restarts, serving."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    parts = [stamp, f"{status.namespace}/{status.name}", status.phase]
    if status.progress:
        parts.append(progress_text(status.progress))
    parts.append(f"restarts {status.restarts}")
    if status.succeeded:
        parts.append(serving_text(status))
    elif status.failed:
        parts.append(status.failure)
    elif status.message and not status.progress:
        parts.append(status.message)
    return "  ".join(parts)


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, int(round(fraction * width))))
    return "█" * filled + "░" * (width - filled)


def panel_lines(status: JobStatus, elapsed: float, samples: int = 0, samples_dir: str | None = None,
                latest_sample: str | None = None) -> list[str]:
    """The live display on a terminal: redrawn in place on every poll."""
    lines = [f"{status.namespace}/{status.name}  {status.phase}  ({format_seconds(elapsed)})  restarts {status.restarts}"]
    progress = status.progress
    if progress:
        lines.append(f"{progress_bar(progress.step / progress.total_steps)}  {progress_text(progress)}")
    elif not status.finished:
        lines.append(f"{progress_bar(0.0)}  {status.message or 'waiting for the trainer to start'}")
    if samples_dir is not None:
        latest = f" (latest {latest_sample})" if latest_sample else ""
        lines.append(f"samples: {samples} in {samples_dir}{latest}")
    if status.succeeded:
        lines.append(serving_text(status))
    elif status.failed:
        lines.append(f"failed: {status.failure}")
    return lines
