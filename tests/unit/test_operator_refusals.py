"""What real clusters do to pods (pure): refuse them (quota, admission), leave them waiting (image
pulls, missing config), strand them on a dead node, evict them for their own storage."""
from __future__ import annotations

from datetime import timedelta

from dreambooth_operator import failures, lifecycle
from dreambooth_operator.failures import PodState
from dreambooth_operator.lifecycle import Action, TrainerJobState
from dreambooth_api.v1alpha1.spec import parse_spec
from tests.unit.test_operator_citizenship import HASH, conditions, failed, running, step
from tests.unit.test_operator_lifecycle import SPEC, T0, accepted, spec

QUOTA = ('Error creating: pods "rex-train-0-1-x7k2p" is forbidden: exceeded quota: one-pod, requested: pods=1, '
         'used: pods=1, limited: pods=1')


def pending(ready: int = 1, active: int = 1) -> TrainerJobState:
    return TrainerJobState(gang=0, active=active, ready=ready, template_hash=HASH, created=T0, start_time=T0)


def test_pods_the_cluster_refuses_are_named_and_spend_nothing() -> None:
    status = step(accepted(), None).status
    placed = (PodState("rex-train-0-0-a", 0, "Running", "gpu-0", True),)
    refused = step(status, pending(), T0 + timedelta(seconds=30), pods=placed, refusal=QUOTA)
    assert conditions(refused)["Running"] == ("False", "PodsRefused")
    message = next(c["message"] for c in refused.status["conditions"] if c["type"] == "Running")
    assert "exceeded quota: one-pod" in message and "1/2 pods" in message
    assert refused.requeue_after is not None, "nothing announces a refused pod: looked at again"
    # The placed rank waits for its peer in vain, exits 1 and fails the Job: no restart is spent.
    stranded = step(refused.status, failed("Job has reached the specified backoff limit", "BackoffLimitExceeded"),
                    T0 + timedelta(minutes=10), pods=(PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, exit_code=1),))
    assert (stranded.status["restarts"], stranded.status["gang"], stranded.status["unplacedRestarts"]) == (0, 1, 1)
    assert conditions(stranded)["Restarting"] == ("True", "GangNotPlaced")


def test_gangs_never_placed_whole_are_retried_a_bounded_number_of_times() -> None:
    status = accepted(unplacedRestarts=lifecycle.MAX_UNPLACED_RESTARTS)
    status["conditions"] = [*status["conditions"], {"type": "Running", "status": "False", "reason": "PodsRefused", "message": QUOTA,
                                                    "lastTransitionTime": "2026-11-26T06:00:00Z"}]
    plan = step(status, failed("backoff limit", "BackoffLimitExceeded"))
    assert plan.phase == "Failed" and conditions(plan)["Failed"] == ("True", "GangNeverPlaced")
    # Backoff grows between tries (and differs per job: two gangs livelocked on the same nodes drift apart).
    first = step({**accepted(), "conditions": status["conditions"]}, failed("backoff limit", "BackoffLimitExceeded"))
    third = step({**accepted(unplacedRestarts=2), "conditions": status["conditions"]}, failed("backoff limit", "BackoffLimitExceeded"))
    assert 10 <= first.requeue_after < 20 and 40 <= third.requeue_after < 50
    # A gang that runs whole starts the count again.
    assert "unplacedRestarts" not in step(accepted(unplacedRestarts=3), running()).status


def test_a_trainer_that_cannot_start_says_why() -> None:
    status = step(accepted(), None).status
    pods = (PodState("rex-train-0-0-a", 0, "Pending", "gpu-0", True, waiting_reason="ImagePullBackOff",
                     waiting_message='Back-off pulling image "dreambooth/trainer:typo"'),
            PodState("rex-train-0-1-b", 0, "Running", "gpu-1", True))
    plan = step(status, pending(), T0 + timedelta(seconds=30), pods=pods)
    assert conditions(plan)["Running"] == ("False", "PodsNotStarting")
    assert 'rex-train-0-0-a' in str(plan.status["conditions"]) and "dreambooth/trainer:typo" in str(plan.status["conditions"])


