"""Upgrades (no cluster): stored objects are read leniently, and an accepted job is never failed
because another version of the operator reads its spec differently."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from dreambooth_api.v1alpha1.sections import ConfigError
from dreambooth_api.v1alpha1.stored import read_stored_spec
from dreambooth_operator import kube, lifecycle
from dreambooth_operator.reconciler import Reconciler
from dreambooth_operator.watches import Children, slim_job
from tests.unit.test_operator_lifecycle import SPEC, T0, accepted


def newer_crds_spec() -> dict[str, Any]:
    """What the API server returns once a newer CRD with defaulted fields is applied."""
    spec = copy.deepcopy(SPEC)
    spec["runPolicy"]["restartPolicyV2"] = "Gang"
    spec["futureSection"] = {"enabled": False}
    spec.setdefault("podTemplate", {})["env"] = [{"name": "A", "value": "b", "valueFromV2": {}}]
    return spec


def test_fields_a_newer_crd_added_are_ignored_and_named() -> None:
    stored = read_stored_spec(newer_crds_spec())
    assert stored.spec.run_policy.max_restarts == 2
    assert set(stored.ignored) == {"spec.runPolicy.restartPolicyV2", "spec.futureSection", "spec.podTemplate.env.0.valueFromV2"}
    with pytest.raises(ConfigError, match=r"spec\.training\.maxSteps"):
        read_stored_spec({**newer_crds_spec(), "training": {"maxSteps": 0}})


class Recorder:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    def patch_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None) -> dict[str, Any]:
        self.patches.append(status)
        return {"metadata": {"resourceVersion": str(100 + len(self.patches))}}


def body(spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob",
            "metadata": {"name": "rex", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "7",
                         "creationTimestamp": "2026-11-26T06:00:00Z"},
            "spec": spec, "status": status}


def reconcile_once(monkeypatch: pytest.MonkeyPatch, job: dict[str, Any], children_jobs: list[dict[str, Any]] = ()) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(kube, "patch_status", recorder.patch_status)
    children = Children(["ns"], lambda namespace, name: None)
    for child in children_jobs:
        children.jobs._store(("ns", child["metadata"]["name"]), slim_job(child))
    reconciler = Reconciler(children, post_event=lambda *args: None)
    reconciler.bodies.offer("ns/rex", job)
    reconciler.reconcile("ns", "rex")
    return recorder


def running_status() -> dict[str, Any]:
    status = accepted()
    plan = lifecycle.decide(lifecycle.Observation("rex", "ns", 1, read_stored_spec(SPEC).spec, status, T0,
                                                  job=lifecycle.TrainerJobState(gang=0, active=2, ready=2)))
    return plan.status


def the_gang() -> dict[str, Any]:
    return {"metadata": {"name": "rex-train-0", "namespace": "ns", "uid": "j0",
                         "labels": {"dreambooth.dev/job-name": "rex", "dreambooth.dev/gang": "0"},
                         "ownerReferences": [{"uid": "u", "controller": True, "kind": "DreamboothJob", "name": "rex"}]},
            "spec": {"suspend": False}, "status": {"active": 2, "ready": 2}}


def test_the_old_operator_leaves_jobs_alone_after_a_newer_crd_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    status = running_status()
    assert status["phase"] == "Running"
    recorder = reconcile_once(monkeypatch, body(newer_crds_spec(), status), [the_gang()])
    assert all(patch.get("phase") in (None, "Running") for patch in recorder.patches), recorder.patches
    done = {**status, "phase": "Succeeded"}
    done["conditions"] = [*done["conditions"], {"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "",
                                                "lastTransitionTime": "2026-11-26T06:00:00Z"}]
    recorder = reconcile_once(monkeypatch, body({**newer_crds_spec(), "serving": {"enabled": False}}, done))
    assert all(patch.get("phase") in (None, "Succeeded") for patch in recorder.patches), recorder.patches


def test_an_accepted_job_a_tightened_rule_refuses_is_held_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = {**SPEC, "training": {"maxSteps": 0}}  # as if a newer rule refused what was accepted
    recorder = reconcile_once(monkeypatch, body(refused, running_status()), [the_gang()])
    (patch,) = recorder.patches
    held = next(c for c in patch["conditions"] if c["type"] == "Held")
    assert held["status"] == "True" and held["reason"] == "SpecNotReadable" and "spec.training.maxSteps" in held["message"]
    assert patch.get("phase") in (None, "Running")
    # Not accepted yet: refused at once, as before.
    recorder = reconcile_once(monkeypatch, body(refused, {}))
    assert recorder.patches[-1]["phase"] == "Failed"


def test_a_binary_value_in_the_credentials_secret_is_never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ca.p12 beside the keys the job names: the job is admitted; a named key that is not text is named."""
    import base64

    from dreambooth_operator import builders, store

    secret = {"metadata": {"name": "s3"}, "data": {
        "AWS_ACCESS_KEY_ID": base64.b64encode(b"minio").decode(), "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"secret").decode(),
        "ca.p12": base64.b64encode(bytes(range(256))).decode()}}
    monkeypatch.setattr(kube, "request", lambda method, path, **kw: secret)
    monkeypatch.setattr(store, "check_instance_images", lambda creds, uri: 4)
    monkeypatch.setattr(store, "check_model_source", lambda creds, source: None)
    reconciler = Reconciler(Children(["ns"], lambda namespace, name: None), post_event=lambda *args: None)
    ref = builders.JobRef("rex", "ns", "u", read_stored_spec(SPEC).spec)
    assert reconciler._admission_problem(ref) is None
    secret["data"]["AWS_SECRET_ACCESS_KEY"] = secret["data"]["ca.p12"]
    reconciler._secrets.clear()
    reason, message, permanent = reconciler._admission_problem(ref)
    assert reason == "SecretKeyUnreadable" and "'AWS_SECRET_ACCESS_KEY'" in message and not permanent
