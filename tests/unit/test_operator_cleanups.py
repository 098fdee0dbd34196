"""Intent kept until it is done (pure): a lost unsuspend, a lost DELETE of a finished job's gang, a
lost unregister from a shared server are tried again on the next reconcile, as the Job
controller re-applies its cleanups on every sync of a finished Job."""
from __future__ import annotations

from datetime import timedelta

from dreambooth_operator import builders, lifecycle
from dreambooth_operator.lifecycle import Action, ServingState, TrainerJobState
from dreambooth_api.v1alpha1.spec import parse_spec
from tests.unit.test_operator_citizenship import HASH, conditions, running, step
from tests.unit.test_operator_lifecycle import SPEC, T0, accepted, spec


def test_a_lost_unsuspend_is_sent_again_until_the_job_runs() -> None:
    suspended = step(step(accepted(), running()).status, running(), the_spec=spec(suspend=True))
    assert suspended.status["jobSuspendedByOperator"] is True
    job = TrainerJobState(gang=0, suspended=True, template_hash=HASH)
    resuming = step(suspended.status, job, T0 + timedelta(seconds=5))
    assert resuming.actions == [Action("suspend_job", 0, False)]
    # The PATCH was lost: the Job is still suspended, and the operator still knows it suspended it.
    again = step(resuming.status, job, T0 + timedelta(seconds=10))
    assert again.actions == [Action("suspend_job", 0, False)], "the unsuspend is retried"
    assert conditions(again).get("Queued") is None and again.phase != "Queued"
    assert again.requeue_after is not None, "on a timer: no event comes for a Job nobody changed"
    resumed = step(again.status, running(), T0 + timedelta(seconds=15))
    assert "jobSuspendedByOperator" not in resumed.status and resumed.phase == "Running"
    assert resumed.status["startTime"] == "2026-11-26T06:00:15Z", "the deadline counts from when it runs again"


def test_a_gang_still_running_after_its_deadline_is_deleted_on_every_reconcile() -> None:
    status = step(accepted(), running(), the_spec=spec(activeDeadlineSeconds=60)).status
    failed = step(status, running(), T0 + timedelta(seconds=61), the_spec=spec(activeDeadlineSeconds=60))
    assert failed.phase == "Failed" and Action("delete_job", 0) in failed.actions
    # The DELETE was lost: the finished job's next reconcile deletes the gang again.
    later = step(failed.status, running(), T0 + timedelta(seconds=90), the_spec=spec(activeDeadlineSeconds=60))
    assert later.actions == [Action("delete_job", 0)] and later.phase == "Failed"
    gone = step(failed.status, None, T0 + timedelta(seconds=120), the_spec=spec(activeDeadlineSeconds=60))
    assert gone.actions == []


def test_clean_pod_policy_all_is_reapplied_to_a_finished_job() -> None:
    everything = spec(cleanPodPolicy="All")
    done = step(accepted(), TrainerJobState(gang=0, succeeded=True, template_hash=HASH), the_spec=everything)
    assert done.phase == "Succeeded" and Action("delete_job", 0) in done.actions
    serving = ServingState(1, 1, spec_hash=builders.serving_hash(everything))
    again = step(done.status, TrainerJobState(gang=0, succeeded=True, template_hash=HASH), the_spec=everything, serving=serving)
    assert Action("delete_job", 0) in again.actions, "the Job left by a lost DELETE goes on the next look"
    kept = step(done.status, TrainerJobState(gang=0, succeeded=True, template_hash=HASH), the_spec=spec(), serving=serving)
    assert Action("delete_job", 0) not in kept.actions, "cleanPodPolicy Running keeps a finished gang's pods"


def test_leaving_a_shared_server_is_remembered_until_the_adapter_is_off_it() -> None:
    lora = {**SPEC, "training": {**SPEC["training"], "lora": {"enabled": True}}}
    shared = parse_spec({**lora, "serving": {"server": "sd15"}})
    own = parse_spec(lora)
    done = step(accepted(), TrainerJobState(gang=0, succeeded=True, template_hash=HASH), the_spec=shared).status
    assert done["phase"] == "Succeeded" and done["serving"]["server"] == "sd15"
    moved = step(done, None, the_spec=own)
    assert Action("unregister_adapter", server="sd15") in moved.actions
    assert moved.status["leavingServers"] == ["sd15"] and moved.done_when_acted == ("leavingServers",)
    # The unregister failed (no follow-up commit): the next reconcile still knows and tries again.
    again = step(moved.status, None, the_spec=own)
    assert Action("unregister_adapter", server="sd15") in again.actions
    # It succeeded: the reconciler drops the record; nothing is left to do.
    cleared = lifecycle.acted(again.status, again.done_when_acted).status
    assert "leavingServers" not in cleared
    assert Action("unregister_adapter", server="sd15") not in step(cleared, None, the_spec=own).actions
    assert not [a for a in step(done, None, the_spec=shared).actions if a.kind == "unregister_adapter"]
