"""Operator at scale: many DreamboothJobs against a pool of KWOK GPU nodes on the test bed.

Prints apply -> Job-created latency (p50/p99, measured by this process: the create call's
return to the Job's arrival on a watch), the time until every gang has been Running, and the
operator's peak RSS. `make bench-operator` runs the full size (200 jobs, 50 nodes).

    python benchmarks/bench_operator.py [--jobs 200] [--nodes 50] [--root .testbed/bench]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test bed lives in tests/ (the product is imported installed)

from tests.testbed.cluster import GPU_POOL_LABELS, Testbed  # noqa: E402

NAMESPACE = "bench"
GPUS_PER_NODE = 8


def fake_gpu_nodes(first: int, count: int) -> list[dict[str, Any]]:
    nodes = []
    for index in range(first, first + count):
        name = f"gpu-{index}"
        capacity = {"cpu": "96", "memory": "1500Gi", "pods": "110", "nvidia.com/gpu": str(GPUS_PER_NODE)}
        nodes.append({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {**GPU_POOL_LABELS, "kubernetes.io/hostname": name}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
            "status": {"allocatable": capacity, "capacity": capacity},
        })
    return nodes


def job_body(name: str, endpoint: str) -> dict[str, Any]:
    # 2 nodes x 1 GPU: 200 gangs fill 50 nodes x 8 GPUs exactly, so every gang can run at once.
    return {
        "apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "data": {"instanceUri": "s3://dreambooth/subjects/bench", "instancePrompt": "a photo of sks dog"},
            "prior": {"classPrompt": "a photo of dog"},
            "resources": {"nodes": 2, "gpusPerNode": 1, "cpu": "1", "memory": "4Gi"},
            "storage": {"endpoint": endpoint, "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3"}},
            "serving": {"enabled": False},
        },
    }


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=50, help="KWOK GPU nodes in the pool (8 GPUs each)")
    parser.add_argument("--root", type=Path, default=REPO / ".testbed" / "bench")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.jobs * 2 > args.nodes * GPUS_PER_NODE:
        parser.error(f"{args.jobs} gangs of 2 GPUs do not fit {args.nodes} nodes x {GPUS_PER_NODE} GPUs")

    import io
    import subprocess

    from kubernetes import client, config, watch
    from minio import Minio
    from PIL import Image

    bed = Testbed(args.root, name="bench")
    print(f"test bed up in {bed.start():.1f} s", flush=True)
    operator = None
    try:
        existing = len(json.loads(bed.kubectl("get", "nodes", "-l", "dreambooth.dev/pool=gpu", "-o", "json").stdout)["items"])
        if args.nodes > existing:
            nodes = {"apiVersion": "v1", "kind": "List", "items": fake_gpu_nodes(existing, args.nodes - existing)}
            bed.kubectl("apply", "-f", "-", input=json.dumps(nodes), timeout=120)
        bed.kubectl("apply", "-f", str(REPO / "crds" / "dreambooth.dev_dreamboothjobs.yaml"))
        bed.kubectl("wait", "--for=condition=Established", "crd/dreamboothjobs.dreambooth.dev", "--timeout=60s")
        bed.kubectl("create", "namespace", NAMESPACE)
        assert bed.minio is not None
        bed.kubectl("create", "secret", "generic", "s3", "-n", NAMESPACE,
                    f"--from-literal=AWS_ACCESS_KEY_ID={bed.minio.access_key}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={bed.minio.secret_key}")
        storage = Minio(bed.minio.endpoint, bed.minio.access_key, bed.minio.secret_key, secure=False)
        storage.make_bucket("dreambooth")
        for index in range(3):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (index * 60, 90, 30)).save(buffer, "PNG")
            storage.put_object("dreambooth", f"subjects/bench/{index}.png", io.BytesIO(buffer.getvalue()), len(buffer.getvalue()))

        env = dict(os.environ, KUBECONFIG=str(bed.kubeconfig), DREAMBOOTH_OPERATOR_METRICS_PORT="0")
        log = open(bed.logs / "operator.log", "ab")
        operator = subprocess.Popen(
            [str(Path(sys.executable).with_name("kopf")), "run", "-m", "dreambooth_operator.handlers", "--all-namespaces", "--standalone"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        time.sleep(3)

        api = config.new_client_from_config(config_file=str(bed.kubeconfig))
        batch = client.BatchV1Api(api)
        custom = client.CustomObjectsApi(api)
        seen: dict[str, float] = {}
        stop = threading.Event()

        def watch_jobs() -> None:
            stream = watch.Watch()
            try:
                for event in stream.stream(batch.list_namespaced_job, NAMESPACE, timeout_seconds=int(args.timeout)):
                    owner = (event["object"].metadata.labels or {}).get("dreambooth.dev/job-name")
                    if owner and owner not in seen:
                        seen[owner] = time.monotonic()
                    if stop.is_set():
                        stream.stop()
            except Exception:  # the test bed going down ends the stream
                pass

        watcher = threading.Thread(target=watch_jobs, daemon=True)
        watcher.start()
        time.sleep(1)

        applied: dict[str, float] = {}
        t0 = time.monotonic()
        for index in range(args.jobs):
            name = f"bench-{index:04d}"
            custom.create_namespaced_custom_object("dreambooth.dev", "v1alpha1", NAMESPACE, "dreamboothjobs", job_body(name, bed.minio.endpoint))
            applied[name] = time.monotonic()
        print(f"applied {args.jobs} jobs in {time.monotonic() - t0:.1f} s", flush=True)

        ran: dict[str, float] = {}
        deadline = t0 + args.timeout
        while len(ran) < args.jobs and time.monotonic() < deadline:
            items = custom.list_namespaced_custom_object("dreambooth.dev", "v1alpha1", NAMESPACE, "dreamboothjobs")["items"]
            now = time.monotonic()
            for item in items:
                phase = (item.get("status") or {}).get("phase")
                # KWOK may take Job pods on to Succeeded: a gang that got there has run.
                if phase in ("Running", "Succeeded") and item["metadata"]["name"] not in ran:
                    ran[item["metadata"]["name"]] = now
            time.sleep(1)
        stop.set()

        latencies = [seen[name] - applied[name] for name in applied if name in seen]
        print(f"jobs: {args.jobs}, GPU nodes: {args.nodes}")
        if latencies:
            print(f"apply -> Job created: p50 {percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f} s, "
                  f"mean {statistics.mean(latencies):.2f} s ({len(latencies)}/{args.jobs} created)")
        if len(ran) == args.jobs:
            print(f"every gang Running: {max(ran.values()) - t0:.1f} s after the first apply")
        else:
            print(f"only {len(ran)}/{args.jobs} gangs reached Running within {args.timeout:.0f} s")
        print(f"operator peak RSS: {peak_rss_mib(operator.pid):.0f} MiB")
        return 0 if len(ran) == args.jobs and len(latencies) == args.jobs else 1
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
        bed.stop()


if __name__ == "__main__":
    sys.exit(main())
