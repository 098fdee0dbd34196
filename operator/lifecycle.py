"""The job's state machine as one pure function: what was observed -> what to do and to record.

Level-triggered: every decision is taken from the status and the world as they are now, and
every action is idempotent (deterministic names, create-if-absent, delete-if-present), so an
operator killed at any point converges when it starts again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dreambooth_trainer.spec import DreamboothJobSpec

from . import builders, shared_server
from .conditions import (
    ACCEPTED,
    FAILED,
    RESTARTING,
    RUNNING,
    SERVING_READY,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL_PHASES,
    completed_progress,
    derive_phase,
    format_time,
    parse_time,
    progress_status,
    restart_backoff_seconds,
    set_condition,
    transition_events,
)


@dataclass(frozen=True)
class TrainerJobState:
    """What the operator needs to know about the current gang's batch/v1 Job."""

    gang: int
    active: int = 0
    ready: int = 0
    succeeded: bool = False
    failed: bool = False
    failure_reason: str = ""
    failure_message: str = ""
    suspended: bool = False

    @property
    def permanent_failure(self) -> bool:
        # Only the podFailurePolicy rule (trainer exit code 2: bad config or input) says so.
        return self.failed and self.failure_reason == "PodFailurePolicy"


@dataclass(frozen=True)
class ServingState:
    replicas: int
    ready_replicas: int
    image: str = ""


@dataclass(frozen=True)
class Observation:
    name: str
    namespace: str
    generation: int | None
    spec: DreamboothJobSpec
    status: dict[str, Any]
    now: datetime
    job: TrainerJobState | None = None
    stale_jobs: tuple[int, ...] = ()  # gangs older than the current one whose Job still exists
    stale_pods: int = 0  # pods of older gangs still present (terminating)
    progress: dict[str, Any] | None = None  # progress.json, when readable
    latest_checkpoint: str | None = None
    serving: ServingState | None = None
    shared: shared_server.SharedServerState | None = None  # the shared server named by serving.server


@dataclass(frozen=True)
class Action:
    kind: str  # create_job, delete_job, suspend_job, ensure_serving, delete_serving, register_adapter, unregister_adapter, delete_self
    gang: int | None = None
    value: bool | None = None
    server: str | None = None  # unregister_adapter: the shared server the adapter leaves


@dataclass
class Plan:
    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None

    @property
    def phase(self) -> str:
        return self.status.get("phase", "Pending")


class _Draft:
    """Mutable working copy of the status while one decision is being made."""

    def __init__(self, obs: Observation):
        self.obs = obs
        self.before = list(obs.status.get("conditions") or [])
        self.status = dict(obs.status)
        self.status["conditions"] = list(self.before)
        self.actions: list[Action] = []
        self.requeue_after: float | None = None

    def condition(self, type_: str, value: bool, reason: str, message: str) -> None:
        self.status["conditions"] = set_condition(
            self.status["conditions"], type_, value, reason, message, self.obs.generation, self.obs.now
        )

    def act(self, kind: str, gang: int | None = None, value: bool | None = None, server: str | None = None) -> None:
        self.actions.append(Action(kind, gang, value, server))

    def finish(self) -> Plan:
        self.status["phase"] = derive_phase(self.status["conditions"])
        self.status["observedGeneration"] = self.obs.generation
        return Plan(
            status=self.status,
            actions=self.actions,
            events=transition_events(self.before, self.status["conditions"]),
            requeue_after=self.requeue_after,
        )


def decide(obs: Observation) -> Plan:
    """Everything the operator does to an accepted job on one reconcile."""
    draft = _Draft(obs)
    for gang in obs.stale_jobs:
        draft.act("delete_job", gang)
    if obs.status.get("phase") in TERMINAL_PHASES:
        _finished(draft)
        return draft.finish()
    if _past_deadline(obs):
        _fail(draft, "DeadlineExceeded", f"ran longer than runPolicy.activeDeadlineSeconds={obs.spec.run_policy.active_deadline_seconds}")
        return draft.finish()
    if obs.spec.run_policy.suspend:
        _suspend(draft)
        return draft.finish()
    if draft.status.get("conditions") and _condition_true(draft, SUSPENDED):
        draft.condition(SUSPENDED, False, "Resumed", "runPolicy.suspend is false: the gang resumes from the latest checkpoint")
    _train(draft)
    return draft.finish()


