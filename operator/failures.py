"""Why a gang failed, as one of a few classes that decide what happens next (pure functions).

Kubernetes says what it can through the trainer Job's podFailurePolicy (`builders.POD_FAILURE_RULES`:
the Job's Failed condition names the rule that matched); the gang's pods say the rest (a peer of
a preempted rank fails with an ordinary error, a rank that waited for an unplaced master times out).

| class        | what                                                      | next                                      |
|--------------|-----------------------------------------------------------|-------------------------------------------|
| `permanent`  | trainer exit code 2: bad config or input                  | Failed, TrainerRejectedInput              |
| `oom`        | a trainer container OOMKilled                             | Failed, OutOfMemory (or a restart if asked)|
| `disruption` | DisruptionTarget, exit 143 (SIGTERM), its node lost       | restart, counts `disruptions`, not `restarts` |
| `failure`    | evicted for its own emptyDir/ephemeral-storage limit      | restart, spends `maxRestarts` (names the volume) |
| `unplaced`   | a pod of the gang was never scheduled                     | restart, spends nothing                   |
| `failure`    | anything else                                             | restart, spends `maxRestarts`             |
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

PERMANENT = "permanent"
OOM = "oom"
DISRUPTION = "disruption"
UNPLACED = "unplaced"
FAILURE = "failure"

EXIT_BAD_INPUT = 2
EXIT_SIGTERM = 143
EXIT_SIGKILL = 137
# Pod conditions/reasons that mean "taken away", not "broke" (preemption, eviction, node loss).
DISRUPTION_CONDITION = "DisruptionTarget"
NODE_LOST_REASONS = ("NodeLost", "Evicted", "Preempting", "Terminated", "DeletionByTaintManager", "DeletionByPodGC")
_RULE_INDEX = re.compile(r"rule at index (\d+)")
# A trainer container waiting for one of these will not start by itself soon (the kubelet says why).
NOT_STARTING_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                        "CreateContainerError", "RunContainerError", "CrashLoopBackOff")
# The kubelet's messages when a pod outgrows its own storage limits (pkg/kubelet/eviction): the
# same run outgrows them again at the same point, so it is no disruption.
_EMPTY_DIR_EVICTION = re.compile(r'Usage of EmptyDir volume "([^"]+)" exceeds the limit "([^"]+)"')
_OWN_STORAGE_EVICTION = re.compile(r"exceeded its local ephemeral storage limit|ephemeral local storage usage exceeds the total limit")


@dataclass(frozen=True)
class PodState:
    """One trainer pod as the failure and placement logic needs it."""

    name: str
    gang: int
    phase: str = "Pending"
    node: str = ""
    scheduled: bool = False
    unschedulable_message: str = ""
    deletion_deadline: datetime | None = None  # metadata.deletionTimestamp: deletion time + grace period
    node_ready: bool | None = None  # None: not known (no node, or nodes not readable)
    exit_code: int | None = None
    terminated_reason: str = ""
    disrupted: bool = False  # DisruptionTarget=True, or a node-loss reason
    created: datetime | None = None
    status_reason: str = ""  # the pod's status.reason (Evicted, ...)
    status_message: str = ""  # the pod's status.message (the kubelet's eviction message)
    waiting_reason: str = ""  # the trainer container's waiting reason (ImagePullBackOff, ...)
    waiting_message: str = ""

    @property
    def ended(self) -> bool:
        """Its containers are done (a finalizer may still hold the object: nothing runs in it)."""
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class Failure:
    kind: str
    message: str


def rule_kinds() -> tuple[str, ...]:
    """The class of each podFailurePolicy rule, by index (kept beside builders.POD_FAILURE_RULES).
    Rule 2 (exit 143) is Ignore now; Jobs made by older operators still fail by it: a disruption."""
    return (PERMANENT, DISRUPTION, DISRUPTION, OOM)


def classify(failure_reason: str, failure_message: str, pods: tuple[PodState, ...], memory: str) -> Failure:
    """The class of a failed gang from its Job's Failed condition and its pods."""
    why = failure_message or failure_reason or "a pod failed"
    kind = _kind_from_rule(failure_reason, failure_message)
    oom_pod = next((p for p in pods if p.terminated_reason == "OOMKilled"), None)
    if kind == PERMANENT:
        return Failure(PERMANENT, why)
    outgrown = own_storage_eviction(pods)
    if outgrown is not None:
        return Failure(FAILURE, outgrown)
    if kind == OOM or oom_pod is not None:
        if oom_pod is not None:
            return Failure(OOM, f"pod {oom_pod.name} was OOMKilled: it used more than its memory limit {memory} (spec.resources.memory)")
        if kind == OOM:
            return Failure(FAILURE, f"{why} (killed with SIGKILL, not for memory)")
    if kind == DISRUPTION:
        return Failure(DISRUPTION, why)
    disrupted = next((p for p in pods if p.disrupted or p.exit_code == EXIT_SIGTERM or p.node_ready is False), None)
    if disrupted is not None:
        return Failure(DISRUPTION, f"pod {disrupted.name} was disrupted ({_pod_cause(disrupted)}); the gang's other pods failed with it")
    unplaced = [p for p in pods if not p.scheduled and p.phase == "Pending"]
    if unplaced:
        return Failure(UNPLACED, f"{len(unplaced)} pod(s) of the gang were never placed ({unplaced[0].unschedulable_message or 'no room'}); the placed ranks gave up waiting")
    return Failure(FAILURE, why)


