"""Pure status logic: metav1.Condition bookkeeping, the phase, progress records -> status.

Times are passed in (never read from the clock here), so tests are exact.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

ACCEPTED = "Accepted"
QUEUED = "Queued"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SERVING_READY = "ServingReady"
# True once nothing more will happen by itself: Failed, or Succeeded with serving settled
# (ready, disabled or failed). `kubectl wait --for=condition=Finished` returns either way.
FINISHED = "Finished"
NAME_CONFLICT = "NameConflict"
UPDATE_PENDING = "UpdatePending"
# What each GPU will hold (dreambooth_api.v1alpha1.memory): True when the job fits resources.gpuMemory
# by the plan, False when it fits only without the activation estimate, Unknown without a plan or a size.
MEMORY_PLAN = "MemoryPlan"
# An accepted job whose stored spec this operator cannot read (a rule tightened since, a rollback):
# it is left as it is, never failed for it.
HELD = "Held"
# Whether the gang's pods are placed all together or not at all (Kueue, a PodGroup), or may not be.
GANG_SCHEDULING = "GangScheduling"
CONDITION_TYPES = (ACCEPTED, QUEUED, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED, SERVING_READY, FINISHED,
                   NAME_CONFLICT, UPDATE_PENDING, MEMORY_PLAN, HELD, GANG_SCHEDULING)
TERMINAL_PHASES = ("Succeeded", "Failed")
# Conditions whose turning True deserves a Warning event rather than a Normal one.
WARNING_CONDITIONS = (RESTARTING, FAILED, NAME_CONFLICT, HELD)
MAX_MESSAGE = 1000

Conditions = list[dict[str, Any]]


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def get_condition(conditions: Conditions, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: Conditions, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"


def set_condition(
    conditions: Conditions,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> Conditions:
    """A new list with `type_` set (True, False, or "Unknown"); lastTransitionTime moves only when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = get_condition(conditions, type_)
    changed = old is None or old.get("status") != value
    condition: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": format_time(now) if changed or not old.get("lastTransitionTime") else old["lastTransitionTime"],
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    result = [c for c in conditions if c.get("type") != type_] + [condition]
    order = {name: i for i, name in enumerate(CONDITION_TYPES)}
    return sorted(result, key=lambda c: order.get(c["type"], len(order)))


def observe_generation(conditions: Conditions, generation: int | None) -> Conditions:
    """Every condition reports the generation it was judged at: this reconcile's (kubectl wait checks it)."""
    if generation is None:
        return conditions
    return [c if c.get("observedGeneration") == generation else {**c, "observedGeneration": generation} for c in conditions]


def derive_phase(conditions: Conditions) -> str:
    """The one-word summary for humans, from the conditions (most final first)."""
    for type_, phase in (
        (FAILED, "Failed"),
        (SUCCEEDED, "Succeeded"),
        (SUSPENDED, "Suspended"),
        (QUEUED, "Queued"),
        (RESTARTING, "Restarting"),
        (RUNNING, "Running"),
    ):
        if is_true(conditions, type_):
            return phase
    return "Pending"


def transition_events(before: Conditions, after: Conditions) -> list[tuple[str, str, str]]:
    """(event type, reason, message) for every condition whose status flipped or appeared."""
    events = []
    for condition in after:
        old = get_condition(before, condition["type"])
        if old is not None and old.get("status") == condition["status"]:
            continue
        if old is None and condition["status"] == "False":
            continue  # a condition born False is not news
        warning = condition["type"] in WARNING_CONDITIONS and condition["status"] == "True"
        events.append(("Warning" if warning else "Normal", condition["reason"], f"{condition['type']}={condition['status']}: {condition['message']}"))
    return events


def format_duration(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0:
        return None
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_status(record: dict[str, Any]) -> dict[str, Any]:
    """progress.json written by rank 0 -> status.progress (camelCase, printer-column strings)."""
    step = int(record.get("step") or 0)
    total = int(record.get("total_steps") or 0)
    percent = round(100.0 * step / total, 1) if total else None
    eta = record.get("eta_seconds")
    status: dict[str, Any] = {
        "step": step,
        "totalSteps": total or None,
        "percent": percent,
        "loss": _rounded(record.get("loss"), 6),
        "imagesPerSecond": _rounded(record.get("images_per_second"), 3),
        "etaSeconds": _rounded(eta, 1),
        "eta": format_duration(eta),
        "summary": f"{step}/{total} ({percent:g}%)" if total else f"{step}",
        "updateTime": _record_time(record.get("time")),
    }
    return {key: value for key, value in status.items() if value is not None}


FIDELITY_KEYS = ("latest", "best", "select", "backbones", "summary")


def fidelity_status(record: dict[str, Any], served: str) -> dict[str, Any] | None:
    """progress.json's `fidelity` (the trainer's scores summary) -> status.fidelity; `served`:
    the export the endpoint loads (final, exports/best, exports/step-N)."""
    scores = record.get("fidelity")
    if not isinstance(scores, dict):
        return None
    status = {key: scores[key] for key in FIDELITY_KEYS if scores.get(key) is not None}
    status["served"] = served
    return status


def completed_progress(progress: dict[str, Any] | None, total_steps: int) -> dict[str, Any]:
    """The progress shown once the job Succeeded: every step done, nothing left."""
    done = dict(progress or {})
    done.update({"step": total_steps, "totalSteps": total_steps, "percent": 100.0, "etaSeconds": 0.0, "eta": "0s"})
    done["summary"] = f"{total_steps}/{total_steps} (100%)"
    return done


def _rounded(value: Any, digits: int) -> float | None:
    if value is None:
        return None
    try:
        return round(float(value), digits)
    except (TypeError, ValueError):
        return None


def _record_time(value: Any) -> str | None:
    """progress.json `time` may be epoch seconds or an ISO string; status wants RFC 3339."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return format_time(datetime.fromtimestamp(value, timezone.utc))
    try:
        return format_time(parse_time(str(value)))  # type: ignore[arg-type]
    except ValueError:
        return None


def restart_backoff_seconds(restarts: int, base: float = 10.0, cap: float = 300.0) -> float:
    """Delay before gang number `restarts` starts: 10 s, 20 s, 40 s, ... capped at 5 min."""
    if restarts <= 0:
        return 0.0
    return min(base * 2 ** (restarts - 1), cap)
