"""The job's state machine as one pure function: what was observed -> what to do and to record.

Level-triggered: every decision is taken from the status and the world as they are now, and
every action is idempotent (deterministic names, create-if-absent, delete-if-present), so an
operator killed at any point converges when it starts again.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dreambooth_api.v1alpha1.memory import MemoryPlan
from dreambooth_api.v1alpha1.spec import DreamboothJobSpec, served_export_prefix

from . import builders, failures, shared_server
from .network_policies import network_policy_hash
from .conditions import (
    ACCEPTED,
    FAILED,
    FINISHED,
    GANG_SCHEDULING,
    HELD,
    MEMORY_PLAN,
    NAME_CONFLICT,
    QUEUED,
    RESTARTING,
    RUNNING,
    SERVING_READY,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL_PHASES,
    UPDATE_PENDING,
    completed_progress,
    derive_phase,
    fidelity_status,
    format_time,
    get_condition,
    observe_generation,
    parse_time,
    progress_status,
    restart_backoff_seconds,
    set_condition,
    transition_events,
)
from .failures import PodState

# A disrupted gang restarts soon: nothing is wrong with it, only its pods were taken.
DISRUPTION_RESTART_SECONDS = 2.0
# A gang that could not be placed waits this long before it is tried again.
UNPLACED_RESTART_SECONDS = 10.0
# How often a job waiting on something nobody announces (old pods, Kueue) is looked at again.
WAIT_POLL_SECONDS = 5.0
# A queued gang is looked at this often without an event (Kueue's Workloads are watched).
QUEUED_POLL_SECONDS = 60.0
# How often a gang whose pods are not all running is looked at (refused and unplaced pods say nothing).
PLACEMENT_POLL_SECONDS = 10.0
# Running=False reasons of a gang that was never made whole: its failure spends no restart.
UNPLACED_REASONS = ("GangNotPlaced", "PodsRefused")
# New gangs tried in a row for a gang never placed whole, before the job fails (GangNeverPlaced).
MAX_UNPLACED_RESTARTS = 10
# How long a job waits for admission while storage is unreachable, in a row (an outage of the
# installation, not the job's fault: not counted in runPolicy.admissionDeadlineSeconds).
STORAGE_OUTAGE_SECONDS = 3600


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
    template_hash: str = ""
    uid: str = ""
    created: datetime | None = None
    start_time: datetime | None = None  # status.startTime: set when the Job (re)starts running
    queue_name: str = ""  # the Job's own kueue.x-k8s.io/queue-name label (Kueue may default it)

    @property
    def permanent_failure(self) -> bool:
        # Only the podFailurePolicy rule (trainer exit code 2: bad config or input) says so.
        return self.failed and self.failure_reason == "PodFailurePolicy" and failures.classify(
            self.failure_reason, self.failure_message, (), "").kind == failures.PERMANENT


@dataclass(frozen=True)
class ServingState:
    replicas: int
    ready_replicas: int
    image: str = ""
    spec_hash: str = ""
    failed_message: str = ""  # the Deployment's Progressing=False (e.g. ProgressDeadlineExceeded)


@dataclass(frozen=True)
class QueueState:
    """What Kueue says about the current gang's Workload (when it has one)."""

    admitted: bool = False
    reason: str = ""
    message: str = ""
    active: bool = True  # spec.active: a deactivated Workload is not admitted again until reactivated


@dataclass(frozen=True)
class ExportState:
    """serving.checkpoint's export once training is over: there or not, and the Job that makes it."""

    prefix: str  # exports/best, exports/step-0000000N
    exported: bool
    job: TrainerJobState | None = None  # the export Job of this choice, when one exists
    failure: str = ""  # its pod's error line, when the Job failed


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
    pods: tuple[PodState, ...] = ()  # pods of the current gang (read when the gang is not all running or failed)
    old_pods: tuple[PodState, ...] = ()  # pods of older gangs (read while a new gang waits for them)
    progress: dict[str, Any] | None = None  # progress.json, when readable
    latest_checkpoint: str | None = None
    serving: ServingState | None = None
    queue_name: str = ""  # Kueue LocalQueue the trainer Job goes to ("" without Kueue)
    queue: QueueState | None = None
    shared: shared_server.SharedServerState | None = None  # the shared server named by serving.server
    refusal: str = ""  # why the Job controller could not create the gang's pods (its FailedCreate Event)
    pod_groups_served: bool = False  # the cluster serves scheduling.k8s.io/v1alpha2 PodGroups (gang policy)
    network_policy_hash: str | None = None  # the job's NetworkPolicy as built (read for a served job); None: unknown
    export: ExportState | None = None  # read after success when serving.checkpoint is not final; None: nothing to wait for

    @property
    def template_hash(self) -> str:
        return builders.trainer_template_hash(self.spec)


@dataclass(frozen=True)
class Action:
    # create_job, delete_job, suspend_job, force_delete_pod, ensure_serving, delete_serving,
    # register_adapter, unregister_adapter, delete_self
    kind: str
    gang: int | None = None
    value: bool | None = None
    target: str = ""  # the pod of force_delete_pod
    server: str | None = None  # unregister_adapter: the shared server the adapter leaves