def _kind_from_rule(reason: str, message: str) -> str | None:
    if reason != "PodFailurePolicy":
        return None
    match = _RULE_INDEX.search(message)
    kinds = rule_kinds()
    if match is None or int(match.group(1)) >= len(kinds):
        return PERMANENT if f"exit code {EXIT_BAD_INPUT}" in message else None
    return kinds[int(match.group(1))]


def _pod_cause(pod: PodState) -> str:
    if pod.node_ready is False:
        return f"its node {pod.node} is not ready"
    if pod.disrupted:
        return "DisruptionTarget"
    return f"exit code {pod.exit_code} after SIGTERM"


def stuck_pods(pods: tuple[PodState, ...], now: datetime, unknown_node_slack: float = 60.0) -> list[PodState]:
    """Pods of an old gang past their grace period whose node is gone: nobody will finish them.

    A node known to be not ready is gone now; a node we cannot see gets `unknown_node_slack` more
    seconds (its kubelet may only be slow)."""
    stuck = []
    for pod in pods:
        if pod.deletion_deadline is None or now <= pod.deletion_deadline or pod.node_ready is True or pod.ended:
            continue
        late = (now - pod.deletion_deadline).total_seconds()
        if pod.node_ready is False or late > unknown_node_slack:
            stuck.append(pod)
    return stuck


def own_storage_eviction(pods: tuple[PodState, ...]) -> str | None:
    """A pod evicted for outgrowing its own emptyDir or ephemeral-storage limit, named, or None."""
    for pod in pods:
        if pod.status_reason != "Evicted":
            continue
        volume = _EMPTY_DIR_EVICTION.search(pod.status_message)
        if volume is not None:
            return (f"pod {pod.name} was evicted: its emptyDir volume {volume.group(1)!r} outgrew its limit {volume.group(2)} "
                    "(the same run outgrows it again: not a disruption)")
        if _OWN_STORAGE_EVICTION.search(pod.status_message):
            return f"pod {pod.name} was evicted for its own ephemeral-storage limit: {pod.status_message.strip()}"
    return None


def stopped_on_sigterm(pods: tuple[PodState, ...], since: datetime | None) -> PodState | None:
    """A rank of a running gang that ended on SIGTERM (exit 143, after its checkpoint): its peer was
    taken, or it was. The Job's podFailurePolicy ignores 143 (a suspended Job's pods exit so), so
    the operator looks itself. Pods deleted before the Job last resumed (`since`) do not count."""
    for pod in pods:
        if pod.phase != "Failed" or pod.exit_code != EXIT_SIGTERM:
            continue
        if pod.deletion_deadline is None or (since is not None and pod.created is not None and pod.created >= since):
            return pod
    return None
