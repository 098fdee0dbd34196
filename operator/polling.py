"""How often to read a running job's progress.json: adapted to its step time (pure; the floor is
read once from the environment).

Nothing announces progress (rank 0 writes it to object storage), so the operator polls. A job
whose steps take 30 s gains nothing from a read every 12 s, and 200 fast jobs must not all be read
every few seconds: poll about every POLL_STEPS steps, between MIN and MAX seconds, and back off
while the record does not change (a stalled or slow writer) or does not exist yet (models loading).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

FLOOR_ENV = "DREAMBOOTH_OPERATOR_PROGRESS_SECONDS"
DEFAULT_FLOOR = 12.0  # a changed record is one status PATCH: at most 5 writes a minute per running job
MAX_SECONDS = 60.0


def floor_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """The shortest time between two reads of one job: DREAMBOOTH_OPERATOR_PROGRESS_SECONDS (1 to
    60), else 12. A small test cluster may read every few seconds; a big one keeps the default."""
    text = (environ.get(FLOOR_ENV) or "").strip()
    if not text:
        return DEFAULT_FLOOR
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= MAX_SECONDS:
        raise ValueError(f"{FLOOR_ENV}={text!r}: the seconds between two progress reads of a job, from 1 to {MAX_SECONDS:g}")
    return value


MIN_SECONDS = floor_seconds()
FIRST_SECONDS = min(10.0, MIN_SECONDS)  # before any record: the first one comes after the model loads
POLL_STEPS = 10
NO_RECORD_PATIENCE = 120.0  # seconds without a record read every FIRST_SECONDS: a small model's first record comes soon


@dataclass(frozen=True)
class ProgressSample:
    step: int
    time: float  # the record's own `time` (epoch seconds, written by rank 0)


def sample(record: dict | None) -> ProgressSample | None:
    if not record:
        return None
    try:
        return ProgressSample(int(record.get("step") or 0), float(record.get("time") or 0.0))
    except (TypeError, ValueError):
        return None


def next_poll_seconds(previous: ProgressSample | None, current: ProgressSample | None, last_interval: float | None,
                      waited: float = 0.0) -> float:
    """Seconds until the next read, from the last two records, the last interval and the seconds
    since the gang's first read (`waited`)."""
    if current is None:  # no record yet: 1,000 gangs loading big models are read ever less often
        if last_interval is None or waited < NO_RECORD_PATIENCE:
            return FIRST_SECONDS
        return _clamp(last_interval * 2)
    if previous is None:  # the first record: the next soon, for a step time
        return _clamp(FIRST_SECONDS)
    if current == previous:  # nothing new since the last read: read less often
        return _clamp((last_interval or MIN_SECONDS) * 2)
    steps = current.step - previous.step
    seconds = current.time - previous.time
    if steps <= 0 or seconds <= 0:
        return _clamp(last_interval or FIRST_SECONDS)
    return _clamp(POLL_STEPS * seconds / steps)


def _clamp(seconds: float) -> float:
    return max(MIN_SECONDS, min(MAX_SECONDS, seconds))