def _condition_true(draft: _Draft, type_: str) -> bool:
    return any(c["type"] == type_ and c["status"] == "True" for c in draft.status["conditions"])


def _current_gang(obs: Observation) -> int:
    return int(obs.status.get("restarts") or 0)


def _past_deadline(obs: Observation) -> bool:
    deadline = obs.spec.run_policy.active_deadline_seconds
    started = parse_time(obs.status.get("startTime"))
    return bool(deadline and started and obs.now - started > timedelta(seconds=deadline))


def _train(draft: _Draft) -> None:
    obs = draft.obs
    gang = _current_gang(obs)
    job = obs.job
    _record_progress(draft)
    if job is None:
        _start_gang(draft, gang)
    elif job.failed:
        _gang_failed(draft, job)
    elif job.succeeded:
        _succeed(draft)
    elif job.suspended:
        draft.act("suspend_job", gang, False)
        draft.status.setdefault("startTime", format_time(obs.now))  # the deadline counts again from here
        draft.condition(RUNNING, False, "Resuming", "the gang is being resumed")
    elif job.ready >= obs.spec.resources.nodes:
        draft.condition(RUNNING, True, "GangRunning", f"all {obs.spec.resources.nodes} pods of gang {gang} are running")
    else:
        draft.condition(RUNNING, False, "PodsPending", f"{job.ready}/{obs.spec.resources.nodes} pods of gang {gang} are running")


def _start_gang(draft: _Draft, gang: int) -> None:
    obs = draft.obs
    if obs.stale_pods:
        draft.condition(RUNNING, False, "WaitingForOldGang", f"{obs.stale_pods} pods of the previous gang are still terminating")
        draft.requeue_after = 2.0
        return
    restart_at = parse_time(obs.status.get("restartAt"))
    if restart_at and obs.now < restart_at:
        draft.requeue_after = (restart_at - obs.now).total_seconds()
        return
    draft.act("create_job", gang)
    draft.status.pop("restartAt", None)
    draft.status.setdefault("startTime", format_time(obs.now))
    if gang and _condition_true(draft, RESTARTING):
        draft.condition(RESTARTING, False, "GangStarted", f"gang {gang} started; it resumes from the latest checkpoint")
    draft.condition(RUNNING, False, "PodsPending", f"gang {gang} created; waiting for its pods")


def _gang_failed(draft: _Draft, job: TrainerJobState) -> None:
    obs = draft.obs
    restarts = _current_gang(obs)
    why = job.failure_message or job.failure_reason or "a pod failed"
    if job.permanent_failure:
        _fail(draft, "TrainerRejectedInput", f"the trainer refused its config or input (exit code 2): {why}")
        return
    if restarts >= obs.spec.run_policy.max_restarts:
        _fail(draft, "MaxRestartsExceeded", f"gang {restarts} failed after {restarts} restarts (runPolicy.maxRestarts={obs.spec.run_policy.max_restarts}): {why}")
        return
    delay = restart_backoff_seconds(restarts + 1)
    draft.status["restarts"] = restarts + 1
    draft.status["restartAt"] = format_time(obs.now + timedelta(seconds=delay))
    draft.act("delete_job", restarts)
    draft.condition(RUNNING, False, "GangFailed", f"gang {restarts} failed: {why}")
    draft.condition(
        RESTARTING, True, "GangFailed",
        f"restart {restarts + 1}/{obs.spec.run_policy.max_restarts} in {delay:g}s from the latest checkpoint; gang {restarts} failed: {why}",
    )
    draft.requeue_after = delay