def test_the_active_deadline_is_on_a_timer_even_when_no_pod_was_ever_made() -> None:
    deadline = spec(activeDeadlineSeconds=120)
    created = step(accepted(), None, the_spec=deadline)
    assert created.requeue_after is not None and created.requeue_after <= 120
    nothing = step(created.status, TrainerJobState(gang=0, template_hash=HASH, created=T0), T0 + timedelta(seconds=100),
                   the_spec=deadline, refusal=QUOTA)
    assert nothing.requeue_after is not None and nothing.requeue_after <= 20
    past = step(nothing.status, TrainerJobState(gang=0, template_hash=HASH, created=T0), T0 + timedelta(seconds=121), the_spec=deadline)
    assert past.phase == "Failed" and conditions(past)["Failed"] == ("True", "DeadlineExceeded")


def test_a_pod_of_a_one_node_gang_stuck_on_a_dead_node_restarts_the_gang() -> None:
    one = parse_spec({**SPEC, "resources": {"nodes": 1, "gpusPerNode": 8}})
    status = step(step(accepted(), None, the_spec=one).status, TrainerJobState(gang=0, active=1, ready=1, template_hash=HASH), the_spec=one).status
    grace_over = T0 + timedelta(minutes=20)
    stuck = PodState("rex-train-0-0-a", 0, "Running", "gpu-3", True, deletion_deadline=grace_over - timedelta(seconds=5), node_ready=False)
    plan = step(status, TrainerJobState(gang=0, active=1, ready=0, template_hash=HASH, start_time=T0), grace_over, the_spec=one, pods=(stuck,))
    assert plan.actions == [Action("delete_job", 0)] and plan.status["disruptions"] == 1 and plan.status["gang"] == 1
    assert "gpu-3 not ready" in str(plan.status["conditions"])
    # Within its grace period it is given time, with a timer set for when the grace ends.
    early = step(status, TrainerJobState(gang=0, active=1, ready=0, template_hash=HASH, start_time=T0),
                 grace_over - timedelta(seconds=65), the_spec=one, pods=(stuck,))
    assert early.actions == [] and early.requeue_after <= 62
    # The next gang waits for it and force-deletes it (its node will never confirm the deletion).
    waiting = step(plan.status, None, grace_over + timedelta(seconds=3), the_spec=one, stale_pods=1, old_pods=(stuck,))
    assert Action("force_delete_pod", target="rex-train-0-0-a") in waiting.actions


def test_an_eviction_for_the_pods_own_emptydir_limit_is_a_failure_naming_the_volume() -> None:
    evicted = PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, disrupted=True, status_reason="Evicted",
                       status_message='Usage of EmptyDir volume "scratch" exceeds the limit "100Gi". ')
    status = step(accepted(), running()).status
    disrupted = "Pod ns/rex-train-0-0-a has condition DisruptionTarget matching FailJob rule at index 1"
    plan = step(status, failed(disrupted), pods=(evicted,))
    assert (plan.status["restarts"], plan.status["disruptions"]) == (1, 0)
    assert "'scratch'" in str(plan.status["conditions"]) and "100Gi" in str(plan.status["conditions"])
    # The node running low on disk is another matter: a disruption.
    pressure = PodState("rex-train-0-0-a", 0, "Failed", "gpu-0", True, disrupted=True, status_reason="Evicted",
                        status_message="The node was low on resource: ephemeral-storage. ")
    assert failures.classify("PodFailurePolicy", disrupted, (pressure,), "64Gi").kind == failures.DISRUPTION


def test_max_disruptions_is_finite_by_default() -> None:
    assert parse_spec(SPEC).run_policy.max_disruptions == 20
    status = accepted(disruptions=20, gang=20)
    plan = step(status, failed("Pod ns/p has condition DisruptionTarget matching FailJob rule at index 1"))
    assert plan.phase == "Failed" and conditions(plan)["Failed"] == ("True", "TooManyDisruptions")
