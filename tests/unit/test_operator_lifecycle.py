"""The job's state machine (`lifecycle.decide`) on observed worlds: no cluster needed."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

from dreambooth_operator import builders, lifecycle
from dreambooth_operator.lifecycle import Action, Observation, ServingState, TrainerJobState
from dreambooth_api.v1alpha1.spec import parse_spec

T0 = datetime(2026, 11, 26, 6, 0, 0, tzinfo=timezone.utc)
SPEC: dict[str, Any] = {
    "data": {"instanceUri": "s3://subjects/rex", "instancePrompt": "a photo of sks dog"},
    "prior": {"classPrompt": "a photo of dog"},
    "training": {"maxSteps": 100},
    "resources": {"nodes": 2, "gpusPerNode": 8},
    "storage": {"endpoint": "minio:9000", "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3"}},
    "runPolicy": {"maxRestarts": 2},
}


def spec(**run_policy: Any) -> Any:
    data = copy.deepcopy(SPEC)
    data["runPolicy"].update(run_policy)
    return parse_spec(data)


def accepted(**extra: Any) -> dict[str, Any]:
    status = lifecycle.accept({}, 1, T0, "s3://dreambooth/jobs/ns/rex/u").status
    status.update(extra)
    return status


def observe(status: dict[str, Any], job: TrainerJobState | None = None, now: datetime = T0, the_spec: Any = None, **kw: Any) -> Observation:
    return Observation("rex", "ns", 1, the_spec or spec(), status, now, job=job, **kw)


def types_true(status: dict[str, Any]) -> set[str]:
    return {c["type"] for c in status["conditions"] if c["status"] == "True"}


def step(status: dict[str, Any], job: TrainerJobState | None, now: datetime = T0, **kw: Any) -> lifecycle.Plan:
    return lifecycle.decide(observe(status, job, now, **kw))


def test_accept_and_reject() -> None:
    status = accepted()
    assert status["phase"] == "Pending" and status["restarts"] == 0 and status["outputUri"] == "s3://dreambooth/jobs/ns/rex/u"
    assert types_true(status) == {"Accepted"}
    refused = lifecycle.reject({}, 1, T0, "SecretNotFound", "storage.credentialsSecretRef: Secret ns/s3 does not exist")
    assert refused.phase == "Failed"
    assert [(c["type"], c["status"], c["reason"]) for c in refused.status["conditions"]] == [
        ("Accepted", "False", "SecretNotFound"), ("Failed", "True", "SecretNotFound"), ("Finished", "True", "JobFailed"),
    ]
    assert refused.actions == []
    assert refused.events == [
        ("Warning", "SecretNotFound", "Failed=True: storage.credentialsSecretRef: Secret ns/s3 does not exist"),
        ("Normal", "JobFailed", "Finished=True: storage.credentialsSecretRef: Secret ns/s3 does not exist"),
    ]


def test_an_accepted_job_creates_gang_zero() -> None:
    plan = step(accepted(), None)
    assert plan.actions == [Action("create_job", 0)]
    assert plan.status["startTime"] == "2026-11-26T06:00:00Z"
    assert plan.phase == "Pending"


def test_the_same_world_gives_the_same_plan() -> None:
    first = step(accepted(), None)
    second = step(first.status, None, T0 + timedelta(seconds=10))
    assert second.actions == [Action("create_job", 0)]  # idempotent: the Job name is fixed
    assert second.status["startTime"] == first.status["startTime"] and second.events == []


def test_running_when_every_pod_of_the_gang_is_ready() -> None:
    status = step(accepted(), None).status
    pending = step(status, TrainerJobState(gang=0, active=2, ready=1))
    assert pending.phase == "Pending" and pending.actions == []
    running = step(pending.status, TrainerJobState(gang=0, active=2, ready=2),
                   progress={"step": 50, "total_steps": 100, "eta_seconds": 61, "loss": 0.1, "images_per_second": 3.0, "time": 0},
                   latest_checkpoint="s3://dreambooth/jobs/ns/rex/u/checkpoints/step-00000040")
    assert running.phase == "Running"
    assert running.status["progress"]["summary"] == "50/100 (50%)" and running.status["progress"]["eta"] == "1m01s"
    assert running.status["latestCheckpoint"].endswith("step-00000040")
    assert running.events == [("Normal", "GangRunning", "Running=True: all 2 pods of gang 0 are running")]


def test_trainers_that_exited_0_before_the_job_says_complete_keep_it_running() -> None:
    """The window between the trainers' exit 0 (no pod ready) and the Job's Complete: the job was
    read as Pending with the previous poll's progress (a follower printed step 6/8 after 8/8)."""
    from dreambooth_operator.failures import PodState

    record = {"step": 8, "total_steps": 8, "eta_seconds": 0, "loss": 0.1, "images_per_second": 1.0, "time": 0}
    running = step(step(accepted(), None).status, TrainerJobState(gang=0, active=2, ready=2)).status
    done = (PodState("rex-train-0-0-a", 0, "Succeeded", "gpu-0", True, exit_code=0, created=T0),
            PodState("rex-train-0-1-b", 0, "Running", "gpu-1", True, exit_code=0, created=T0))
    plan = step(running, TrainerJobState(gang=0, active=1, ready=0), T0 + timedelta(seconds=30), pods=done, progress=record)
    assert plan.phase == "Running" and plan.actions == []
    condition = next(c for c in plan.status["conditions"] if c["type"] == "Running")
    assert condition["reason"] == "TrainersFinished" and "rex-train-0-0-a" in condition["message"]
    assert plan.status["progress"]["summary"] == "8/8 (100%)"
    # A pod that failed beside them is not a finish: the Job's own failure decides.
    failed = (done[0], PodState("rex-train-0-1-b", 0, "Failed", "gpu-1", True, exit_code=1, created=T0))
    assert step(running, TrainerJobState(gang=0, active=0, ready=0), T0 + timedelta(seconds=30), pods=failed).phase == "Pending"