@dataclass
class Plan:
    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None
    # Status keys dropped once every action succeeded: intent kept until it is done (a lost call is retried).
    done_when_acted: tuple[str, ...] = ()

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
        self.done_when_acted: list[str] = []

    def condition(self, type_: str, value: bool | str, reason: str, message: str) -> None:
        self.status["conditions"] = set_condition(
            self.status["conditions"], type_, value, reason, message, self.obs.generation, self.obs.now
        )

    def clear(self, type_: str, reason: str, message: str) -> None:
        """Set `type_` False, but only if it was ever set (a condition born False is noise)."""
        if get_condition(self.status["conditions"], type_) is not None:
            self.condition(type_, False, reason, message)

    def is_true(self, type_: str) -> bool:
        condition = get_condition(self.status["conditions"], type_)
        return condition is not None and condition.get("status") == "True"

    def act(self, kind: str, gang: int | None = None, value: bool | None = None, target: str = "",
            server: str | None = None) -> None:
        self.actions.append(Action(kind, gang, value, target, server))

    def requeue(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def finish(self) -> Plan:
        self.status["conditions"] = observe_generation(self.status["conditions"], self.obs.generation)
        self.status["phase"] = derive_phase(self.status["conditions"])
        self.status["observedGeneration"] = self.obs.generation
        return Plan(
            status=self.status,
            actions=self.actions,
            events=transition_events(self.before, self.status["conditions"]),
            requeue_after=self.requeue_after,
            done_when_acted=tuple(self.done_when_acted),
        )


def decide(obs: Observation) -> Plan:
    """Everything the operator does to an accepted job on one reconcile."""
    draft = _Draft(obs)
    draft.clear(HELD, "SpecReadable", "this operator reads the job's spec")
    for gang in obs.stale_jobs:
        draft.act("delete_job", gang)
    if obs.status.get("phase") in TERMINAL_PHASES:
        _finished(draft)
        return draft.finish()
    if _past_deadline(obs):
        _fail(draft, "DeadlineExceeded", f"ran longer than runPolicy.activeDeadlineSeconds={obs.spec.run_policy.active_deadline_seconds} (queued and suspended time excluded)")
        return draft.finish()
    if obs.spec.run_policy.suspend:
        _suspend(draft)
        return draft.finish()
    if draft.is_true(SUSPENDED):
        draft.condition(SUSPENDED, False, "Resumed", "runPolicy.suspend is false: the gang resumes from the latest checkpoint")
    _train(draft)
    _note_template_update(draft)
    _deadline_timer(draft)
    return draft.finish()


def _deadline_timer(draft: _Draft) -> None:
    """activeDeadlineSeconds fires on time even when nothing happens to the gang (no pod was made)."""
    deadline = draft.obs.spec.run_policy.active_deadline_seconds
    started = parse_time(draft.status.get("startTime"))
    if deadline and started and draft.status.get("phase") not in TERMINAL_PHASES:
        draft.requeue(max(0.5, (started + timedelta(seconds=deadline) - draft.obs.now).total_seconds()))


def current_gang(status: dict[str, Any]) -> int:
    """The gang whose Job is `<name>-train-<gang>` (older objects counted gangs in `restarts`)."""
    gang = status.get("gang")
    return int(gang if gang is not None else status.get("restarts") or 0)


def _past_deadline(obs: Observation) -> bool:
    deadline = obs.spec.run_policy.active_deadline_seconds
    started = parse_time(obs.status.get("startTime"))
    return bool(deadline and started and obs.now - started > timedelta(seconds=deadline))


def _train(draft: _Draft) -> None:
    obs = draft.obs
    gang = current_gang(obs.status)
    job = obs.job
    _record_progress(draft)
    if job is None:
        _start_gang(draft, gang)
    elif job.failed:
        _gang_failed(draft, job)
    elif job.succeeded:
        _succeed(draft)
    elif job.suspended:
        _suspended_job(draft, gang)
    else:
        _running(draft, gang, job)


def _running(draft: _Draft, gang: int, job: TrainerJobState) -> None:
    obs = draft.obs
    nodes = obs.spec.resources.nodes
    stopped = failures.stopped_on_sigterm(obs.pods, job.start_time)
    if stopped is not None:
        _disrupted(draft, gang, f"pod {stopped.name} stopped on SIGTERM (exit code {failures.EXIT_SIGTERM}) after its checkpoint")
        return
    stuck = failures.stuck_pods(obs.pods, obs.now)
    if stuck:
        # Its node will never confirm the deletion and the Job never fails by itself (a 1-node gang
        # has no peer to fail): a new gang; the old one's stuck pod is force-deleted then.
        where = f"node {stuck[0].node} not ready" if stuck[0].node_ready is False else f"node {stuck[0].node} not answering"
        _disrupted(draft, gang, f"pod {stuck[0].name} is stuck terminating past its grace period ({where})")
        return
    draft.status.setdefault("startTime", format_time(obs.now))  # admitted or resumed: the deadline counts
    draft.status.pop("jobSuspendedByOperator", None)
    if draft.is_true(QUEUED):
        where = f"Kueue admitted gang {gang} (LocalQueue {obs.queue_name})" if obs.queue_name else f"gang {gang} was resumed"
        draft.condition(QUEUED, False, "Admitted", where)
    if job.ready >= nodes:
        draft.status.pop("unplacedRestarts", None)
        draft.condition(RUNNING, True, "GangRunning", f"all {nodes} pods of gang {gang} are running")
        return
    done = [p for p in obs.pods if p.exit_code == 0 or p.phase == "Succeeded"]
    if done and not any(p.phase == "Failed" for p in obs.pods):
        # Trainers that exited 0 are no longer ready, and the Job says Complete only a moment later:
        # the job is still running (finishing), not back to Pending with an older progress record.
        draft.condition(RUNNING, True, "TrainersFinished",
                        f"pod {done[0].name} of gang {gang} exited 0 (training done); waiting for its Job to complete")
        draft.requeue(PLACEMENT_POLL_SECONDS)
        return
    _requeue_for_terminating(draft)
    alive = [p for p in obs.pods if p.phase in ("Pending", "Running") and p.deletion_deadline is None]
    if obs.refusal and len(alive) < nodes:
        # The Job controller could not make the pods (quota, PodSecurity, LimitRange, a webhook):
        # only its FailedCreate Event says why. No restart is spent on a gang never made whole.
        draft.condition(RUNNING, False, "PodsRefused",
                        f"{len(alive)}/{nodes} pods of gang {gang} could be created; the cluster refuses the rest: {obs.refusal}")
        draft.requeue(PLACEMENT_POLL_SECONDS)
        return
    unplaced = [p for p in obs.pods if not p.scheduled and p.phase == "Pending"]
    if unplaced:
        why = unplaced[0].unschedulable_message or "no node has room"
        draft.condition(RUNNING, False, "GangNotPlaced",
                        f"{nodes - len(unplaced)}/{nodes} pods of gang {gang} placed; waiting for room for the rest ({why}); no restart is spent")
        draft.requeue(WAIT_POLL_SECONDS)
        return
    waiting = next((p for p in obs.pods if p.waiting_reason in failures.NOT_STARTING_REASONS), None)
    if waiting is not None:
        detail = f": {waiting.waiting_message}" if waiting.waiting_message else ""
        draft.condition(RUNNING, False, "PodsNotStarting",
                        f"pod {waiting.name} of gang {gang} cannot start its trainer ({waiting.waiting_reason}{detail})")
        draft.requeue(PLACEMENT_POLL_SECONDS)
        return
    running = get_condition(draft.status["conditions"], RUNNING) or {}
    if running.get("reason") in UNPLACED_REASONS and len(alive) < nodes:
        return  # pods are going away (the gang is failing): what was last seen still holds
    draft.condition(RUNNING, False, "PodsPending", f"{job.ready}/{nodes} pods of gang {gang} are running")
    draft.requeue(PLACEMENT_POLL_SECONDS)  # a refused or unplaced pod announces nothing: look again


def _requeue_for_terminating(draft: _Draft) -> None:
    """A pod of the gang terminating on a node that may be gone: look again when its grace ends."""
    obs = draft.obs
    for pod in obs.pods:
        if pod.deletion_deadline is not None and pod.deletion_deadline > obs.now and pod.node_ready is not True and not pod.ended:
            draft.requeue((pod.deletion_deadline - obs.now).total_seconds() + 1.0)


def _suspended_job(draft: _Draft, gang: int) -> None:
    """A suspended Job that the user does not want suspended: resume it only if we suspended it."""
    obs = draft.obs
    draft.status.pop("startTime", None)  # queued time is not deadline time; it counts again once it runs
    if obs.status.get("jobSuspendedByOperator"):
        # The mark stays until the Job is seen running (_running drops it): a lost PATCH is sent again.
        draft.act("suspend_job", gang, False)
        draft.condition(RUNNING, False, "Resuming", "the gang is being resumed")
        draft.requeue(WAIT_POLL_SECONDS)
        return
    _queued(draft, gang)


def _queued(draft: _Draft, gang: int) -> None:
    obs = draft.obs
    queue = obs.queue
    if obs.queue_name:
        reason, message = "WaitingForAdmission", f"gang {gang} waits for Kueue to admit it (LocalQueue {obs.queue_name})"
        if queue is not None and not queue.active:
            # Kueue's requeuing limit, or someone: nothing readmits it by itself (not "will resume").
            reason = "Deactivated"
            message = (f"Kueue deactivated the Workload of gang {gang} ({queue.reason or 'spec.active is false'}): it is not "
                       "admitted again until its spec.active is set back to true; the checkpoint is kept")
        elif queue is not None and queue.reason in ("Preempted", "Evicted", "PodsReadyTimeout"):
            reason = "Preempted" if queue.reason == "Preempted" else "Evicted"
            message = f"Kueue stopped gang {gang} ({queue.reason}): it resumes from its checkpoint when admitted again (no restart is spent)"
        if queue is not None and queue.message:
            message += f": {queue.message}"
    else:
        reason, message = "SuspendedByOthers", f"the Job of gang {gang} was suspended by someone else; the operator leaves it suspended"
    draft.condition(QUEUED, True, reason, message)
    if draft.is_true(RUNNING):
        draft.condition(RUNNING, False, reason, message)
    # Kueue's Workloads are watched: this is only the fallback should an event be missed.
    draft.requeue(QUEUED_POLL_SECONDS)


def _start_gang(draft: _Draft, gang: int) -> None:
    obs = draft.obs
    if obs.stale_pods:
        stuck = failures.stuck_pods(obs.old_pods, obs.now)
        for pod in stuck:
            draft.act("force_delete_pod", target=pod.name)
        note = f"; force-deleting {len(stuck)} stuck on a lost node" if stuck else ""
        draft.clear(QUEUED, "GangStopped", "the gang is being replaced")
        draft.condition(RUNNING, False, "WaitingForOldGang", f"{obs.stale_pods} pods of the previous gang are still terminating{note}")
        draft.requeue(2.0)
        return
    restart_at = parse_time(obs.status.get("restartAt"))
    if restart_at and obs.now < restart_at:
        draft.requeue((restart_at - obs.now).total_seconds())
        return
    pod_group = _gang_placement(draft, gang)
    draft.act("create_job", gang, True if pod_group else None)
    draft.status.pop("restartAt", None)
    draft.status.pop("jobSuspendedByOperator", None)
    if draft.is_true(RESTARTING):
        draft.condition(RESTARTING, False, "GangStarted", f"gang {gang} started; it resumes from the latest checkpoint")
    if obs.queue_name:
        draft.status["queueName"] = obs.queue_name
        draft.status.pop("startTime", None)
        draft.condition(QUEUED, True, "WaitingForAdmission", f"gang {gang} created suspended; Kueue admits it from LocalQueue {obs.queue_name}")
        draft.requeue(QUEUED_POLL_SECONDS)
    else:
        draft.status.pop("queueName", None)
        draft.status.setdefault("startTime", format_time(obs.now))
        draft.clear(QUEUED, "NotQueued", f"gang {gang} is not queued (no kueue.x-k8s.io/queue-name)")
        draft.requeue(PLACEMENT_POLL_SECONDS)  # a gang whose pods are all refused announces nothing
    draft.condition(RUNNING, False, "PodsPending", f"gang {gang} created; waiting for its pods")


def _gang_placement(draft: _Draft, gang: int) -> bool:
    """How the new gang is placed whole: Kueue admits it whole; else a PodGroup with a gang policy
    (scheduling.k8s.io/v1alpha2) where the cluster serves one; else nothing does (said so). True: a PodGroup."""
    obs = draft.obs
    nodes = obs.spec.resources.nodes
    if nodes < 2:
        draft.status.pop("gangScheduling", None)
        return False
    if obs.queue_name:
        draft.status["gangScheduling"] = "Kueue"
        draft.condition(GANG_SCHEDULING, True, "Kueue", f"Kueue admits the {nodes} pods of gang {gang} together (LocalQueue {obs.queue_name})")
        return False
    if obs.pod_groups_served:
        draft.status["gangScheduling"] = "PodGroup"
        draft.condition(GANG_SCHEDULING, True, "PodGroup",
                        f"the {nodes} pods of gang {gang} are placed all together or not at all (PodGroup {builders.trainer_job_name(obs.name, gang)}, "
                        f"gang minCount {nodes})")
        return True
    draft.status["gangScheduling"] = "Unprotected"
    draft.condition(GANG_SCHEDULING, False, "Unprotected",
                    f"the cluster serves no gang scheduling (scheduling.k8s.io/v1alpha2 PodGroup) and the job is not queued by Kueue: the {nodes} "
                    f"pods of gang {gang} may be placed piecemeal; a gang never placed whole is tried again at most {MAX_UNPLACED_RESTARTS} times")
    return False


def _gang_failed(draft: _Draft, job: TrainerJobState) -> None:
    obs = draft.obs
    policy = obs.spec.run_policy
    gang = current_gang(obs.status)
    failure = failures.classify(job.failure_reason, job.failure_message, obs.pods, obs.spec.resources.memory)
    running = get_condition(draft.status["conditions"], RUNNING) or {}
    if failure.kind == failures.FAILURE and running.get("reason") in UNPLACED_REASONS:
        # The Job controller removed the unplaced pods with the failed Job; the last look saw them.
        failure = failures.Failure(failures.UNPLACED, f"{failure.message}; the gang was never all placed ({running.get('message', '')})")
    if failure.kind == failures.PERMANENT:
        _fail(draft, "TrainerRejectedInput", f"the trainer refused its config or input (exit code 2): {failure.message}")
        return
    if failure.kind == failures.OOM and not policy.retry_on_out_of_memory:
        _fail(draft, "OutOfMemory", f"{failure.message}; raise it, or lower training.batchSize or data.resolution (runPolicy.retryOnOutOfMemory: true restarts instead)")
        return
    if failure.kind == failures.DISRUPTION:
        _disrupted(draft, gang, failure.message)
        return
    if failure.kind == failures.UNPLACED:
        tries = int(obs.status.get("unplacedRestarts") or 0)
        if tries >= MAX_UNPLACED_RESTARTS:
            _fail(draft, "GangNeverPlaced", f"{tries} gangs in a row were never placed whole: {failure.message}")
            return
        draft.status["unplacedRestarts"] = tries + 1
        # Backing off (and by a per-job offset) breaks the livelock of gangs that each hold part of the room.
        delay = min(UNPLACED_RESTART_SECONDS * 2 ** tries, 300.0) + _spread(obs.name, UNPLACED_RESTART_SECONDS)
        _restart(draft, gang, delay, "GangNotPlaced", f"no restart spent; try {tries + 1}/{MAX_UNPLACED_RESTARTS}", failure.message)
        return
    restarts = int(obs.status.get("restarts") or 0)
    if restarts >= policy.max_restarts:
        _fail(draft, "MaxRestartsExceeded", f"gang {gang} failed after {restarts} restarts (runPolicy.maxRestarts={policy.max_restarts}): {failure.message}")
        return
    draft.status["restarts"] = restarts + 1
    _restart(draft, gang, restart_backoff_seconds(restarts + 1), "GangFailed", f"restart {restarts + 1}/{policy.max_restarts}", failure.message)


def _spread(name: str, seconds: float) -> float:
    """A stable offset in [0, seconds) from the job's name (no randomness: the same world, the same plan)."""
    return (int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 1000) / 1000 * seconds


def _disrupted(draft: _Draft, gang: int, why: str) -> None:
    """The gang's pods were taken (not broken): a new gang from the checkpoint, bounded by maxDisruptions."""
    policy = draft.obs.spec.run_policy
    disruptions = int(draft.obs.status.get("disruptions") or 0)
    if policy.max_disruptions is not None and disruptions >= policy.max_disruptions:
        _fail(draft, "TooManyDisruptions", f"gang {gang} was disrupted after {disruptions} disruptions (runPolicy.maxDisruptions={policy.max_disruptions}): {why}")
        return
    draft.status["disruptions"] = disruptions + 1
    _restart(draft, gang, DISRUPTION_RESTART_SECONDS, "GangDisrupted",
             f"disruption {disruptions + 1}{'' if policy.max_disruptions is None else f'/{policy.max_disruptions}'} (no restart spent)", why)


def _restart(draft: _Draft, gang: int, delay: float, reason: str, budget: str, why: str) -> None:
    obs = draft.obs
    draft.status["gang"] = gang + 1
    draft.status["restartAt"] = format_time(obs.now + timedelta(seconds=delay))
    draft.act("delete_job", gang)
    draft.clear(QUEUED, reason, f"gang {gang} stopped: {why}")
    draft.condition(RUNNING, False, reason, f"gang {gang} stopped: {why}")
    draft.condition(RESTARTING, True, reason, f"gang {gang + 1} starts in {delay:g}s from the latest checkpoint ({budget}); gang {gang}: {why}")
    draft.requeue(delay)


def _suspend(draft: _Draft) -> None:
    obs = draft.obs
    job = obs.job
    gang = current_gang(obs.status)
    if job is not None and not (job.succeeded or job.failed):
        if obs.queue_name or obs.status.get("queueName"):
            # Kueue owns spec.suspend of a queued Job: remove the gang; the resume queues a new one.
            draft.act("delete_job", gang)
            draft.status["gang"] = gang + 1
            draft.status.pop("jobSuspendedByOperator", None)
        elif not job.suspended:
            draft.act("suspend_job", gang, True)
            draft.status["jobSuspendedByOperator"] = True
    draft.status.pop("startTime", None)  # as batch/v1: the deadline counts from the resume
    pods_left = (job.active if job else 0) + obs.stale_pods
    message = "runPolicy.suspend is true: pods removed, checkpoint kept"
    if pods_left:
        message += f" ({pods_left} pods still terminating)"
    draft.clear(QUEUED, "Suspended", message)
    draft.condition(RUNNING, False, "Suspended", message)
    draft.condition(SUSPENDED, True, "Suspended", message)


def _fail(draft: _Draft, reason: str, message: str) -> None:
    obs = draft.obs
    if obs.job is not None and (reason == "DeadlineExceeded" or obs.spec.run_policy.clean_pod_policy == "All"):
        draft.act("delete_job", obs.job.gang)
    draft.status["completionTime"] = format_time(obs.now)
    draft.status["message"] = message
    draft.status.pop("restartAt", None)
    for type_ in (QUEUED, RUNNING, RESTARTING):
        draft.clear(type_, reason, message)
    draft.condition(FAILED, True, reason, message)
    draft.condition(FINISHED, True, "JobFailed", message)


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
    _clean_finished_gang(draft)
    if obs.status.get("phase") == "Succeeded":
        _serve(draft)
    elif not draft.is_true(FINISHED):
        draft.condition(FINISHED, True, "JobFailed", obs.status.get("message") or "the job failed")
    ttl = obs.spec.run_policy.ttl_seconds_after_finished
    finished = parse_time(obs.status.get("completionTime"))
    if ttl is not None and finished is not None:
        remaining = (finished + timedelta(seconds=ttl) - obs.now).total_seconds()
        if remaining <= 0:
            draft.act("delete_self")
        else:
            draft.requeue(remaining)


def _clean_finished_gang(draft: _Draft) -> None:
    """Level-triggered, as the Job controller's deleteActivePods: on every reconcile of a finished
    job, a gang that still runs (DeadlineExceeded, a lost DELETE) or that cleanPodPolicy: All
    removes is deleted again until it is gone."""
    obs = draft.obs
    job = obs.job
    if job is None:
        return
    still_running = not (job.succeeded or job.failed)
    if obs.spec.run_policy.clean_pod_policy == "All" or (still_running and obs.status.get("phase") == "Failed"):
        draft.act("delete_job", job.gang)


def _leave_servers(draft: _Draft) -> None:
    """Unregister from shared servers this job left; the record stays until the calls succeed."""
    obs = draft.obs
    wanted = obs.spec.serving.server if obs.spec.serving.enabled else None
    previous = (obs.status.get("serving") or {}).get("server")
    leaving = sorted({*(obs.status.get("leavingServers") or []), *([previous] if previous else [])} - {wanted})
    if not leaving:
        draft.status.pop("leavingServers", None)
        return
    for server in leaving:
        draft.act("unregister_adapter", server=server)
    draft.status["leavingServers"] = leaving
    draft.done_when_acted.append("leavingServers")


def _serve(draft: _Draft) -> None:
    obs = draft.obs
    _leave_servers(draft)
    if not obs.spec.serving.enabled:
        if obs.serving is not None:
            draft.act("delete_serving")
        draft.status.pop("endpoint", None)
        draft.status.pop("serving", None)
        draft.clear(SERVING_READY, "ServingDisabled", "serving.enabled is false")
        draft.condition(FINISHED, True, "ServingDisabled", draft.status.get("message") or "training succeeded; serving is disabled")
        return
    if not _exported(draft):
        return
    fidelity = draft.status.get("fidelity")
    if isinstance(fidelity, dict) and fidelity.get("served") != served_export_prefix(obs.spec.serving.checkpoint):
        draft.status["fidelity"] = {**fidelity, "served": served_export_prefix(obs.spec.serving.checkpoint)}  # chosen after success
    if obs.spec.serving.server:
        if obs.serving is not None:
            draft.act("delete_serving")  # moved from a Deployment of its own to a shared server
        _serve_shared(draft)
        return
    serving = obs.spec.serving
    if obs.serving is None or obs.serving.spec_hash != builders.serving_hash(obs.spec):
        draft.act("ensure_serving")  # missing, or serving/podTemplate edited: roll the Deployment
    elif obs.network_policy_hash is not None and obs.network_policy_hash != network_policy_hash(_ref(obs)):
        draft.act("ensure_network_policy")  # serving.ingressFrom edited (revoking a peer takes effect)
    draft.status["endpoint"] = builders.endpoint_url(obs.name, obs.namespace)
    draft.status["serving"] = {"url": draft.status["endpoint"], "model": obs.name}
    ready = obs.serving.ready_replicas if obs.serving else 0
    if ready >= 1:
        message = f"{ready}/{serving.replicas} inference pods ready at {draft.status['endpoint']}"
        draft.condition(SERVING_READY, True, "DeploymentReady", message)
        draft.condition(FINISHED, True, "ServingReady", f"training succeeded; {message}")
    elif obs.serving is not None and obs.serving.failed_message:
        message = f"the inference Deployment is not progressing: {obs.serving.failed_message}"
        draft.condition(SERVING_READY, False, "ServingFailed", message)
        draft.condition(FINISHED, True, "ServingFailed", f"training succeeded; {message}")
    else:
        draft.condition(SERVING_READY, False, "DeploymentNotReady", f"0/{serving.replicas} inference pods ready (loading weights, warming up)")
        draft.requeue(WAIT_POLL_SECONDS)


def _exported(draft: _Draft) -> bool:
    """serving.checkpoint's export is there. When not (a step or best chosen after success that
    training did not export), an export Job makes it; what is served now keeps serving meanwhile."""
    obs = draft.obs
    export = obs.export
    if export is None or export.exported:
        return True
    checkpoint = obs.spec.serving.checkpoint
    job_name = builders.export_job_name(obs.name, checkpoint)
    keeps = "what was served keeps serving" if obs.serving is not None or obs.shared is not None else "nothing is served yet"
    if export.job is not None and export.job.failed:
        why = export.failure or export.job.failure_message or export.job.failure_reason
        message = (f"spec.serving.checkpoint {checkpoint}: exporting it to {export.prefix}/ failed (Job {job_name}: {why}); "
                   f"{keeps}; choose another checkpoint, or delete the Job to try again")
        draft.condition(SERVING_READY, False, "ExportFailed", message)
        draft.condition(FINISHED, True, "ServingFailed", f"training succeeded; {message}")
        return False
    if export.job is None:
        draft.act("create_export_job")
    draft.condition(SERVING_READY, False, "Exporting",
                    f"spec.serving.checkpoint {checkpoint} was not exported by training: Job {job_name} exports it to "
                    f"{export.prefix}/; {keeps} until then")
    draft.requeue(WAIT_POLL_SECONDS)
    return False


def _ref(obs: Observation) -> builders.JobRef:
    return builders.JobRef(obs.name, obs.namespace, "", obs.spec)


def _note_template_update(draft: _Draft) -> None:
    """scheduling/podTemplate edits reach the trainer pods with the next gang: say so, then say done."""
    obs = draft.obs
    job = obs.job
    if job is None or not job.template_hash or draft.status.get("phase") in TERMINAL_PHASES or draft.is_true(FAILED):
        return
    gang = current_gang(obs.status)
    if job.template_hash != obs.template_hash:
        draft.condition(UPDATE_PENDING, True, "AppliesToNextGang",
                        f"spec.scheduling/spec.podTemplate changed: gang {gang} keeps its pods; the next gang (restart, disruption or suspend/resume) uses the new ones")
    else:
        draft.clear(UPDATE_PENDING, "Applied", f"gang {gang} runs the current spec.scheduling and spec.podTemplate")


def _serve_shared(draft: _Draft) -> None:
    """ServingReady once the adapter is in the server's registry and every ready server pod answers for it."""
    obs = draft.obs
    server = obs.spec.serving.server or ""
    shared = obs.shared or shared_server.SharedServerState(server)
    url = shared_server.shared_url(server, obs.namespace)
    draft.status["endpoint"] = url
    draft.status["serving"] = {"url": url, "model": obs.name, "server": server}
    if shared.conflict:
        draft.condition(SERVING_READY, False, "SharedServerConflict", shared.conflict)
        draft.condition(FINISHED, True, "ServingFailed", f"training succeeded; {shared.conflict}")
        return
    if not shared.registered or shared.stale or not shared.running:
        draft.act("register_adapter")
    if shared.registered and shared.ready_replicas >= 1 and shared.answers:
        message = f"shared server {server} serves this job as model {obs.name!r} at {url}/v1 ({shared.ready_replicas} pods ready)"
        draft.condition(SERVING_READY, True, "AdapterRegistered", message)
        draft.condition(FINISHED, True, "ServingReady", f"training succeeded; {message}")
        return
    if shared.registered and shared.ready_replicas >= 1:
        draft.condition(SERVING_READY, False, "AdapterNotListed", f"adapter registered; shared server {server} does not answer "
                        f"for model {obs.name!r} yet (its pods read the registry within about a minute)")
    elif shared.registered:
        draft.condition(SERVING_READY, False, "SharedServerNotReady", f"adapter registered; shared server {server} is not ready yet (loading the base model)")
    else:
        draft.condition(SERVING_READY, False, "RegisteringAdapter", f"registering adapter {obs.name} with shared server {server}")
    draft.requeue(WAIT_POLL_SECONDS)  # the shared server's pods are not this job's children: look again


def _record_progress(draft: _Draft) -> None:
    obs = draft.obs
    if obs.progress:
        draft.status["progress"] = progress_status(obs.progress)
        fidelity = fidelity_status(obs.progress, served_export_prefix(obs.spec.serving.checkpoint))
        if fidelity:
            draft.status["fidelity"] = fidelity
    if obs.latest_checkpoint:
        draft.status["latestCheckpoint"] = obs.latest_checkpoint


# --- before acceptance -----------------------------------------------------------------------


def accept(status: dict[str, Any], generation: int | None, now: datetime, output_uri: str,
           defaults: dict[str, Any] | None = None, memory: MemoryPlan | None = None) -> Plan:
    """The admission checks passed: record it and freeze the spec and the installation defaults;
    the memory plan goes in its condition (admission already refused a job that cannot fit)."""
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    draft.status["outputUri"] = output_uri
    draft.status["acceptedGeneration"] = generation if generation is not None else 0
    if defaults is not None:
        draft.status["installationDefaults"] = defaults
    for counter in ("gang", "restarts", "disruptions"):
        draft.status.setdefault(counter, 0)
    draft.status.pop("storageUnreachableSince", None)
    draft.condition(ACCEPTED, True, "ChecksPassed", "credentials, instance images and model source look usable")
    if memory is not None:
        status_of = {"fits": True, "tight": False}.get(memory.verdict)
        reason = {"fits": "Fits", "tight": "TightWithActivations"}.get(memory.verdict, "NoPlan" if memory.architecture is None else "NoGpuMemory")
        draft.condition(MEMORY_PLAN, "Unknown" if status_of is None else status_of, reason, memory.summary())
    return draft.finish()


def await_admission(status: dict[str, Any], generation: int | None, now: datetime, reason: str, message: str,
                    permanent: bool, deadline_seconds: int) -> Plan:
    """A check admission cannot do failed. What may heal (a Secret created late) waits in Pending
    and is retried with backoff until runPolicy.admissionDeadlineSeconds after the operator's first
    look (status.admissionStartTime: a job applied while the operator was down gets its whole
    budget); storage being unreachable is the installation's trouble, not the job's, and gets its
    own (STORAGE_OUTAGE_SECONDS of it in a row). Past that, or for good: Failed with the cause."""
    first = parse_time(status.get("admissionStartTime")) or now
    gives_up_at = first + timedelta(seconds=deadline_seconds)
    unreachable = reason == "StorageUnreachable"
    since = (parse_time(status.get("storageUnreachableSince")) or now) if unreachable else None
    if since is not None:
        gives_up_at = max(gives_up_at, since + timedelta(seconds=STORAGE_OUTAGE_SECONDS))
    if permanent or now >= gives_up_at:
        if not permanent:
            budget = (f"storage unreachable for {STORAGE_OUTAGE_SECONDS // 60} minutes" if unreachable
                      else f"runPolicy.admissionDeadlineSeconds={deadline_seconds}")
            message += f" (still so after {budget})"
        return reject(status, generation, now, reason, message)
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    draft.status["admissionStartTime"] = format_time(first)
    if since is not None:
        draft.status["storageUnreachableSince"] = format_time(since)
    else:
        draft.status.pop("storageUnreachableSince", None)
    budget = "storage outages have their own budget" if unreachable else "runPolicy.admissionDeadlineSeconds"
    draft.condition(ACCEPTED, False, reason, f"{message} (retrying; the job fails at {format_time(gives_up_at)}: {budget})")
    draft.requeue(admission_retry_seconds((now - first).total_seconds()))
    return draft.finish()


def admission_retry_seconds(waited: float) -> float:
    """Backoff between admission checks: quick at first (a Secret created a second late), 30 s at most."""
    return min(30.0, max(1.0, waited / 2))


def hold(status: dict[str, Any], generation: int | None, now: datetime, message: str) -> Plan:
    """An accepted job whose stored spec this operator refuses: said, and nothing else is touched
    (its phase, its gang, its endpoint stay; an operator that reads it takes it from there)."""
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    draft.condition(HELD, True, "SpecNotReadable",
                    f"this operator cannot read the accepted spec ({message}); the job is left as it is until one that can takes over")
    plan = draft.finish()
    plan.status["phase"] = status.get("phase", plan.status["phase"])  # a hold changes no phase
    return plan


def reject(status: dict[str, Any], generation: int | None, now: datetime, reason: str, message: str) -> Plan:
    """A check admission could not do failed for good: Failed with the cause, no pods."""
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    draft.status["message"] = message
    draft.status["completionTime"] = format_time(now)
    draft.condition(ACCEPTED, False, reason, message)
    draft.condition(FAILED, True, reason, message)
    draft.condition(FINISHED, True, "JobFailed", message)
    return draft.finish()


def give_up(status: dict[str, Any], generation: int | None, now: datetime, reason: str, message: str) -> Plan:
    """The job cannot go on (e.g. the API server refused its pod template): Failed with the cause."""
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    draft.status["message"] = message
    draft.status["completionTime"] = format_time(now)
    for type_ in (QUEUED, RUNNING, RESTARTING):
        draft.clear(type_, reason, message)
    draft.condition(FAILED, True, reason, message)
    draft.condition(FINISHED, True, "JobFailed", message)
    return draft.finish()


def acted(status: dict[str, Any], keys: tuple[str, ...]) -> Plan:
    """Every action of the last plan succeeded: drop the intent it kept (e.g. leavingServers)."""
    return Plan(status={k: v for k, v in status.items() if k not in keys})


def name_conflict(status: dict[str, Any], generation: int | None, now: datetime, message: str | None) -> Plan:
    """An object the job would create exists and is someone else's (message), or no longer (None)."""
    draft = _Draft(Observation("", "", generation, None, status, now))  # type: ignore[arg-type]
    if message:
        draft.condition(NAME_CONFLICT, True, "ObjectNotOwned", message)
        draft.requeue(10.0)
    else:
        draft.clear(NAME_CONFLICT, "Resolved", "every object this job creates is its own")
    return draft.finish()


# --- reading API objects (pure: dict in, state out) ----------------------------------------


def _gang_of(obj: dict[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(builders.LABEL_GANG)
    return int(value) if value is not None and str(value).isdigit() else None


def trainer_job_state(job: dict[str, Any]) -> TrainerJobState:
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    # FailureTarget/SuccessCriteriaMet: the Job controller has decided, and waits for its pods to
    # end before it says Failed/Complete (a pod on a lost node never ends: act on the decision).
    failed = conditions.get("Failed") or conditions.get("FailureTarget") or {}
    meta = job.get("metadata") or {}
    return TrainerJobState(
        gang=_gang_of(job) or 0,
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded="Complete" in conditions or "SuccessCriteriaMet" in conditions,
        failed=bool(failed),
        failure_reason=failed.get("reason", ""),
        failure_message=failed.get("message", ""),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        template_hash=(meta.get("annotations") or {}).get(builders.ANNOTATION_TEMPLATE_HASH, ""),
        uid=meta.get("uid", ""),
        created=parse_time(meta.get("creationTimestamp")),
        start_time=parse_time(status.get("startTime")),
        queue_name=(meta.get("labels") or {}).get(builders.KUEUE_QUEUE_LABEL, ""),
    )


def owned_by(obj: dict[str, Any], owner_uid: str) -> bool:
    """True when `owner_uid` is the object's controller (what this job may change or delete)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid and ref.get("controller") for ref in refs)


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


def pod_state(pod: dict[str, Any], node_ready: bool | None = None) -> PodState:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled") or {}
    trainer = next((s.get("state") or {} for s in status.get("containerStatuses") or []
                    if s.get("name") == builders.TRAINER_CONTAINER), {})
    terminated = trainer.get("terminated") or {}
    waiting = trainer.get("waiting") or {}
    disruption = conditions.get(failures.DISRUPTION_CONDITION) or {}
    node = (pod.get("spec") or {}).get("nodeName") or ""
    return PodState(
        name=meta.get("name", ""),
        gang=_gang_of(pod) or 0,
        phase=status.get("phase") or "Pending",
        node=node,
        scheduled=bool(node) or scheduled.get("status") == "True",
        unschedulable_message=scheduled.get("message", "") if scheduled.get("reason") == "Unschedulable" else "",
        deletion_deadline=parse_time(meta.get("deletionTimestamp")),
        node_ready=node_ready,
        exit_code=terminated.get("exitCode"),
        terminated_reason=terminated.get("reason", ""),
        disrupted=disruption.get("status") == "True" or status.get("reason") in failures.NODE_LOST_REASONS,
        created=parse_time(meta.get("creationTimestamp")),
        status_reason=status.get("reason") or "",
        status_message=status.get("message") or "",
        waiting_reason=waiting.get("reason") or "",
        waiting_message=waiting.get("message") or "",
    )


def serving_state(deployment: dict[str, Any] | None) -> ServingState | None:
    if deployment is None:
        return None
    spec = deployment.get("spec") or {}
    containers = spec.get("template", {}).get("spec", {}).get("containers") or [{}]
    status = deployment.get("status") or {}
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
    return ServingState(
        replicas=int(spec.get("replicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        image=containers[0].get("image", ""),
        spec_hash=((deployment.get("metadata") or {}).get("annotations") or {}).get(builders.ANNOTATION_SPEC_HASH, ""),
        failed_message=progressing.get("message", "") if progressing.get("status") == "False" else "",
    )


def queue_state(workload: dict[str, Any] | None) -> QueueState | None:
    """Kueue's Workload -> admitted, and why not (QuotaReserved/Evicted messages name the quota)."""
    if workload is None:
        return None
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    admitted = (conditions.get("Admitted") or {}).get("status") == "True"
    evicted = conditions.get("Evicted") or {}
    active = (workload.get("spec") or {}).get("active", True) is not False
    if not active:
        return QueueState(admitted, evicted.get("reason", "") if evicted.get("status") == "True" else "", evicted.get("message", ""), active=False)
    if evicted.get("status") == "True":
        return QueueState(admitted, evicted.get("reason", "Evicted"), evicted.get("message", ""))
    requeued = conditions.get("Requeued") or {}
    quota = conditions.get("QuotaReserved") or {}
    if requeued.get("reason") in ("Preempted", "PodsReadyTimeout") and not admitted:
        return QueueState(admitted, requeued["reason"], quota.get("message", "") or requeued.get("message", ""))
    return QueueState(admitted, quota.get("reason", ""), quota.get("message", "") if quota.get("status") != "True" else "")
