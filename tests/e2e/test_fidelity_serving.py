"""The checkpoint the scores pick is the one served (issue 22): a job with `serving.checkpoint: best`
whose earlier checkpoint scores best on DINO (random tiny backbones) is served from exports/best/,
by a Deployment of its own and by a shared server, and `keepLast: 1` keeps that checkpoint.

The runs are ones where an earlier checkpoint scores best, measured 2026-12-07 with the trainer
alone (the same code, seeds and photos as here): full fine-tune at learning rate 1.0, DINO 0.741 /
0.901 / 0.874 at steps 2 / 4 / 6; LoRA at 0.1, DINO 0.908 / 0.949 / 0.899."""
from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import pytest

from tests.e2e.conftest import BUCKET, condition, get_job
from tests.e2e.test_operator_real import objects, tiny_job
from tests.e2e.test_shared_serving import SERVER, TOKEN, image_bytes, lora_job, model_ids, server_url

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.usefixtures("operator")]
STEPS = 6


def scored_early(testbed: Any, namespace: str, name: str) -> tuple[dict[str, Any], int]:
    """The job once serving, and the step its best checkpoint is (asserted to be before the end)."""
    def serving_ready() -> bool:
        job = get_job(testbed, namespace, name)
        if (job.get("status") or {}).get("phase") == "Failed":
            raise AssertionError(f"{name} failed: {json.dumps(job['status'], indent=1)}")
        return (condition(job, "ServingReady") or {}).get("status") == "True"

    testbed.wait_for(f"{name} ServingReady", serving_ready, timeout=900, interval=2)
    job = get_job(testbed, namespace, name)
    fidelity = job["status"]["fidelity"]
    best = fidelity["best"]["step"]
    assert fidelity["select"] == "highest dino" and fidelity["latest"]["step"] == STEPS, fidelity
    assert 0 < best < STEPS, f"this run's best checkpoint is its last (see the module docstring): {fidelity}"
    return job, best


def served_model(testbed: Any, namespace: str, name: str) -> str:
    """The --model the job's inference Deployment runs (`dreambooth serve --model ...`)."""
    command = testbed.get("deployment", f"{name}-serve", namespace)["spec"]["template"]["spec"]["containers"][0]["command"]
    return command[command.index("--model") + 1]


def kept_and_exported(minio_client: Any, job: dict[str, Any], best: int) -> None:
    """keepLast 1 keeps the best checkpoint beside the last; exports/best/ holds that step, marked in the report."""
    prefix = job["status"]["outputUri"].removeprefix(f"s3://{BUCKET}/")
    stored = objects(minio_client, prefix + "/")
    kept = sorted({int(m.group(1)) for key in stored if (m := re.search(r"/checkpoints/step-(\d+)(?:-a\d+)?/manifest\.json$", key))})
    assert kept == [best, STEPS], kept
    document = json.loads(minio_client.get_object(BUCKET, f"{prefix}/fidelity.json").read())
    assert document["exports"] == {"final": "final", "best": "exports/best", "best_step": best, "served": "exports/best"}, document
    assert f"{prefix}/exports/best/dreambooth.json" in stored and f"{prefix}/exports/best/report.html" in stored
    report = minio_client.get_object(BUCKET, f"{prefix}/report.html").read().decode()
    assert f'class="ckpt best" data-step="{best}"' in report


