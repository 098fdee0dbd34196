"""Suspension with real pods (pure): a stopped trainer exits 143 after its SIGTERM checkpoint, and
the batch/v1 Job controller judges the podFailurePolicy of a suspended Job's pods too."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from dreambooth_operator import builders
from dreambooth_operator.failures import PodState
from dreambooth_operator.lifecycle import Action, TrainerJobState
from tests.unit.test_operator_citizenship import HASH, conditions, running, step
from tests.unit.test_operator_lifecycle import T0, accepted


def first_matching_rule(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The podFailurePolicy rule the Job controller applies to a failed pod (the first that matches,
    as `matchPodFailurePolicy` in pkg/controller/job/pod_failure_policy.go)."""
    codes = {s["name"]: s["state"]["terminated"]["exitCode"] for s in pod["status"]["containerStatuses"]}
    conditions_true = {c["type"] for c in pod["status"].get("conditions", []) if c["status"] == "True"}
    for rule in builders.POD_FAILURE_RULES:
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            code = codes.get(on_codes["containerName"])
            if code is not None and (code in on_codes["values"]) == (on_codes["operator"] == "In"):
                return rule
        for wanted in rule.get("onPodConditions", []):
            if wanted["type"] in conditions_true:
                return rule
    return None


def ended(code: int, *conditions_true: str) -> dict[str, Any]:
    return {"status": {"phase": "Failed", "conditions": [{"type": c, "status": "True"} for c in conditions_true],
                       "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": code}}}]}}


def test_a_trainer_stopped_by_sigterm_never_fails_its_job() -> None:
    """Suspended by runPolicy.suspend or Kueue, the pods exit 143: no rule may fail the Job for it."""
    rule = first_matching_rule(ended(143))
    assert rule is not None and rule["action"] == "Ignore"
    # What the cluster itself takes away still fails the Job at once (the operator restarts the gang).
    assert first_matching_rule(ended(143, "DisruptionTarget"))["action"] == "FailJob"
    assert first_matching_rule(ended(2))["action"] == "FailJob"
    assert first_matching_rule(ended(137))["action"] == "FailJob"
    assert first_matching_rule(ended(1)) is None  # backoffLimit 0 fails it


def test_a_rank_that_stopped_on_sigterm_in_a_running_gang_is_a_disruption() -> None:
    """kubectl delete of one rank: every rank checkpoints and exits 143; the Job ignores it, the operator does not."""
    status = step(accepted(), running()).status
    pods = (PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, exit_code=143, created=T0),
            PodState("rex-train-0-1-b", 0, "Running", "gpu-1", True, created=T0))
    plan = step(status, TrainerJobState(gang=0, active=1, ready=1, template_hash=HASH, start_time=T0), pods=pods)
    assert plan.actions == [Action("delete_job", 0)]
    assert (plan.status["restarts"], plan.status["disruptions"], plan.status["gang"]) == (0, 1, 1)
    assert conditions(plan)["Restarting"] == ("True", "GangDisrupted")
    assert "rex-train-0-0-a stopped on SIGTERM" in str(plan.status["conditions"])


def test_pods_stopped_by_a_suspension_are_not_a_disruption_after_the_resume() -> None:
    """Ended pods held visible (a second finalizer, a slow kubelet) were deleted before the resume."""
    resumed_at = T0 + timedelta(minutes=5)
    held = PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, exit_code=143, created=T0,
                    deletion_deadline=T0 + timedelta(minutes=3))
    fresh = PodState("rex-train-0-0-c", 0, "Running", "gpu-0", True, created=resumed_at)
    status = step(accepted(), running()).status
    plan = step(status, TrainerJobState(gang=0, active=2, ready=1, template_hash=HASH, start_time=resumed_at),
                resumed_at + timedelta(seconds=10), pods=(held, fresh))
    assert plan.actions == [] and plan.status["disruptions"] == 0 and plan.status["gang"] == 0
    # The same pod deleted while this run was going on (created after the resume) is one.
    taken = PodState("rex-train-0-0-c", 0, "Failed", "gpu-0", True, exit_code=143, created=resumed_at,
                     deletion_deadline=resumed_at + timedelta(seconds=30))
    plan = step(status, TrainerJobState(gang=0, active=1, ready=1, template_hash=HASH, start_time=resumed_at),
                resumed_at + timedelta(seconds=40), pods=(taken,))
    assert plan.status["disruptions"] == 1 and plan.actions == [Action("delete_job", 0)]


def test_a_suspended_job_keeps_its_gang() -> None:
    """runPolicy.suspend on a running gang: the same Job is suspended, never replaced."""
    status = step(accepted(), running()).status
    suspending = step(status, running(), the_spec=_suspended_spec())
    assert suspending.actions == [Action("suspend_job", 0, True)]
    held = PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, exit_code=143, created=T0,
                    deletion_deadline=T0 + timedelta(seconds=30))
    suspended = step(suspending.status, TrainerJobState(gang=0, suspended=True, template_hash=HASH), pods=(held,),
                     the_spec=_suspended_spec())
    assert suspended.actions == [] and suspended.phase == "Suspended"
    assert (suspended.status["gang"], suspended.status["disruptions"], suspended.status["restarts"]) == (0, 0, 0)


def _suspended_spec() -> Any:
    from tests.unit.test_operator_lifecycle import spec

    return spec(suspend=True)
