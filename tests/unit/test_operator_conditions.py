"""Conditions in metav1.Condition shape, the phase, progress records -> status."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

from dreambooth_operator.conditions import (
    derive_phase,
    format_duration,
    progress_status,
    restart_backoff_seconds,
    set_condition,
    transition_events,
)

T0 = datetime(2026, 11, 26, 6, 0, 0, tzinfo=timezone.utc)
T1 = T0 + timedelta(minutes=5)


def test_set_condition_has_the_metav1_shape() -> None:
    conditions = set_condition([], "Running", True, "GangRunning", "all 2 pods running", 3, T0)
    assert conditions == [
        {
            "type": "Running",
            "status": "True",
            "reason": "GangRunning",
            "message": "all 2 pods running",
            "lastTransitionTime": "2026-11-26T06:00:00Z",
            "observedGeneration": 3,
        }
    ]


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = set_condition([], "Running", False, "PodsPending", "0/2", 1, T0)
    same = set_condition(first, "Running", False, "PodsPending", "1/2", 2, T1)
    assert same[0]["lastTransitionTime"] == "2026-11-26T06:00:00Z"
    assert (same[0]["message"], same[0]["observedGeneration"]) == ("1/2", 2)
    flipped = set_condition(same, "Running", True, "GangRunning", "2/2", 2, T1)
    assert flipped[0]["lastTransitionTime"] == "2026-11-26T06:05:00Z"


def test_conditions_keep_a_stable_order_and_one_entry_per_type() -> None:
    conditions = set_condition([], "Running", True, "R", "m", 1, T0)
    conditions = set_condition(conditions, "Accepted", True, "A", "m", 1, T0)
    conditions = set_condition(conditions, "Running", False, "R2", "m", 1, T0)
    assert [c["type"] for c in conditions] == ["Accepted", "Running"]


def test_long_messages_are_cut() -> None:
    conditions = set_condition([], "Failed", True, "X", "m" * 5000, None, T0)
    assert len(conditions[0]["message"]) == 1000 and "observedGeneration" not in conditions[0]


def test_phase_from_conditions() -> None:
    def with_true(*types: str) -> list[dict]:
        conditions: list[dict] = []
        for type_ in ("Accepted", "Running", "Restarting", "Suspended", "Succeeded", "Failed"):
            conditions = set_condition(conditions, type_, type_ in types, "R", "m", 1, T0)
        return conditions

    assert derive_phase([]) == "Pending"
    assert derive_phase(with_true("Accepted")) == "Pending"
    assert derive_phase(with_true("Accepted", "Running")) == "Running"
    assert derive_phase(with_true("Accepted", "Restarting")) == "Restarting"
    assert derive_phase(with_true("Accepted", "Restarting", "Suspended")) == "Suspended"
    assert derive_phase(with_true("Accepted", "Succeeded")) == "Succeeded"
    assert derive_phase(with_true("Accepted", "Failed", "Restarting")) == "Failed"


def test_an_event_for_every_transition() -> None:
    before = set_condition([], "Running", True, "GangRunning", "2/2", 1, T0)
    after = set_condition(before, "Running", False, "GangFailed", "pod 1 failed", 1, T1)
    after = set_condition(after, "Restarting", True, "GangFailed", "restart 1/3 in 10s", 1, T1)
    assert transition_events(before, after) == [
        ("Normal", "GangFailed", "Running=False: pod 1 failed"),
        ("Warning", "GangFailed", "Restarting=True: restart 1/3 in 10s"),
    ]
    assert transition_events(after, after) == []


def test_progress_record_to_status() -> None:
    record = {"step": 120, "total_steps": 400, "loss": 0.12345678, "images_per_second": 31.4159, "eta_seconds": 250.4, "time": 1796018400.0}
    assert progress_status(record) == {
        "step": 120,
        "totalSteps": 400,
        "percent": 30.0,
        "loss": 0.123457,
        "imagesPerSecond": 31.416,
        "etaSeconds": 250.4,
        "eta": "4m10s",
        "summary": "120/400 (30%)",
        "updateTime": "2026-11-30T06:00:00Z",
    }
    assert progress_status({"step": 0, "total_steps": 0, "time": "2026-11-26T06:00:00+00:00"}) == {
        "step": 0, "summary": "0", "updateTime": "2026-11-26T06:00:00Z",
    }


def test_durations_for_humans() -> None:
    assert [format_duration(s) for s in (None, -1, 0, 9.6, 70, 3600 + 125)] == [None, None, "0s", "10s", "1m10s", "1h02m"]


def test_restart_backoff_doubles_up_to_a_cap() -> None:
    assert [restart_backoff_seconds(n) for n in range(8)] == [0, 10, 20, 40, 80, 160, 300, 300]


def test_operator_never_imports_torch() -> None:
    code = (
        "import sys, dreambooth_operator.handlers, dreambooth_operator.store, dreambooth_api.v1alpha1.spec; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'pytorch_lightning', 'lightning') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
