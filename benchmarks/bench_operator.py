"""Operator at scale on the test bed: what a busy GPU cluster asks of it.

1. **Idle history**: 1,000 finished DreamboothJobs (as a cluster keeps them) exist when the
   operator starts; once it has looked at each, its resident memory and CPU are sampled over a
   quiet window (goal: RSS <= 150 MB, CPU <= 2 % of one core; a finished job holds no timer).
2. **Burst**: 200 jobs are applied against 50 KWOK GPU nodes, 2 pods x 1 GPU each; apply -> Job
   latency is measured by this process (the create call's return to the Job's arrival on a
   watch; goal: p50 <= 0.5 s, p99 <= 2 s), and the time until every gang has run.
3. **Arrivals**: 1,000 more jobs arrive at a fixed rate (10 jobs/s) on KWOK nodes added for them:
   apply -> Job p50/p99 at that rate (goal p99 <= 2 s), the operator's API calls per job while
   they arrive, its API writes per running job per minute once all run (goal <= 5), and its
   memory per active job with them all Running (goal: RSS <= 150 MB in all).

Each figure is printed with its goal and the ratio to it (<= 1.00 meets it); the exit code is 0
only when all goals are met. `make bench-operator` runs the full size.

    python benchmarks/bench_operator.py [--jobs 200] [--nodes 50] [--idle 1000] [--arrivals 1000 --rate 10] [--root .testbed/bench]
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test bed lives in tests/ (the product is imported installed)

from tests.testbed.cluster import GPU_POOL_LABELS, Testbed  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from record import run_record  # noqa: E402

NAMESPACE = "bench"
IDLE_NAMESPACE = "bench-history"
ARRIVALS_NAMESPACE = "bench-arrivals"
GPUS_PER_NODE = 8
GOALS = {"p50": 0.5, "p99": 2.0, "rss_mb": 150.0, "cpu_percent": 2.0, "writes_per_job_minute": 5.0}
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")  # dreambooth_api_requests_total verbs that write


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


def job_body(name: str, namespace: str, endpoint: str) -> dict[str, Any]:
    # 2 nodes x 1 GPU: 200 gangs fill 50 nodes x 8 GPUs exactly, so every gang can run at once.
    return {
        "apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "data": {"instanceUri": "s3://dreambooth/subjects/bench", "instancePrompt": "a photo of sks dog"},
            "prior": {"classPrompt": "a photo of dog"},
            "resources": {"nodes": 2, "gpusPerNode": 1, "cpu": "1", "memory": "4Gi"},
            "storage": {"endpoint": endpoint, "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3"}},
            "serving": {"enabled": False},
        },
    }


def finished_status(generation: int) -> dict[str, Any]:
    """What a job that succeeded some time ago carries (serving disabled: nothing left to do)."""
    when = "2026-11-01T00:00:00Z"
    conditions = [
        {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": when, "observedGeneration": generation}
        for t, r, m in (("Accepted", "ChecksPassed", "checks passed"), ("Succeeded", "TrainingComplete", "trained 400 steps"),
                        ("Finished", "ServingDisabled", "training succeeded; serving is disabled"))
    ]
    return {"phase": "Succeeded", "conditions": conditions, "observedGeneration": generation, "acceptedGeneration": generation,
            "installationDefaults": {}, "gang": 0, "restarts": 0, "disruptions": 0, "startTime": when, "completionTime": when,
            "progress": {"step": 400, "totalSteps": 400, "percent": 100.0, "summary": "400/400 (100%)"}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create(api: Any, body: dict[str, Any]) -> None:
    """POST one DreamboothJob with a plain dict (no client-side models: less time in this process)."""
    namespace = body["metadata"]["namespace"]
    params = api.param_serialize(method="POST", resource_path=f"/apis/dreambooth.dev/v1alpha1/namespaces/{namespace}/dreamboothjobs",
                                 header_params={"Content-Type": "application/json", "Accept": "application/json"},
                                 body=body, auth_settings=["BearerToken"])
    response = api.call_api(*params, _request_timeout=(5, 60))
    response.read()
    if response.status >= 300:
        raise RuntimeError(f"create {body['metadata']['name']}: {response.status} {response.data[:300]!r}")


def watch_jobs(kubeconfig: str, namespace: str, out: Any, timeout: float) -> None:
    """In a process of its own: (job name, monotonic time) for each DreamboothJob's first trainer Job."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=kubeconfig)
    query = [("watch", "1"), ("labelSelector", "app.kubernetes.io/managed-by=dreambooth-operator"), ("timeoutSeconds", str(int(timeout)))]
    params = api.param_serialize(method="GET", resource_path=f"/apis/batch/v1/namespaces/{namespace}/jobs", query_params=query,
                                 header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
    response = api.call_api(*params, _request_timeout=(5, timeout + 30))
    out.send(("", 0.0))
    seen: set[str] = set()
    buffer = b""
    for chunk in response.response.stream(65536):
        now = time.monotonic()
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            owner = ((json.loads(line).get("object") or {}).get("metadata", {}).get("labels") or {}).get("dreambooth.dev/job-name")
            if owner and owner not in seen:
                seen.add(owner)
                out.send((owner, now))
    out.send(None)


def first_jobs_seen(pipe: Any, watcher: Any) -> dict[str, float]:
    """What watch_jobs sent so far: job name -> when its first trainer Job arrived; the watcher ends."""
    seen: dict[str, float] = {}
    while pipe.poll(1):
        item = pipe.recv()
        if item is None:
            break
        seen.setdefault(item[0], item[1])
    watcher.terminate()
    return seen


def report(name: str, value: float, goal: float, unit: str) -> bool:
    ok = value <= goal
    print(f"  {name:<34} {value:8.2f} {unit:<4} goal <= {goal:g} {unit}   ratio {value / goal:.2f} {'ok' if ok else 'MISSED'}", flush=True)
    return ok


def api_calls(port: int, verbs: tuple[str, ...] = ("GET", "WATCH", *WRITE_VERBS)) -> float:
    """The operator's own count of its API calls (dreambooth_api_requests_total), summed over `verbs`."""
    return sum(metric(port, "dreambooth_api_requests_total", f'{{verb="{verb}"}}') for verb in verbs)


def running_names(custom: Any, namespace: str) -> set[str]:
    items = custom.list_namespaced_custom_object("dreambooth.dev", "v1alpha1", namespace, "dreamboothjobs")["items"]
    return {i["metadata"]["name"] for i in items if (i.get("status") or {}).get("phase") == "Running"}


def arrivals(bed: Testbed, api: Any, custom: Any, operator: Any, port: int, count: int, rate: float, timeout: float) -> bool:
    """`count` jobs at `rate` jobs/s: latency, API calls per job, writes per running job per minute, RSS."""
    parent, child = multiprocessing.Pipe()
    watcher = multiprocessing.Process(target=watch_jobs, args=(str(bed.kubeconfig), ARRIVALS_NAMESPACE, child, timeout), daemon=True)
    watcher.start()
    parent.recv()
    rss_before = rss_mb(operator.pid)
    reads_before, writes_before = api_calls(port, ("GET", "WATCH")), api_calls(port, WRITE_VERBS)
    applied: dict[str, float] = {}
    t0 = time.monotonic()
    for index in range(count):
        due = t0 + index / rate
        time.sleep(max(0.0, due - time.monotonic()))  # a fixed arrival rate, not as fast as possible
        name = f"arrive-{index:04d}"
        create(api, job_body(name, ARRIVALS_NAMESPACE, bed.minio.endpoint))
        applied[name] = time.monotonic()
    late = time.monotonic() - (t0 + (count - 1) / rate)
    print(f"applied {count} jobs at {rate:g}/s in {time.monotonic() - t0:.1f} s (the last {late:.1f} s behind its schedule)", flush=True)
    deadline = t0 + timeout
    running: set[str] = set()
    while len(running) < count and time.monotonic() < deadline:
        time.sleep(5)
        running = running_names(custom, ARRIVALS_NAMESPACE)
    all_running = time.monotonic()
    reads = api_calls(port, ("GET", "WATCH")) - reads_before
    writes = api_calls(port, WRITE_VERBS) - writes_before
    seen = first_jobs_seen(parent, watcher)
    # Steady state: every job Running, nothing changing; what does the operator still write?
    active = len(running) + len(running_names(custom, NAMESPACE))  # the burst's jobs run too
    time.sleep(15)
    steady_before, steady_reads_before, window = api_calls(port, WRITE_VERBS), api_calls(port, ("GET", "WATCH")), 60.0
    time.sleep(window)
    steady_writes = api_calls(port, WRITE_VERBS) - steady_before
    steady_reads = api_calls(port, ("GET", "WATCH")) - steady_reads_before
    rss = rss_mb(operator.pid)
    latencies = [seen[name] - applied[name] for name in applied if name in seen]
    print(f"arrivals: {count} jobs at {rate:g}/s beside the burst's (load average {os.getloadavg()[0]:.1f}):")
    ok = True
    if latencies:
        ok &= report("apply -> Job created, p50", percentile(latencies, 0.5), GOALS["p50"], "s")
        ok &= report("apply -> Job created, p99", percentile(latencies, 0.99), GOALS["p99"], "s")
        print(f"  mean {statistics.mean(latencies):.2f} s, max {max(latencies):.2f} s ({len(latencies)}/{count} created)")
    print(f"  {len(running)}/{count} Running {all_running - t0:.0f} s after the first arrival; API calls from the first "
          f"arrival until all ran: {reads / count:.1f} reads and {writes / count:.1f} writes per job")
    print(f"  steady state, {active} jobs Running, {window:.0f} s: {steady_writes:.0f} writes, {steady_reads:.0f} reads")
    ok &= report("API writes per running job per minute", steady_writes / max(1, active) * 60 / window, GOALS["writes_per_job_minute"], "")
    ok &= report(f"operator RSS, {active} Running", rss, GOALS["rss_mb"], "MB")
    print(f"  memory per active job: {(rss - rss_before) * 1024 / max(1, len(running)):.1f} kB (RSS {rss_before:.0f} -> {rss:.0f} MB "
          f"for {len(running)} more Running)")
    return ok and len(running) == count and len(latencies) == count


def create_history(bed: Testbed, count: int, endpoint: str) -> None:
    """`count` finished jobs, created and marked Succeeded before the operator starts."""
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(bed.kubeconfig)))
    for chunk in range(0, count, 250):
        items = [job_body(f"done-{i:04d}", IDLE_NAMESPACE, endpoint) for i in range(chunk, min(count, chunk + 250))]
        bed.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}), timeout=300)
    for index in range(count):
        api.patch_namespaced_custom_object_status("dreambooth.dev", "v1alpha1", IDLE_NAMESPACE, "dreamboothjobs",
                                                  f"done-{index:04d}", {"status": finished_status(1)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=50, help="KWOK GPU nodes in the pool (8 GPUs each)")
    parser.add_argument("--idle", type=int, default=1000, help="finished jobs present while idle")
    parser.add_argument("--idle-window", type=float, default=60.0, help="seconds the idle CPU is sampled over")
    parser.add_argument("--arrivals", type=int, default=1000, help="jobs arriving at --rate after the burst (0: none)")
    parser.add_argument("--rate", type=float, default=10.0, help="arrivals per second")
    parser.add_argument("--root", type=Path, default=REPO / ".testbed" / "bench")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.jobs * 2 > args.nodes * GPUS_PER_NODE:
        parser.error(f"{args.jobs} gangs of 2 GPUs do not fit {args.nodes} nodes x {GPUS_PER_NODE} GPUs")

    from kubernetes import client, config
    from minio import Minio
    from PIL import Image

    print(json.dumps({"record": run_record()}), flush=True)
    bed = Testbed(args.root, name="bench")
    print(f"test bed up in {bed.start():.1f} s; load average {os.getloadavg()[0]:.1f} (2-core machine shared)", flush=True)
    operator = None
    ok = True
    try:
        existing = len(json.loads(bed.kubectl("get", "nodes", "-l", "dreambooth.dev/pool=gpu", "-o", "json").stdout)["items"])
        wanted = args.nodes + -(-args.arrivals * 2 // GPUS_PER_NODE)  # the arrivals' gangs run beside the burst's
        if wanted > existing:
            nodes = {"apiVersion": "v1", "kind": "List", "items": fake_gpu_nodes(existing, wanted - existing)}
            bed.kubectl("apply", "-f", "-", input=json.dumps(nodes), timeout=300)
        bed.kubectl("apply", "-f", str(REPO / "crds" / "dreambooth.dev_dreamboothjobs.yaml"))
        bed.kubectl("wait", "--for=condition=Established", "crd/dreamboothjobs.dreambooth.dev", "--timeout=60s")
        assert bed.minio is not None
        for namespace in (NAMESPACE, IDLE_NAMESPACE, ARRIVALS_NAMESPACE):
            bed.kubectl("create", "namespace", namespace, check=False)
            bed.kubectl("create", "secret", "generic", "s3", "-n", namespace,
                        f"--from-literal=AWS_ACCESS_KEY_ID={bed.minio.access_key}",
                        f"--from-literal=AWS_SECRET_ACCESS_KEY={bed.minio.secret_key}")
        storage = Minio(bed.minio.endpoint, bed.minio.access_key, bed.minio.secret_key, secure=False)
        storage.make_bucket("dreambooth")
        for index in range(3):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (index * 60, 90, 30)).save(buffer, "PNG")
            storage.put_object("dreambooth", f"subjects/bench/{index}.png", io.BytesIO(buffer.getvalue()), len(buffer.getvalue()))

        # --- 1. idle history ---------------------------------------------------------------
        t0 = time.monotonic()
        create_history(bed, args.idle, bed.minio.endpoint)
        print(f"{args.idle} finished jobs created in {time.monotonic() - t0:.0f} s", flush=True)
        port = free_port()
        env = dict(os.environ, KUBECONFIG=str(bed.kubeconfig), DREAMBOOTH_OPERATOR_METRICS_PORT=str(port))
        log = open(bed.logs / "operator.log", "ab")
        operator = subprocess.Popen(
            [str(Path(sys.executable).with_name("kopf")), "run", "-m", "dreambooth_operator.handlers", "--all-namespaces", "--standalone"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + args.timeout
        seen_all = False
        while time.monotonic() < deadline:
            try:
                seen_all = metric(port, "dreambooth_jobs", '{phase="Succeeded"}') >= args.idle
            except OSError:
                pass
            if seen_all:
                break
            time.sleep(1)
        print(f"operator looked at all {args.idle} finished jobs {time.monotonic() - t0:.0f} s after the first was created", flush=True)
        time.sleep(10)  # let start-up work settle
        cpu_before, window_start = cpu_seconds(operator.pid), time.monotonic()
        time.sleep(args.idle_window)
        cpu_percent = 100 * (cpu_seconds(operator.pid) - cpu_before) / (time.monotonic() - window_start)
        idle_rss = rss_mb(operator.pid)
        timers = metric(port, "dreambooth_scheduled_reconciles")
        print(f"idle, {args.idle} finished jobs ({args.idle_window:.0f} s window, load average {os.getloadavg()[0]:.1f}):")
        ok &= report("operator RSS", idle_rss, GOALS["rss_mb"], "MB")
        ok &= report("operator CPU (% of one core)", cpu_percent, GOALS["cpu_percent"], "%")
        print(f"  jobs with a timer: {timers:.0f} (finished jobs hold none)")
        ok &= seen_all and timers == 0

        # --- 2. burst ---------------------------------------------------------------------
        # The watch that times the Jobs' arrival runs in its own process: in this one, the applying
        # thread would hold the interpreter and delay the timestamps.
        parent, child = multiprocessing.Pipe()
        watcher = multiprocessing.Process(target=watch_jobs, args=(str(bed.kubeconfig), NAMESPACE, child, args.timeout), daemon=True)
        watcher.start()
        parent.recv()  # the watch is established
        api = config.new_client_from_config(config_file=str(bed.kubeconfig))
        custom = client.CustomObjectsApi(api)
        applied: dict[str, float] = {}
        applied_at: dict[str, float] = {}  # wall clock, to line up with the operator's log
        burst_cpu = cpu_seconds(operator.pid)
        reconciles_before = metric(port, "dreambooth_reconcile_seconds_count")
        t0 = time.monotonic()
        for index in range(args.jobs):
            name = f"bench-{index:04d}"
            create(api, job_body(name, NAMESPACE, bed.minio.endpoint))
            applied[name] = time.monotonic()
            applied_at[name] = time.time()
        print(f"applied {args.jobs} jobs in {time.monotonic() - t0:.1f} s", flush=True)
        ran: dict[str, float] = {}
        deadline = t0 + args.timeout
        while len(ran) < args.jobs and time.monotonic() < deadline:
            items = custom.list_namespaced_custom_object("dreambooth.dev", "v1alpha1", NAMESPACE, "dreamboothjobs")["items"]
            now = time.monotonic()
            for item in items:
                if (item.get("status") or {}).get("phase") in ("Running", "Succeeded") and item["metadata"]["name"] not in ran:
                    ran[item["metadata"]["name"]] = now
            time.sleep(1)
        seen = first_jobs_seen(parent, watcher)
        latencies = [seen[name] - applied[name] for name in applied if name in seen]
        (bed.logs / "bench-burst.json").write_text(json.dumps({name: {"applied": applied_at[name], "job_after": seen.get(name, 0) - applied[name]} for name in applied}))
        print(f"burst: {args.jobs} jobs, {args.nodes} GPU nodes, with the {args.idle} finished ones present (load average {os.getloadavg()[0]:.1f}):")
        if latencies:
            ok &= report("apply -> Job created, p50", percentile(latencies, 0.5), GOALS["p50"], "s")
            ok &= report("apply -> Job created, p99", percentile(latencies, 0.99), GOALS["p99"], "s")
            print(f"  mean {statistics.mean(latencies):.2f} s, max {max(latencies):.2f} s ({len(latencies)}/{args.jobs} created)")
        if len(ran) == args.jobs:
            print(f"  every gang Running {max(ran.values()) - t0:.1f} s after the first apply")
        else:
            print(f"  only {len(ran)}/{args.jobs} gangs reached Running within {args.timeout:.0f} s")
        print(f"  operator RSS after the burst: {rss_mb(operator.pid):.0f} MB; CPU during it {cpu_seconds(operator.pid) - burst_cpu:.1f} s "
              f"over {time.monotonic() - t0:.0f} s; reconciles {metric(port, 'dreambooth_reconcile_seconds_count') - reconciles_before:.0f}")
        if latencies:
            order = [seen[name] - applied[name] for name in sorted(applied) if name in seen]
            tenth = max(1, len(order) // 10)
            print("  p50 by tenth of the burst: " + " ".join(f"{statistics.median(order[i:i + tenth]):.2f}" for i in range(0, len(order), tenth)))
        ok &= len(ran) == args.jobs and len(latencies) == args.jobs

        # --- 3. arrivals at a fixed rate -----------------------------------------------------
        if args.arrivals:
            ok &= arrivals(bed, api, custom, operator, port, args.arrivals, args.rate, args.timeout)
        return 0 if ok else 1
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