def test_a_failed_pod_restarts_the_whole_gang_with_backoff() -> None:
    running = step(step(accepted(), None).status, TrainerJobState(gang=0, active=2, ready=2)).status
    failed = TrainerJobState(gang=0, failed=True, failure_reason="BackoffLimitExceeded", failure_message="Job has reached the specified backoff limit")
    plan = step(running, failed)
    assert plan.phase == "Restarting"
    assert plan.status["restarts"] == 1 and plan.status["gang"] == 1
    assert plan.status["restartAt"] == "2026-11-26T06:00:10Z"
    assert plan.actions == [Action("delete_job", 0)]
    assert ("Warning", "GangFailed") in [(e[0], e[1]) for e in plan.events]

    # Old pods still terminating (writing their SIGTERM checkpoint): wait.
    waiting = step(plan.status, None, T0 + timedelta(seconds=20), stale_jobs=(0,), stale_pods=2)
    assert waiting.actions == [Action("delete_job", 0)] and waiting.phase == "Restarting"
    # Pods gone but the backoff has not passed: wait.
    early = step(plan.status, None, T0 + timedelta(seconds=5))
    assert early.actions == [] and early.requeue_after == 5
    # Both done: gang 1 starts, resuming from the checkpoint.
    restarted = step(plan.status, None, T0 + timedelta(seconds=11))
    assert restarted.actions == [Action("create_job", 1)]
    assert "restartAt" not in restarted.status and restarted.phase == "Pending"
    again = step(restarted.status, TrainerJobState(gang=1, active=2, ready=2), T0 + timedelta(seconds=30))
    assert again.phase == "Running" and again.status["restarts"] == 1


def test_past_max_restarts_the_job_fails() -> None:
    status = accepted(restarts=2, gang=2)
    plan = step(status, TrainerJobState(gang=2, failed=True, failure_reason="BackoffLimitExceeded", failure_message="pod failed"))
    assert plan.phase == "Failed"
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "MaxRestartsExceeded" and "runPolicy.maxRestarts=2" in failed["message"]
    assert plan.status["completionTime"] == "2026-11-26T06:00:00Z"


def test_bad_input_fails_at_once_without_restarts() -> None:
    plan = step(accepted(), TrainerJobState(gang=0, failed=True, failure_reason="PodFailurePolicy", failure_message="exit code 2"))
    assert plan.phase == "Failed" and plan.status["restarts"] == 0
    assert next(c for c in plan.status["conditions"] if c["type"] == "Failed")["reason"] == "TrainerRejectedInput"


