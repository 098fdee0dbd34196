"""The admission deadline (pure): counted from the operator's first look, with storage outages on a
budget of their own, so a restart burst after an outage fails nothing that was applied meanwhile."""
from __future__ import annotations

from datetime import timedelta

from dreambooth_operator import lifecycle
from tests.unit.test_operator_citizenship import conditions
from tests.unit.test_operator_lifecycle import T0

DEADLINE = 600


def wait(status: dict, at: float, reason: str = "SecretNotFound") -> lifecycle.Plan:
    return lifecycle.await_admission(status, 1, T0 + timedelta(seconds=at), reason, "why", False, DEADLINE)


def test_the_deadline_counts_from_the_operators_first_look_not_the_jobs_creation() -> None:
    # Applied an hour before the operator came up: its first look starts the clock, kept in status.
    first = wait({}, 0)
    assert first.phase == "Pending" and first.status["admissionStartTime"] == "2026-11-26T06:00:00Z"
    assert wait(first.status, DEADLINE - 1).phase == "Pending"
    past = wait(first.status, DEADLINE + 1)
    assert past.phase == "Failed" and "admissionDeadlineSeconds=600" in str(past.status["conditions"])


def test_storage_being_unreachable_has_its_own_budget() -> None:
    # The breaker is open in the restart burst: the first look finds storage unreachable.
    first = wait({}, 0, "StorageUnreachable")
    assert first.status["storageUnreachableSince"] == "2026-11-26T06:00:00Z"
    still = wait(first.status, DEADLINE + 60, "StorageUnreachable")
    assert still.phase == "Pending" and conditions(still)["Accepted"] == ("False", "StorageUnreachable")
    assert wait(first.status, lifecycle.STORAGE_OUTAGE_SECONDS + 1, "StorageUnreachable").phase == "Failed"
    # Reachable again, another cause: the outage's budget goes, the job's own deadline stands.
    healed = wait(wait(first.status, 10, "StorageUnreachable").status, 20, "SecretKeyMissing")
    assert "storageUnreachableSince" not in healed.status and healed.phase == "Pending"
    assert wait(still.status, DEADLINE + 61, "SecretKeyMissing").phase == "Failed"


def test_what_cannot_heal_fails_at_once() -> None:
    refused = lifecycle.await_admission({}, 1, T0, "ModelSourceUnreachable", "relative path", True, DEADLINE)
    assert refused.phase == "Failed" and conditions(refused)["Failed"] == ("True", "ModelSourceUnreachable")
