"""How often to read a running job's progress.json: adapted to its step time (pure).

Nothing announces progress (rank 0 writes it to object storage), so the operator polls. A job
whose steps take 30 s gains nothing from a read every 12 s, and 200 fast jobs must not all be read
every few seconds: poll about every POLL_STEPS steps, between MIN and MAX seconds, and back off
while the record does not change (a stalled or slow writer) or does not exist yet (models loading).
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_SECONDS = 12.0  # a changed record is one status PATCH: at most 5 writes a minute per running job
MAX_SECONDS = 60.0
FIRST_SECONDS = 10.0  # before any record: the first one comes after the model loads
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