def _suspend(draft: _Draft) -> None:
    obs = draft.obs
    if obs.job is not None and not obs.job.suspended and not (obs.job.succeeded or obs.job.failed):
        draft.act("suspend_job", obs.job.gang, True)
    draft.status.pop("startTime", None)  # as batch/v1: the deadline counts from the resume
    pods_left = (obs.job.active if obs.job else 0) + obs.stale_pods
    message = "runPolicy.suspend is true: pods removed, checkpoint kept"
    if pods_left:
        message += f" ({pods_left} pods still terminating)"
    draft.condition(RUNNING, False, "Suspended", message)
    draft.condition(SUSPENDED, True, "Suspended", message)


def _fail(draft: _Draft, reason: str, message: str) -> None:
    obs = draft.obs
    if obs.job is not None and (reason == "DeadlineExceeded" or obs.spec.run_policy.clean_pod_policy == "All"):
        draft.act("delete_job", obs.job.gang)
    draft.status["completionTime"] = format_time(obs.now)
    draft.status["message"] = message
    draft.status.pop("restartAt", None)
    for type_ in (RUNNING, RESTARTING):
        if any(c["type"] == type_ for c in draft.status["conditions"]):
            draft.condition(type_, False, reason, message)
    draft.condition(FAILED, True, reason, message)


def _succeed(draft: _Draft) -> None:
    obs = draft.obs
    draft.status["completionTime"] = format_time(obs.now)
    draft.status["progress"] = completed_progress(draft.status.get("progress"), obs.spec.training.max_steps)
    draft.status["message"] = f"trained {obs.spec.training.max_steps} steps; final model at {draft.status.get('outputUri', '')}/final"
    draft.condition(RUNNING, False, "Completed", "training finished")
    draft.condition(SUCCEEDED, True, "TrainingComplete", draft.status["message"])
    if obs.job is not None and obs.spec.run_policy.clean_pod_policy == "All":
        draft.act("delete_job", obs.job.gang)
    _serve(draft)


def _finished(draft: _Draft) -> None:
    obs = draft.obs
    if obs.status.get("phase") == "Succeeded":
        _serve(draft)
    ttl = obs.spec.run_policy.ttl_seconds_after_finished
    finished = parse_time(obs.status.get("completionTime"))
    if ttl is not None and finished is not None:
        remaining = (finished + timedelta(seconds=ttl) - obs.now).total_seconds()
        if remaining <= 0:
            draft.act("delete_self")
        else:
            draft.requeue_after = remaining


def _serve(draft: _Draft) -> None:
    obs = draft.obs
    previous = (obs.status.get("serving") or {}).get("server")
    if previous and (previous != obs.spec.serving.server or not obs.spec.serving.enabled):
        draft.act("unregister_adapter", server=previous)
    if not obs.spec.serving.enabled:
        if obs.serving is not None:
            draft.act("delete_serving")
        draft.status.pop("endpoint", None)
        draft.status.pop("serving", None)
        if any(c["type"] == SERVING_READY for c in draft.status["conditions"]):
            draft.condition(SERVING_READY, False, "ServingDisabled", "serving.enabled is false")
        return
    if obs.spec.serving.server:
        if obs.serving is not None:
            draft.act("delete_serving")  # moved from a Deployment of its own to a shared server
        _serve_shared(draft)
        return
    serving = obs.spec.serving
    if obs.serving is None or (obs.serving.replicas, obs.serving.image) != (serving.replicas, serving.image):
        draft.act("ensure_serving")
    draft.status["endpoint"] = builders.endpoint_url(obs.name, obs.namespace)
    draft.status["serving"] = {"url": draft.status["endpoint"], "model": obs.name}
    ready = obs.serving.ready_replicas if obs.serving else 0
    wanted = obs.spec.serving.replicas
    if ready >= 1:
        draft.condition(SERVING_READY, True, "DeploymentReady", f"{ready}/{wanted} inference pods ready at {draft.status['endpoint']}")
    else:
        draft.condition(SERVING_READY, False, "DeploymentNotReady", f"0/{wanted} inference pods ready (loading weights, warming up)")