def test_a_dedicated_server_serves_the_earlier_checkpoint_that_scored_best(testbed: Any, minio_client: Any, namespace: str,
                                                                          s3_secret: str, images: dict[str, str]) -> None:
    manifest = tiny_job(testbed, minio_client, namespace, images, maxSteps=STEPS, learningRate=1.0)
    spec = manifest["spec"]
    spec["resources"]["nodes"] = 1
    spec["checkpointing"] = {"everyNSteps": 2, "keepLast": 1}
    spec["serving"]["checkpoint"] = "best"
    testbed.apply(manifest, namespace)
    name = manifest["metadata"]["name"]
    job, best = scored_early(testbed, namespace, name)
    kept_and_exported(minio_client, job, best)

    assert served_model(testbed, namespace, name) == f"{job['status']['outputUri']}/exports/best"
    pods = json.loads(testbed.kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=inference", "-o", "json").stdout)["items"]
    ip = next(p for p in pods if p["status"].get("phase") == "Running")["status"]["podIP"]
    request = urllib.request.Request(f"http://{ip}:8080/v1/generate", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "a photo of sks dog", "steps": 2, "seed": 1}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    a_choice_made_after_success_is_exported_then_served(testbed, minio_client, namespace, job, best)


def serving_condition(testbed: Any, namespace: str, name: str) -> dict[str, Any]:
    return condition(get_job(testbed, namespace, name), "ServingReady") or {}


def a_choice_made_after_success_is_exported_then_served(testbed: Any, minio_client: Any, namespace: str, job: dict[str, Any], best: int) -> None:
    """serving.checkpoint edited after success: step-<best> (kept, exported only as exports/best) is
    exported by an export Job on real-0 and the Deployment rolls to it; a step keepLast pruned is
    named in ServingReady while the Deployment keeps serving what it served."""
    name, output = job["metadata"]["name"], job["status"]["outputUri"]
    prefix = output.removeprefix(f"s3://{BUCKET}/")
    chosen = f"step-{best}"
    testbed.kubectl("patch", "dreamboothjob", name, "-n", namespace, "--type", "merge", "-p",
                    json.dumps({"spec": {"serving": {"checkpoint": chosen}}}))
    testbed.wait_for("Exporting", lambda: serving_condition(testbed, namespace, name).get("reason") in ("Exporting", "DeploymentReady"), timeout=60)
    export_job = testbed.wait_for(f"Job {name}-export-{chosen}", lambda: testbed.get("job", f"{name}-export-{chosen}", namespace), timeout=60)
    assert export_job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["dreambooth", "export"]

    def rolled() -> bool:
        ready = serving_condition(testbed, namespace, name)
        assert ready.get("reason") != "ExportFailed", ready
        return served_model(testbed, namespace, name) == f"{output}/exports/step-{best:08d}" and ready.get("status") == "True"

    testbed.wait_for(f"the Deployment serving exports/step-{best:08d}", rolled, timeout=600, interval=2)
    stored = objects(minio_client, f"{prefix}/exports/step-{best:08d}/")
    assert f"{prefix}/exports/step-{best:08d}/dreambooth.json" in stored and f"{prefix}/exports/step-{best:08d}/report.html" in stored

    pruned = next(step for step in range(2, STEPS, 2) if step != best)
    testbed.kubectl("patch", "dreamboothjob", name, "-n", namespace, "--type", "merge", "-p",
                    json.dumps({"spec": {"serving": {"checkpoint": f"step-{pruned}"}}}))
    failed = testbed.wait_for("ExportFailed", lambda: (c := serving_condition(testbed, namespace, name)).get("reason") == "ExportFailed" and c,
                              timeout=600, interval=2)
    assert f"spec.serving.checkpoint step-{pruned}" in failed["message"] and f"checkpoints/step-{pruned:08d} is no longer stored" in failed["message"], failed
    assert "what was served keeps serving" in failed["message"]
    assert served_model(testbed, namespace, name) == f"{output}/exports/step-{best:08d}", "the Deployment was left serving the previous choice"
    assert (testbed.get("deployment", f"{name}-serve", namespace).get("status") or {}).get("readyReplicas") == 1


def test_a_shared_server_registers_the_earlier_checkpoint_that_scored_best(testbed: Any, minio_client: Any, namespace: str,
                                                                          s3_secret: str) -> None:
    testbed.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api-token", "namespace": namespace},
                   "stringData": {"token": TOKEN}})
    manifest = lora_job(testbed, minio_client, namespace, "rex", 0)
    spec = manifest["spec"]
    spec["training"].update(maxSteps=STEPS, learningRate=0.1)
    spec["checkpointing"] = {"everyNSteps": 2, "keepLast": 1}
    spec["serving"]["checkpoint"] = "best"
    testbed.apply(manifest, namespace)
    job, best = scored_early(testbed, namespace, "rex")
    kept_and_exported(minio_client, job, best)

    registry = json.loads(testbed.get("configmap", f"{SERVER}-registry", namespace)["data"]["registry.json"])
    assert registry["adapters"]["rex"]["uri"] == f"{job['status']['outputUri']}/exports/best/lora", registry
    url = server_url(testbed, namespace)
    assert "rex" in model_ids(url)
    assert image_bytes(url, "rex")[:8] == b"\x89PNG\r\n\x1a\n"
