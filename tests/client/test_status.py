"""A job's status as the client shows it: parsed from the API dict, one line per change, a panel."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from dataclasses import replace

from dreambooth_client.status import (
    JobStatus, Progress, change_key, format_seconds, job_status, panel_lines, plain_line, progress_from_record,
    with_fresher_progress,
)

RUNNING = {
    "metadata": {"name": "rex", "namespace": "team-a", "creationTimestamp": "2026-11-30T10:00:00Z"},
    "spec": {"training": {"lora": {"enabled": True}}},
    "status": {
        "phase": "Running", "restarts": 1, "outputUri": "s3://b/jobs/team-a/rex/u1",
        "progress": {"step": 40, "totalSteps": 400, "percent": 10.0, "loss": 0.1234, "imagesPerSecond": 12.5,
                     "etaSeconds": 300.0, "eta": "5m", "summary": "40/400 (10%)", "updateTime": "2026-11-30T10:05:00Z"},
        "conditions": [{"type": "Accepted", "status": "True", "reason": "ChecksPassed", "message": "ok"}],
    },
}


def test_a_running_job() -> None:
    status = job_status(RUNNING)
    assert (status.name, status.namespace, status.phase, status.restarts, status.lora) == ("rex", "team-a", "Running", 1, True)
    assert status.progress == Progress(40, 400, 0.1234, 12.5, 300.0, updated=datetime(2026, 11, 30, 10, 5, tzinfo=timezone.utc).timestamp())
    assert status.condition("Accepted").reason == "ChecksPassed" and not status.serving_ready
    assert status.reached("running") and not status.reached("finished") and not status.reached("serving")
    assert plain_line(status, now=0).split("  ", 1)[1] == (
        "team-a/rex  Running  step 40/400 (10%)  loss 0.1234  12.50 images/s  ETA 5m00s  restarts 1")


def test_serving_goals() -> None:
    succeeded = {**RUNNING, "status": {**RUNNING["status"], "phase": "Succeeded", "endpoint": "http://rex-serve.team-a.svc:8080",
                                        "conditions": [{"type": "ServingReady", "status": "False", "reason": "DeploymentNotReady",
                                                        "message": "0/1 inference pods ready"}]}}
    status = job_status(succeeded)
    assert status.reached("finished") and not status.reached("serving")
    assert plain_line(status, now=0).endswith("restarts 1  serving: 0/1 inference pods ready")
    ready = replace(status, conditions=(replace(status.conditions[0], status="True"),))
    assert ready.reached("serving") and plain_line(ready, now=0).endswith("serving at http://rex-serve.team-a.svc:8080")
    off = job_status({**succeeded, "spec": {"serving": {"enabled": False}}})
    assert off.reached("serving") and "serving off" in plain_line(off, now=0)


def test_a_failed_job_reaches_every_goal_and_says_why() -> None:
    failed = job_status({"metadata": {"name": "rex", "namespace": "a"}, "status": {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "InstanceDataUnreadable", "message": "data.instanceUri: no images"}]}})
    assert all(failed.reached(goal) for goal in ("created", "running", "finished", "serving"))
    assert failed.failure == "InstanceDataUnreadable: data.instanceUri: no images"
    assert panel_lines(failed, 3)[-1] == "failed: InstanceDataUnreadable: data.instanceUri: no images"


def test_the_shared_servers_url_and_model_win_over_the_endpoint() -> None:
    body = {**RUNNING, "status": {**RUNNING["status"], "endpoint": "http://old.team-a.svc:8080",
                                  "serving": {"url": "http://sd15.team-a.svc:8080", "model": "rex"}}}
    status = job_status(body)
    assert status.endpoint == "http://sd15.team-a.svc:8080" and status.model_name == "rex"


def test_a_change_is_phase_step_restarts_serving_or_message() -> None:
    status = job_status(RUNNING)
    same = replace(status, progress=replace(status.progress, loss=0.5, eta_seconds=10))
    assert change_key(same) == change_key(status), "loss and ETA move with the step"
    for changed in (replace(status, phase="Restarting"), replace(status, restarts=2), replace(status, message="x"),
                    replace(status, progress=replace(status.progress, step=41))):
        assert change_key(changed) != change_key(status)


def test_the_fresher_progress_record_wins_while_training() -> None:
    status = job_status(RUNNING)
    record = progress_from_record({"state": "training", "step": 55, "total_steps": 400, "percent": 13.8, "loss": 0.2,
                                   "images_per_second": 13.0, "eta_seconds": 250.0, "time": time.time()})
    assert with_fresher_progress(status, record).progress == record
    older = replace(record, step=30)
    assert with_fresher_progress(status, older) == status
    finished = replace(status, phase="Succeeded")
    assert with_fresher_progress(finished, record) == finished
    assert progress_from_record({"state": "starting"}) is None


def test_the_panel() -> None:
    status = job_status(RUNNING)
    lines = panel_lines(status, 75, samples=2, samples_dir="rex/samples", latest_sample="step-00000040.png")
    assert lines[0] == "team-a/rex  Running  (1m15s)  restarts 1"
    assert lines[1] == "███░░░░░░░░░░░░░░░░░░░░░░░░░░░  step 40/400 (10%)  loss 0.1234  12.50 images/s  ETA 5m00s"
    assert lines[2] == "samples: 2 in rex/samples (latest step-00000040.png)"
    pending = JobStatus("rex", "team-a", message="gang 0: 0/2 pods running")
    assert panel_lines(pending, 0)[1].endswith("gang 0: 0/2 pods running")


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (None, 0, 59.6, 61, 3600, 86399)] == ["?", "0s", "1m00s", "1m01s", "1h00m", "23h59m"]