def test_suspend_and_resume() -> None:
    running = step(step(accepted(), None).status, TrainerJobState(gang=0, active=2, ready=2)).status
    suspended = lifecycle.decide(observe(running, TrainerJobState(gang=0, active=2, ready=2), the_spec=spec(suspend=True)))
    assert suspended.phase == "Suspended"
    assert suspended.actions == [Action("suspend_job", 0, True)]
    assert "startTime" not in suspended.status
    quiet = lifecycle.decide(observe(suspended.status, TrainerJobState(gang=0, suspended=True), the_spec=spec(suspend=True)))
    assert quiet.actions == [] and quiet.events == []
    resumed = lifecycle.decide(observe(suspended.status, TrainerJobState(gang=0, suspended=True), T0 + timedelta(minutes=5)))
    assert resumed.actions == [Action("suspend_job", 0, False)]
    assert "startTime" not in resumed.status and resumed.phase == "Pending"
    running_again = lifecycle.decide(observe(resumed.status, TrainerJobState(gang=0, active=2, ready=2), T0 + timedelta(minutes=5)))
    assert running_again.status["startTime"] == "2026-11-26T06:05:00Z"  # the deadline restarts with the resume
    assert ("Normal", "Resumed") in [(e[0], e[1]) for e in resumed.events]


def test_deadline_fails_the_job_and_removes_the_pods() -> None:
    status = step(accepted(), None).status
    the_spec = spec(activeDeadlineSeconds=60)
    within = lifecycle.decide(observe(status, TrainerJobState(gang=0, active=2, ready=2), T0 + timedelta(seconds=59), the_spec=the_spec))
    assert within.phase == "Running"
    past = lifecycle.decide(observe(within.status, TrainerJobState(gang=0, active=2, ready=2), T0 + timedelta(seconds=61), the_spec=the_spec))
    assert past.phase == "Failed" and past.actions == [Action("delete_job", 0)]
    assert next(c for c in past.status["conditions"] if c["type"] == "Failed")["reason"] == "DeadlineExceeded"
    assert {c["type"]: c["status"] for c in past.status["conditions"]}["Running"] == "False"


def test_success_serves_the_model_and_follows_readiness() -> None:
    status = step(accepted(), None).status
    done = step(status, TrainerJobState(gang=0, succeeded=True), progress={"step": 99, "total_steps": 100})
    assert done.phase == "Succeeded"
    assert done.actions == [Action("ensure_serving")]
    assert done.status["endpoint"] == "http://rex-serve.ns.svc:8080"
    assert done.status["progress"]["summary"] == "100/100 (100%)"
    assert {c["type"]: c["status"] for c in done.status["conditions"]}["ServingReady"] == "False"
    ready = step(done.status, TrainerJobState(gang=0, succeeded=True), serving=ServingState(1, 1, "dreambooth/inference:0.1.0"))
    assert ready.actions == [Action("ensure_serving")], "a Deployment built from another spec is rolled"
    serving = ServingState(1, 1, "dreambooth/inference:0.1.0", spec_hash=builders.serving_hash(spec()))
    ready = step(done.status, TrainerJobState(gang=0, succeeded=True), serving=serving)
    assert ready.actions == [] and {"ServingReady", "Finished"} <= types_true(ready.status)
    assert ready.events == [
        ("Normal", "DeploymentReady", "ServingReady=True: 1/1 inference pods ready at http://rex-serve.ns.svc:8080"),
        ("Normal", "ServingReady", "Finished=True: training succeeded; 1/1 inference pods ready at http://rex-serve.ns.svc:8080"),
    ]


