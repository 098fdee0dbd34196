"""The lifecycle on a shared GPU cluster: Kueue, failure classes, waits, conflicts, no drift (pure)."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from dreambooth_operator import builders, failures, installation, lifecycle, polling
from dreambooth_operator.failures import PodState
from dreambooth_operator.lifecycle import Action, Observation, QueueState, ServingState, TrainerJobState
from dreambooth_api.v1alpha1.spec import parse_spec
from tests.unit.test_operator_lifecycle import SPEC, T0, accepted, spec

HASH = builders.trainer_template_hash(parse_spec(SPEC))


def step(status: dict[str, Any], job: TrainerJobState | None, now: datetime = T0, the_spec: Any = None,
         generation: int = 1, **kw: Any) -> lifecycle.Plan:
    return lifecycle.decide(Observation("rex", "ns", generation, the_spec or spec(), status, now, job=job, **kw))


def conditions(plan: lifecycle.Plan) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in plan.status["conditions"]}


def running(**kw: Any) -> TrainerJobState:
    return TrainerJobState(gang=0, active=2, ready=2, template_hash=HASH, **kw)


def failed(message: str, reason: str = "PodFailurePolicy") -> TrainerJobState:
    return TrainerJobState(gang=0, failed=True, failure_reason=reason, failure_message=message, template_hash=HASH)


# --- conditions users can wait on ------------------------------------------------------------


def test_every_condition_follows_the_generation_after_an_edit() -> None:
    done = step(step(accepted(), None).status, TrainerJobState(gang=0, succeeded=True), the_spec=spec(), serving=None)
    assert all(c["observedGeneration"] == 1 for c in done.status["conditions"])
    # An edit (generation 2) of a finished job re-evaluates nothing, yet every condition reports it:
    # `kubectl wait --for=condition=Succeeded` keeps working after the edit.
    edited = step(done.status, None, the_spec=spec(ttlSecondsAfterFinished=600), generation=2)
    assert {c["observedGeneration"] for c in edited.status["conditions"]} == {2}
    assert edited.status["observedGeneration"] == 2 and edited.events == []


def test_finished_is_true_on_every_outcome() -> None:
    failed_plan = step(accepted(restarts=2, gang=2), failed("boom", "BackoffLimitExceeded"))
    assert conditions(failed_plan)["Finished"] == ("True", "JobFailed")
    no_serving = parse_spec({**SPEC, "serving": {"enabled": False}})
    assert conditions(step(accepted(), TrainerJobState(gang=0, succeeded=True), the_spec=no_serving))["Finished"] == ("True", "ServingDisabled")
    stuck = ServingState(1, 0, spec_hash=builders.serving_hash(spec()), failed_message='ReplicaSet "rex-serve-1" has timed out progressing.')
    plan = step(accepted(), TrainerJobState(gang=0, succeeded=True), serving=stuck)
    assert conditions(plan)["ServingReady"] == ("False", "ServingFailed") and conditions(plan)["Finished"] == ("True", "ServingFailed")
    loading = step(accepted(), TrainerJobState(gang=0, succeeded=True), serving=ServingState(1, 0, spec_hash=builders.serving_hash(spec())))
    assert "Finished" not in conditions(loading), "still loading weights: not finished yet"


def test_a_finished_job_has_no_timer() -> None:
    serving = ServingState(1, 1, spec_hash=builders.serving_hash(spec()))
    done = step(accepted(), TrainerJobState(gang=0, succeeded=True), serving=serving)
    later = step(done.status, None, T0 + timedelta(hours=1), serving=serving)
    assert later.requeue_after is None and later.actions == []
    failed_plan = step(accepted(restarts=2, gang=2), failed("boom", "BackoffLimitExceeded"))
    assert step(failed_plan.status, None, T0 + timedelta(hours=1)).requeue_after is None


# --- Kueue ------------------------------------------------------------------------------------


def test_a_queued_gang_waits_for_kueue_and_is_never_unsuspended_by_the_operator() -> None:
    policy = spec(activeDeadlineSeconds=60)
    created = step(accepted(), None, the_spec=policy, queue_name="user-queue")
    assert created.actions == [Action("create_job", 0)] and created.phase == "Queued"
    assert conditions(created)["Queued"] == ("True", "WaitingForAdmission")
    assert "startTime" not in created.status, "queued time is not deadline time"
    kueue_says = QueueState(False, "Pending", "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu")
    for minutes in (1, 10):  # far past activeDeadlineSeconds, still only queued
        waiting = step(created.status, TrainerJobState(gang=0, suspended=True, template_hash=HASH), T0 + timedelta(minutes=minutes),
                       the_spec=policy, queue_name="user-queue", queue=kueue_says)
        assert waiting.actions == [] and waiting.phase == "Queued"
        assert "insufficient quota" in next(c for c in waiting.status["conditions"] if c["type"] == "Queued")["message"]
    admitted = step(waiting.status, running(), T0 + timedelta(minutes=10), the_spec=policy, queue_name="user-queue")
    assert admitted.phase == "Running" and conditions(admitted)["Queued"] == ("False", "Admitted")
    assert admitted.status["startTime"] == "2026-11-26T06:10:00Z"


def test_kueue_preemption_stops_the_gang_and_spends_no_restart() -> None:
    status = step(accepted(queueName="user-queue"), running(), queue_name="user-queue").status
    preempted = step(status, TrainerJobState(gang=0, suspended=True, template_hash=HASH), T0 + timedelta(minutes=5),
                     queue_name="user-queue", queue=QueueState(False, "Preempted", "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue"))
    assert preempted.actions == [], "Kueue suspended it; the operator neither resumes nor restarts it"
    assert preempted.phase == "Queued" and conditions(preempted)["Queued"] == ("True", "Preempted")
    assert preempted.status["restarts"] == 0 and preempted.status["gang"] == 0 and "startTime" not in preempted.status
    back = step(preempted.status, running(), T0 + timedelta(minutes=9), queue_name="user-queue")
    assert back.phase == "Running" and back.status["restarts"] == 0 and back.actions == []


def test_a_job_suspended_by_someone_else_stays_suspended() -> None:
    status = step(accepted(), running()).status
    plan = step(status, TrainerJobState(gang=0, suspended=True, template_hash=HASH))
    assert plan.actions == [] and conditions(plan)["Queued"] == ("True", "SuspendedByOthers")


def test_user_suspend_of_a_queued_job_removes_the_gang_and_requeues_a_new_one() -> None:
    status = step(accepted(queueName="user-queue"), running(), queue_name="user-queue").status
    suspended = step(status, running(), the_spec=spec(suspend=True), queue_name="user-queue")
    assert suspended.actions == [Action("delete_job", 0)] and suspended.status["gang"] == 1
    assert "jobSuspendedByOperator" not in suspended.status
    resumed = step(suspended.status, None, queue_name="user-queue")
    assert resumed.actions == [Action("create_job", 1)] and resumed.phase == "Queued"
    assert resumed.status["restarts"] == 0


def test_user_suspend_without_kueue_is_recorded_and_undone() -> None:
    status = step(accepted(), running()).status
    suspended = step(status, running(), the_spec=spec(suspend=True))
    assert suspended.actions == [Action("suspend_job", 0, True)] and suspended.status["jobSuspendedByOperator"] is True
    resumed = step(suspended.status, TrainerJobState(gang=0, suspended=True, template_hash=HASH))
    assert resumed.actions == [Action("suspend_job", 0, False)] and resumed.status["jobSuspendedByOperator"] is True
    assert "jobSuspendedByOperator" not in step(resumed.status, running()).status, "dropped once the Job is seen running"


# --- failure classes --------------------------------------------------------------------------


DISRUPTED = "Pod ns/rex-train-0-1-x has condition DisruptionTarget matching FailJob rule at index 1"
SIGTERM = "Container trainer for pod ns/rex-train-0-1-x failed with exit code 143 matching FailJob rule at index 2"
KILLED = "Container trainer for pod ns/rex-train-0-0-x failed with exit code 137 matching FailJob rule at index 3"


@pytest.mark.parametrize("message", [DISRUPTED, SIGTERM])
def test_a_disruption_restarts_the_gang_without_spending_a_restart(message: str) -> None:
    status = step(accepted(), running()).status
    plan = step(status, failed(message))
    assert plan.actions == [Action("delete_job", 0)] and plan.phase == "Restarting"
    assert (plan.status["restarts"], plan.status["disruptions"], plan.status["gang"]) == (0, 1, 1)
    assert conditions(plan)["Restarting"] == ("True", "GangDisrupted")
    assert plan.status["restartAt"] == "2026-11-26T06:00:02Z"


def test_disruptions_are_bounded_by_their_own_limit() -> None:
    status = step(accepted(disruptions=2, gang=2), running(), the_spec=spec(maxDisruptions=2)).status
    plan = step(status, failed(DISRUPTED), the_spec=spec(maxDisruptions=2))
    assert plan.phase == "Failed" and conditions(plan)["Failed"] == ("True", "TooManyDisruptions")


def test_a_peer_of_a_preempted_rank_is_not_a_failure() -> None:
    pods = (PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, exit_code=1),
            PodState("rex-train-0-1-b", 0, "Failed", "gpu-1", True, exit_code=143, disrupted=True))
    plan = step(step(accepted(), running()).status, failed("Job has reached the specified backoff limit", "BackoffLimitExceeded"), pods=pods)
    assert plan.status["restarts"] == 0 and plan.status["disruptions"] == 1


def test_a_lost_node_is_a_disruption() -> None:
    pods = (PodState("rex-train-0-1-b", 0, "Failed", "gpu-3", True, exit_code=1, node_ready=False),)
    plan = step(step(accepted(), running()).status, failed("backoff limit", "BackoffLimitExceeded"), pods=pods)
    assert plan.status["disruptions"] == 1 and "gpu-3" in plan.status["conditions"][-1]["message"] + str(plan.status["conditions"])


def test_out_of_memory_fails_fast_naming_memory_unless_retries_are_asked_for() -> None:
    pods = (PodState("rex-train-0-0-x", 0, "Failed", "gpu-0", True, exit_code=137, terminated_reason="OOMKilled"),)
    status = step(accepted(), running()).status
    plan = step(status, failed(KILLED), pods=pods)
    assert plan.phase == "Failed" and conditions(plan)["Failed"] == ("True", "OutOfMemory")
    message = next(c for c in plan.status["conditions"] if c["type"] == "Failed")["message"]
    assert "OOMKilled" in message and "64Gi" in message and "spec.resources.memory" in message
    retried = step(status, failed(KILLED), pods=pods, the_spec=spec(retryOnOutOfMemory=True))
    assert retried.phase == "Restarting" and retried.status["restarts"] == 1


def test_sigkill_without_oom_is_an_ordinary_failure_and_exit_2_stays_permanent() -> None:
    status = step(accepted(), running()).status
    assert step(status, failed(KILLED)).status["restarts"] == 1
    bad = step(status, failed("Container trainer for pod ns/p failed with exit code 2 matching FailJob rule at index 0"))
    assert bad.phase == "Failed" and conditions(bad)["Failed"] == ("True", "TrainerRejectedInput")


def test_a_gang_that_cannot_be_placed_waits_and_spends_nothing() -> None:
    pods = (PodState("rex-train-0-0-a", 0, "Running", "gpu-0", True),
            PodState("rex-train-0-1-b", 0, "Pending", "", False, unschedulable_message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."))
    status = step(accepted(), None).status
    waiting = step(status, TrainerJobState(gang=0, active=2, ready=1, template_hash=HASH), pods=pods)
    assert conditions(waiting)["Running"] == ("False", "GangNotPlaced")
    assert "Insufficient nvidia.com/gpu" in str(waiting.status["conditions"]) and waiting.actions == []
    # The placed rank gave up waiting for its master: a new gang, nothing spent.
    gave_up = step(waiting.status, failed("backoff limit", "BackoffLimitExceeded"),
                   pods=(PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, exit_code=1), pods[1]))
    assert (gave_up.status["restarts"], gave_up.status["disruptions"], gave_up.status["gang"]) == (0, 0, 1)
    assert conditions(gave_up)["Restarting"] == ("True", "GangNotPlaced")
    # The failed Job's controller already removed the unplaced pod: the last look still counts.
    gone = step(waiting.status, failed("backoff limit", "BackoffLimitExceeded"), pods=(PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, exit_code=1),))
    assert gone.status["restarts"] == 0 and conditions(gone)["Restarting"] == ("True", "GangNotPlaced")


def test_pods_of_an_old_gang_stuck_on_a_lost_node_are_force_deleted_after_their_grace() -> None:
    status = accepted(gang=1, disruptions=1)
    deadline = T0 - timedelta(seconds=1)  # deletionTimestamp: deletion time + grace period, passed
    lost = PodState("rex-train-0-1-b", 0, "Running", "gpu-3", True, deletion_deadline=deadline, node_ready=False)
    plan = step(status, None, stale_pods=1, old_pods=(lost,))
    assert Action("force_delete_pod", target="rex-train-0-1-b") in plan.actions
    assert Action("create_job", 1) not in plan.actions and conditions(plan)["Running"] == ("False", "WaitingForOldGang")
    alive = PodState("rex-train-0-1-b", 0, "Running", "gpu-3", True, deletion_deadline=deadline, node_ready=True)
    assert not any(a.kind == "force_delete_pod" for a in step(status, None, stale_pods=1, old_pods=(alive,)).actions)
    in_grace = PodState("p", 0, "Running", "gpu-3", True, deletion_deadline=T0 + timedelta(seconds=30), node_ready=False)
    assert not any(a.kind == "force_delete_pod" for a in step(status, None, stale_pods=1, old_pods=(in_grace,)).actions)
    unknown = PodState("p", 0, "Running", "gpu-3", True, deletion_deadline=T0 - timedelta(seconds=61), node_ready=None)
    assert Action("force_delete_pod", target="p") in step(status, None, stale_pods=1, old_pods=(unknown,)).actions


# --- admission, conflicts, drift ---------------------------------------------------------------


def test_what_may_heal_waits_in_pending_with_the_cause_and_retries() -> None:
    plan = lifecycle.await_admission({}, 1, T0, "SecretNotFound", "Secret ns/s3 does not exist", False, 600)
    assert plan.phase == "Pending" and conditions(plan)["Accepted"] == ("False", "SecretNotFound")
    assert plan.requeue_after == 1.0 and "Failed" not in conditions(plan)
    later = lifecycle.await_admission(plan.status, 1, T0 + timedelta(seconds=4), "SecretNotFound", "Secret ns/s3 does not exist", False, 600)
    assert later.requeue_after == 2.0
    assert lifecycle.admission_retry_seconds(0) == 1.0 and lifecycle.admission_retry_seconds(10) == 5.0
    assert lifecycle.admission_retry_seconds(3600) == 30.0


def test_a_name_collision_is_a_condition_naming_the_object() -> None:
    message = "Service ns/rex-workers already exists and is not controlled by anything, not this DreamboothJob's"
    plan = lifecycle.name_conflict(accepted(), 1, T0, message)
    assert conditions(plan)["NameConflict"] == ("True", "ObjectNotOwned") and ("Warning", "ObjectNotOwned") in [e[:2] for e in plan.events]
    resolved = lifecycle.name_conflict(plan.status, 1, T0, None)
    assert conditions(resolved)["NameConflict"] == ("False", "Resolved")
    assert "NameConflict" not in conditions(lifecycle.name_conflict(accepted(), 1, T0, None)), "never set, never mentioned"


def test_acceptance_freezes_the_spec_and_snapshots_the_installation_defaults() -> None:
    snapshot = {"trainerImage": "reg/trainer:1", "storageBucket": "b1"}
    status = lifecycle.accept({}, 3, T0, "s3://b1/jobs/ns/rex/u", snapshot).status
    assert status["acceptedGeneration"] == 3 and status["installationDefaults"] == snapshot
    upgraded = {"DREAMBOOTH_TRAINER_IMAGE": "reg/trainer:2", "DREAMBOOTH_STORAGE_BUCKET": "b2"}
    assert installation.for_job(status, upgraded) == snapshot, "a helm upgrade does not reach an accepted job"
    assert installation.for_job({}, upgraded) == {"trainerImage": "reg/trainer:2", "storageBucket": "b2"}
    raw = {k: v for k, v in SPEC.items() if k != "storage"}
    raw["storage"] = {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3"}}
    completed = installation.spec_with_defaults(raw, snapshot)
    assert completed["storage"]["bucket"] == "b1" and completed["resources"]["image"] == "reg/trainer:1"


def test_a_scheduling_edit_applies_to_the_next_gang_and_says_so() -> None:
    edited = parse_spec({**SPEC, "scheduling": {"nodeSelector": {"pool": "h200"}}})
    status = step(accepted(), running()).status
    pending = step(status, running(), the_spec=edited)
    assert conditions(pending)["UpdatePending"] == ("True", "AppliesToNextGang") and pending.actions == []
    applied = step(pending.status, TrainerJobState(gang=0, active=2, ready=2, template_hash=builders.trainer_template_hash(edited)), the_spec=edited)
    assert conditions(applied)["UpdatePending"] == ("False", "Applied")


def test_a_serving_edit_rolls_the_deployment() -> None:
    current = ServingState(1, 1, spec_hash=builders.serving_hash(spec()))
    done = step(accepted(), TrainerJobState(gang=0, succeeded=True), serving=current)
    assert done.actions == []
    more = parse_spec({**SPEC, "serving": {"replicas": 3, "resources": {"gpus": 1, "cpu": "8", "memory": "32Gi"}}})
    assert step(done.status, None, the_spec=more, serving=current).actions == [Action("ensure_serving")]


# --- reading, polling ---------------------------------------------------------------------------


def test_failure_classes_from_the_jobs_condition() -> None:
    assert failures.classify("PodFailurePolicy", DISRUPTED, (), "8Gi").kind == failures.DISRUPTION
    assert failures.classify("PodFailurePolicy", SIGTERM, (), "8Gi").kind == failures.DISRUPTION
    assert failures.classify("BackoffLimitExceeded", "", (), "8Gi").kind == failures.FAILURE
    assert len(failures.rule_kinds()) == len(builders.POD_FAILURE_RULES)


def test_reading_pods_and_workloads() -> None:
    pod = {
        "metadata": {"name": "p", "labels": {"dreambooth.dev/gang": "2"}, "deletionTimestamp": "2026-11-26T06:10:00Z"},
        "spec": {"nodeName": "gpu-1"},
        "status": {"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
                   "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
    }
    state = lifecycle.pod_state(pod, node_ready=False)
    assert (state.gang, state.exit_code, state.terminated_reason, state.disrupted, state.scheduled) == (2, 137, "OOMKilled", True, True)
    assert state.deletion_deadline == T0 + timedelta(minutes=10)
    pending = lifecycle.pod_state({"metadata": {"name": "q"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes are available"}]}})
    assert not pending.scheduled and pending.unschedulable_message == "0/4 nodes are available"
    workload = {"status": {"conditions": [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "insufficient quota"},
        {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a workload"}]}}
    assert lifecycle.queue_state(workload) == QueueState(False, "Preempted", "Preempted to accommodate a workload")
    assert lifecycle.queue_state(None) is None


def test_a_decided_job_counts_before_its_last_pod_ends() -> None:
    """A pod on a lost node never ends, so the Job never says Failed: its FailureTarget is enough."""
    job = {"metadata": {"labels": {"dreambooth.dev/gang": "0"}}, "status": {"terminating": 1, "conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}}
    state = lifecycle.trainer_job_state(job)
    assert state.failed and state.failure_reason == "BackoffLimitExceeded"
    done = {"metadata": {"labels": {}}, "status": {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}}
    assert lifecycle.trainer_job_state(done).succeeded


def test_progress_polling_follows_the_step_time() -> None:
    first = polling.sample({"step": 10, "time": 1000.0})
    assert polling.next_poll_seconds(None, None, None) == polling.FIRST_SECONDS
    # No record yet: read as often for two minutes (a small model's first record comes soon), then
    # further apart up to the cap (1,000 gangs loading big models).
    assert polling.next_poll_seconds(None, None, polling.FIRST_SECONDS, waited=60) == polling.FIRST_SECONDS
    assert polling.next_poll_seconds(None, None, polling.FIRST_SECONDS, waited=130) == 2 * polling.FIRST_SECONDS
    assert polling.next_poll_seconds(None, None, polling.MAX_SECONDS, waited=600) == polling.MAX_SECONDS
    # The first record after a long wait: the next read comes soon, not a minute later.
    assert polling.next_poll_seconds(None, first, polling.MAX_SECONDS, waited=600) == polling.MIN_SECONDS
    slow = polling.sample({"step": 12, "time": 1060.0})  # 30 s a step
    assert polling.next_poll_seconds(first, slow, 10.0) == polling.MAX_SECONDS
    fast = polling.sample({"step": 110, "time": 1010.0})  # 0.1 s a step
    # Each changed record is one status PATCH: however fast the steps, at most 5 writes a minute.
    assert polling.next_poll_seconds(first, fast, 10.0) == polling.MIN_SECONDS >= 60 / 5
    medium = polling.sample({"step": 20, "time": 1020.0})  # 2 s a step: every 10 steps
    assert polling.next_poll_seconds(first, medium, 10.0) == 20.0
    assert polling.next_poll_seconds(medium, medium, 20.0) == 40.0, "an unchanged record: back off"


def test_the_progress_read_floor_is_an_installation_setting_with_a_checked_range() -> None:
    assert polling.floor_seconds({}) == polling.DEFAULT_FLOOR == 12.0
    assert polling.floor_seconds({polling.FLOOR_ENV: " 2 "}) == 2.0
    for bad in ("0", "61", "soon", "-3"):
        with pytest.raises(ValueError, match=f"{polling.FLOOR_ENV}='{bad}': the seconds between two progress reads"):
            polling.floor_seconds({polling.FLOOR_ENV: bad})


def test_kueue_without_a_queue_label_and_a_deactivated_workload() -> None:
    """Kueue's default LocalQueue (or manageJobsWithoutQueueName) queues a Job the job named no
    queue for; a deactivated Workload is not readmitted by itself, so the job never says it will be."""
    from dreambooth_operator.watches import Children, slim_workload

    job = {"metadata": {"name": "rex-train-0", "namespace": "ns", "uid": "j0", "labels": {"dreambooth.dev/job-name": "rex"}}}
    workload = {"metadata": {"name": "job-rex-train-0-1", "namespace": "ns", "uid": "w0",
                             "labels": {"kueue.x-k8s.io/job-uid": "j0"},
                             "ownerReferences": [{"kind": "Job", "name": "rex-train-0", "uid": "j0", "controller": True}]},
                "spec": {"queueName": "default", "active": False},
                "status": {"conditions": [{"type": "Evicted", "status": "True", "reason": "DeactivatedDueToRequeuingLimitExceeded",
                                           "message": "The workload is deactivated due to exceeding the maximum number of re-queuing retries"}]}}
    changed: list[tuple[str, str]] = []
    children = Children(["ns"], lambda namespace, name: changed.append((namespace, name)))
    children.jobs._store(("ns", "rex-train-0"), job)
    children.workloads._store(("ns", workload["metadata"]["name"]), slim_workload(workload))
    children.workloads._notify("ns", workload["metadata"]["name"], slim_workload(workload))
    assert changed == [("ns", "rex")], "a Workload's change reaches its DreamboothJob"
    state = lifecycle.queue_state(children.workloads.by_job_uid("j0"))
    assert state is not None and not state.active
    plan = step(step(accepted(), None).status, TrainerJobState(gang=0, suspended=True, template_hash=HASH),
                queue_name="default", queue=state)
    assert conditions(plan)["Queued"] == ("True", "Deactivated")
    assert "not admitted again" in str(plan.status["conditions"]) and "resumes" not in str(plan.status["conditions"])
    # Without a Workload it is someone else's suspension, as before.
    other = step(step(accepted(), None).status, TrainerJobState(gang=0, suspended=True, template_hash=HASH))
    assert conditions(other)["Queued"] == ("True", "SuspendedByOthers")


def test_a_gang_is_placed_whole_by_a_pod_group_where_the_cluster_serves_one() -> None:
    served = step(accepted(), None, pod_groups_served=True)
    assert served.actions == [Action("create_job", 0, True)] and served.status["gangScheduling"] == "PodGroup"
    assert conditions(served)["GangScheduling"] == ("True", "PodGroup")
    ref = builders.JobRef("rex", "ns", "u", spec())
    group = builders.build_pod_group(ref, 0)
    assert group["spec"] == {"schedulingPolicy": {"gang": {"minCount": 2}}} and group["metadata"]["name"] == "rex-train-0"
    pod = builders.build_trainer_job(ref, 0, pod_group=True)["spec"]["template"]["spec"]
    assert pod["schedulingGroup"] == {"podGroupName": "rex-train-0"}
    # Not served, not queued: said so, and a gang never placed whole is retried a bounded number of times.
    bare = step(accepted(), None)
    assert bare.actions == [Action("create_job", 0)] and conditions(bare)["GangScheduling"] == ("False", "Unprotected")
    assert "at most 10 times" in str(bare.status["conditions"])
    assert "schedulingGroup" not in builders.build_trainer_job(ref, 0)["spec"]["template"]["spec"]
    queued = step(accepted(), None, queue_name="user-queue", pod_groups_served=True)
    assert queued.actions == [Action("create_job", 0)] and conditions(queued)["GangScheduling"] == ("True", "Kueue")
