"""The documented upgrade, as a drill on the test bed: two replicas electing a leader, a Running and
a Succeeded job, a newer CRD with one more defaulted field applied first (as the chart README
says), the leader killed: the standby takes over, reads the jobs as the API server now returns
them, and no job changes phase."""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import CRD, OperatorProcess, condition, get_job, gpu_spec, job_manifest, trainer_pods, wait_phase

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("kwok_keeps_job_pods_running")]
PEERING = "upgrade-drill"
NEW_FIELD = "drillRetries"  # what a newer version of the API adds, with a default
LEADING = "leading: this replica acts"


def newer_crd() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    newer = copy.deepcopy(crd)
    spec = newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["runPolicy"]["properties"][NEW_FIELD] = {"type": "integer", "default": 3, "description": "a newer version's field"}
    return newer


@pytest.fixture()
def replicas(testbed: Any, operator: OperatorProcess, namespace: str) -> Iterator[list[OperatorProcess]]:
    """The session's operator makes way for two replicas of a peered installation, then returns."""
    operator.stop()
    testbed.kubectl("apply", "--server-side", "-f", str(CRD.with_name("kopf.dev_peerings.yaml")))
    testbed.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    testbed.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}})
    both = [OperatorProcess(operator.env, testbed.logs / f"drill-replica-{index}.log", peering=PEERING) for index in range(2)]
    try:
        for replica in both:
            replica.start()  # started one after the other: the first is older and leads
        yield both
    finally:
        for replica in both:
            replica.stop()
        testbed.kubectl("delete", "dbj", "--all", "-n", namespace, "--wait=false", check=False)
        testbed.kubectl("apply", "-f", str(CRD))  # the CRD this checkout ships, back for the other tests
        operator.start()


def leads(replica: OperatorProcess) -> bool:
    log = replica.log()
    return log.rfind(LEADING) > log.rfind("standing by")


def phases(testbed: Any, namespace: str) -> dict[str, str]:
    items = json.loads(testbed.kubectl("get", "dbj", "-n", namespace, "-o", "json").stdout)["items"]
    return {item["metadata"]["name"]: (item.get("status") or {}).get("phase", "") for item in items}


def test_a_newer_crd_and_a_leader_change_leave_every_job_as_it_was(testbed: Any, replicas: list[OperatorProcess], namespace: str,
                                                                   s3_secret: str, subject: str) -> None:
    old, standby = replicas
    testbed.wait_for("the older replica leads", lambda: leads(old) and not leads(standby), timeout=60)
    small = {"gpusPerNode": 4}
    testbed.apply(job_manifest(testbed, "running", gpu_spec(testbed, subject, resources=small, serving={"enabled": False})), namespace)
    testbed.apply(job_manifest(testbed, "done", gpu_spec(testbed, subject, resources=small, serving={"enabled": False})), namespace)
    wait_phase(testbed, namespace, "running", "Running", timeout=90)
    wait_phase(testbed, namespace, "done", "Running", timeout=90)
    for pod in trainer_pods(testbed, namespace, "done"):
        testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Succeeded")
    wait_phase(testbed, namespace, "done", "Succeeded", timeout=60)
    before = phases(testbed, namespace)
    assert before == {"running": "Running", "done": "Succeeded"}

    # helm upgrade, step 1: the new CRD; every stored job now reads with the new defaulted field.
    testbed.apply(newer_crd())
    testbed.wait_for("the new field defaulted into stored jobs",
                     lambda: get_job(testbed, namespace, "running")["spec"]["runPolicy"].get(NEW_FIELD) == 3, timeout=30)
    # Step 2, the rolling update: the leader goes (killed, as a node failure would), the standby takes over.
    old.kill()
    taken_over = time.monotonic()
    testbed.wait_for("the standby leads", lambda: leads(standby), timeout=60)
    print(f"\n[drill] the standby led {time.monotonic() - taken_over:.1f} s after the leader was killed")
    # An edit after the takeover proves the new leader reads and decides on the job (it must record the generation).
    testbed.kubectl("patch", "dbj", "running", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"maxRestarts":2}}}')
    generation = get_job(testbed, namespace, "running")["metadata"]["generation"]

    def recorded() -> bool:
        assert phases(testbed, namespace) == before, f"a job changed phase: {phases(testbed, namespace)}"
        return get_job(testbed, namespace, "running")["status"].get("observedGeneration") == generation

    testbed.wait_for("the new leader recorded the edit", recorded, timeout=30)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # a few reconciles' worth of looking
        assert phases(testbed, namespace) == before, phases(testbed, namespace)
        time.sleep(1)
    for name in ("running", "done"):
        job = get_job(testbed, namespace, name)
        assert condition(job, "Failed") is None and condition(job, "Held") is None, job["status"]["conditions"]
    assert f"spec.runPolicy.{NEW_FIELD}" in standby.log(), "the standby says what it ignored"