def test_a_checkpoint_chosen_after_success_is_exported_before_it_is_served() -> None:
    """serving.checkpoint edited to a step training did not export: an export Job makes it while the
    Deployment keeps what it served; once exported the Deployment rolls; a failed export is named."""
    from dreambooth_operator.lifecycle import ExportState

    final_spec = spec()
    served = ServingState(1, 1, "dreambooth/inference:0.1.0", spec_hash=builders.serving_hash(final_spec))
    finished = step(step(accepted(), None).status, TrainerJobState(gang=0, succeeded=True), serving=served).status
    finished["fidelity"] = {"best": {"step": 40}, "served": "final"}
    data = copy.deepcopy(SPEC)
    data["checkpointing"] = {"everyNSteps": 20}
    data["serving"] = {"checkpoint": "step-40"}
    chosen = parse_spec(data)
    prefix = "exports/step-00000040"

    def look(export: ExportState) -> lifecycle.Plan:
        return lifecycle.decide(observe(finished, None, T0 + timedelta(minutes=5), the_spec=chosen, serving=served, export=export))

    def serving_ready(plan: lifecycle.Plan) -> dict[str, Any]:
        return next(c for c in plan.status["conditions"] if c["type"] == "ServingReady")

    first = look(ExportState(prefix, False))
    assert first.actions == [Action("create_export_job")] and first.phase == "Succeeded"
    assert serving_ready(first)["status"] == "False" and serving_ready(first)["reason"] == "Exporting"
    assert "Job rex-export-step-40 exports it to exports/step-00000040/; what was served keeps serving" in serving_ready(first)["message"]
    assert first.status["endpoint"] == "http://rex-serve.ns.svc:8080", "the endpoint stays while it serves the previous choice"
    running = look(ExportState(prefix, False, TrainerJobState(gang=0, active=1)))
    assert running.actions == [] and serving_ready(running)["reason"] == "Exporting" and running.requeue_after
    failed = look(ExportState(prefix, False, TrainerJobState(gang=0, failed=True, failure_reason="PodFailurePolicy"),
                              "serving.checkpoint step-40: checkpoints/step-00000040 is no longer stored"))
    assert failed.actions == [] and serving_ready(failed)["reason"] == "ExportFailed"
    assert "spec.serving.checkpoint step-40" in serving_ready(failed)["message"] and "is no longer stored" in serving_ready(failed)["message"]
    done = look(ExportState(prefix, True, TrainerJobState(gang=0, succeeded=True)))
    assert done.actions == [Action("ensure_serving")], "exported: the Deployment rolls to it"
    assert done.status["fidelity"] == {"best": {"step": 40}, "served": prefix} and first.status["fidelity"]["served"] == "final"


def test_ttl_after_finished_deletes_the_job() -> None:
    status = lifecycle.decide(observe(accepted(), TrainerJobState(gang=0, succeeded=True), the_spec=spec(ttlSecondsAfterFinished=60))).status
    the_spec = spec(ttlSecondsAfterFinished=60)
    serving = ServingState(1, 1, "dreambooth/inference:0.1.0", spec_hash=builders.serving_hash(the_spec))
    early = lifecycle.decide(observe(status, None, T0 + timedelta(seconds=30), the_spec=the_spec, serving=serving))
    assert early.actions == [] and early.requeue_after == 30
    late = lifecycle.decide(observe(status, None, T0 + timedelta(seconds=61), the_spec=the_spec, serving=serving))
    assert late.actions == [Action("delete_self")]


def test_reading_a_batch_job() -> None:
    job = {
        "metadata": {"name": "rex-train-1", "labels": {"dreambooth.dev/gang": "1"}},
        "spec": {"suspend": False},
        "status": {
            "active": 1, "ready": 1,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "Container trainer for pod ns/rex-train-1-0 failed with exit code 2"},
            ],
        },
    }
    state = lifecycle.trainer_job_state(job)
    assert state == TrainerJobState(gang=1, active=1, ready=1, failed=True, failure_reason="PodFailurePolicy",
                                    failure_message="Container trainer for pod ns/rex-train-1-0 failed with exit code 2")
    assert state.permanent_failure
    current, stale = lifecycle.split_gangs([job, {"metadata": {"labels": {"dreambooth.dev/gang": "0"}}}], 1)
    assert current is job and stale == (0,)
    pods = [{"metadata": {"labels": {"dreambooth.dev/gang": g}}} for g in ("0", "0", "1")]
    assert lifecycle.count_stale_pods(pods, 1) == 2
    assert lifecycle.serving_state(None) is None