def _serve_shared(draft: _Draft) -> None:
    """ServingReady once the adapter is in the server's registry and the server is ready."""
    obs = draft.obs
    server = obs.spec.serving.server or ""
    shared = obs.shared or shared_server.SharedServerState(server)
    url = shared_server.shared_url(server, obs.namespace)
    draft.status["endpoint"] = url
    draft.status["serving"] = {"url": url, "model": obs.name, "server": server}
    if shared.conflict:
        draft.condition(SERVING_READY, False, "SharedServerConflict", shared.conflict)
        return
    if not shared.registered or shared.stale or not shared.running:
        draft.act("register_adapter")
    if shared.registered and shared.ready_replicas >= 1:
        draft.condition(SERVING_READY, True, "AdapterRegistered",
                        f"shared server {server} serves this job as model {obs.name!r} at {url}/v1 ({shared.ready_replicas} pods ready)")
    elif shared.registered:
        draft.condition(SERVING_READY, False, "SharedServerNotReady", f"adapter registered; shared server {server} is not ready yet (loading the base model)")
    else:
        draft.condition(SERVING_READY, False, "RegisteringAdapter", f"registering adapter {obs.name} with shared server {server}")


def _record_progress(draft: _Draft) -> None:
    obs = draft.obs
    if obs.progress:
        draft.status["progress"] = progress_status(obs.progress)
    if obs.latest_checkpoint:
        draft.status["latestCheckpoint"] = obs.latest_checkpoint


def accept(status: dict[str, Any], generation: int | None, now: datetime, output_uri: str) -> Plan:
    """The admission checks passed: record it (the first gang is created by `decide`)."""
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    draft.status["outputUri"] = output_uri
    draft.status.setdefault("restarts", 0)
    draft.condition(ACCEPTED, True, "ChecksPassed", "credentials, instance images and model source look usable")
    return draft.finish()


def reject(status: dict[str, Any], generation: int | None, now: datetime, reason: str, message: str) -> Plan:
    """A check admission could not do failed: Failed with the cause, no pods, no retries."""
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    draft.status["message"] = message
    draft.status["completionTime"] = format_time(now)
    draft.condition(ACCEPTED, False, reason, message)
    draft.condition(FAILED, True, reason, message)
    return draft.finish()


# --- reading API objects (pure: dict in, state out) ----------------------------------------


def _gang_of(obj: dict[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(builders.LABEL_GANG)
    return int(value) if value is not None and str(value).isdigit() else None


def trainer_job_state(job: dict[str, Any]) -> TrainerJobState:
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    failed = conditions.get("Failed") or {}
    return TrainerJobState(
        gang=_gang_of(job) or 0,
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded="Complete" in conditions,
        failed="Failed" in conditions,
        failure_reason=failed.get("reason", ""),
        failure_message=failed.get("message", ""),
        suspended=bool((job.get("spec") or {}).get("suspend")),
    )


def split_gangs(jobs: list[dict[str, Any]], gang: int) -> tuple[dict[str, Any] | None, tuple[int, ...]]:
    """The current gang's Job (if any) and the older gangs whose Jobs still exist."""
    current = None
    stale = []
    for job in jobs:
        number = _gang_of(job)
        if number is None or (job.get("metadata") or {}).get("deletionTimestamp"):
            continue
        if number == gang:
            current = job
        elif number < gang:
            stale.append(number)
    return current, tuple(sorted(stale))


def count_stale_pods(pods: list[dict[str, Any]], gang: int) -> int:
    return sum(1 for pod in pods if (_gang_of(pod) if _gang_of(pod) is not None else gang) < gang)


def serving_state(deployment: dict[str, Any] | None) -> ServingState | None:
    if deployment is None:
        return None
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    return ServingState(
        replicas=int(deployment.get("spec", {}).get("replicas") or 0),
        ready_replicas=int((deployment.get("status") or {}).get("readyReplicas") or 0),
        image=containers[0].get("image", ""),
    )
