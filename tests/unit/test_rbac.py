"""The chart grants exactly what the operator uses (dreambooth_operator.permissions), and the docs
list exactly that (rendered with the test-bed helm; no cluster needed)."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_operator import permissions
from tests.testbed.cluster import binaries, pinned_versions

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dreambooth-operator"
DOCS = REPO / "docs" / "operator.md"
BEGIN, END = "<!-- permissions: begin (python -m dreambooth_operator.permissions) -->", "<!-- permissions: end -->"


def render(*sets: str) -> list[dict[str, Any]]:
    helm = binaries()["helm"]
    if not helm.exists():
        pytest.fail(f"{helm} is missing: run `make testbed-binaries` (make test does)")
    out = subprocess.run([str(helm), "template", "r", str(CHART), "--kube-version", pinned_versions()["KUBERNETES_VERSION"], *sets],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_a_cluster_wide_install_grants_exactly_what_the_operator_uses() -> None:
    (role,) = [d for d in render() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "r-dreambooth-operator"]
    assert granted(role) == permissions.grants(permissions.cluster_wide())
    assert ("dreambooth.dev", "dreamboothjobs/finalizers", "update") in granted(role)


def test_a_namespaced_install_grants_exactly_that_in_each_namespace_and_nothing_cluster_wide() -> None:
    docs = render("--set", "rbac.namespaces={team-a,team-b}", "--set", "rbac.aggregateToDefaultRoles=false")
    # The operator's Roles (the other one lets every user read the published defaults ConfigMap).
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["labels"].get("app.kubernetes.io/component") != "defaults"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert granted(role) == permissions.grants(permissions.per_namespace())
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_docs_list_what_the_chart_grants() -> None:
    text = DOCS.read_text()
    assert BEGIN in text and END in text, f"docs/operator.md lacks the {BEGIN} ... {END} block"
    listed = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert listed == permissions.markdown_table(), "regenerate: python -m dreambooth_operator.permissions"


def test_leader_election_needs_no_more_than_its_peering_object() -> None:
    docs = render()
    (peering,) = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "r-dreambooth-operator"]
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--peering={peering['metadata']['name']}" in args and "--standalone" not in args
    standalone = [d for d in render("--set", "leaderElection.enabled=false", "--set", "replicaCount=1") if d["kind"] == "Deployment"]
    assert "--standalone" in standalone[0]["spec"]["template"]["spec"]["containers"][0]["args"]
