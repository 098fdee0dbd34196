"""Who may reach a served job (pure): edits of serving.ingressFrom take effect, a shared server
never silently serves another job's peers."""
from __future__ import annotations

import copy

from dreambooth_operator import builders, shared_server
from dreambooth_operator.lifecycle import Action, ServingState, TrainerJobState
from dreambooth_operator.network_policies import build_job_network_policy, network_policy_hash
from dreambooth_api.v1alpha1.spec import parse_spec
from tests.unit.test_operator_citizenship import HASH, step
from tests.unit.test_operator_lifecycle import SPEC, accepted

PEERS = [{"podSelector": {"app": "frontend"}}]


def served(ingress: list) -> tuple:
    spec = parse_spec({**copy.deepcopy(SPEC), "serving": {"ingressFrom": ingress}})
    return spec, builders.JobRef("rex", "ns", "u", spec)


def test_revoking_a_peer_reaches_the_network_policy_of_a_served_job() -> None:
    before, ref_before = served(PEERS)
    after, ref_after = served([])
    done = step(accepted(), TrainerJobState(gang=0, succeeded=True, template_hash=HASH), the_spec=before).status
    serving = ServingState(1, 1, spec_hash=builders.serving_hash(after))
    built = build_job_network_policy(ref_before)["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
    plan = step(done, None, the_spec=after, serving=serving, network_policy_hash=built)
    assert Action("ensure_network_policy") in plan.actions
    assert build_job_network_policy(ref_after)["spec"]["ingress"][1]["from"] == [{"podSelector": {}}]
    same = step(done, None, the_spec=after, serving=serving, network_policy_hash=network_policy_hash(ref_after))
    assert Action("ensure_network_policy") not in same.actions


def test_a_shared_server_refuses_a_job_with_other_peers() -> None:
    lora = {**SPEC, "training": {**SPEC["training"], "lora": {"enabled": True}}}
    first = shared_server.definition_from(parse_spec({**lora, "serving": {"server": "sd", "ingressFrom": PEERS}}))
    other = shared_server.definition_from(parse_spec({**lora, "serving": {"server": "sd"}}))
    conflict = shared_server.sharing_conflict("sd", "mia", first, other)
    assert conflict and "serving.ingressFrom" in conflict and "frontend" in conflict
    assert shared_server.sharing_conflict("sd", "mia", first, first) is None
