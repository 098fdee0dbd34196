"""`make demo`: the whole product on this machine.

1. the operator, trainer and inference images are built (`make images`: buildah, cached by
   content) and the test bed comes up (a real control plane, KWOK GPU nodes, the node real-0
   run by a real kubelet on containerd with cluster DNS and Services, MinIO; built once from
   pinned Go modules); the images are imported into real-0's containerd (once per content);
2. the Helm chart is installed as a user would (CRD, RBAC, the operator Deployment, whose pods
   run the operator image on real-0), with the test bed's MinIO and the built images as its
   defaults;
3. the tiny subject's photos go to MinIO and `examples/job-tiny.yaml` is applied, its images
   left to the installation;
4. phase, progress and ETA are printed as `kubectl get dbj` shows them, through Succeeded and
   ServingReady (2 trainer pods x 1 process over gloo in the trainer image, then an inference
   Deployment in the inference image);
5. an image is fetched from the endpoint into demo-output/, and a summary says where
   everything is and how to tear it down.

`make demo FAMILY=sdxl|sd3|flux` runs the same path with that family's built-in tiny model
(`tiny-sdxl`, `tiny-sd3`, `tiny-flux`) as a LoRA job, the way those families are mostly trained
(FAMILY=flux: about 3 minutes on two busy cores). Those tiny models decode with a random VAE, so
their images are noise before and after: they show the path end to end, not a learned subject.
The default, FAMILY=tiny, is the SD1 example as it is.

The demo trains the example long enough to see DreamBooth work (LEARNING below: 600 steps, the
settings of examples/train-tiny.yaml, a few minutes on two cores): demo-output/before-after.png shows the instance prompt's
images (top rows) and the class prompt's (bottom rows) before and after training, and the
trainer's subject-fidelity figures (pixel distance to the nearest photo) are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.testbed.cluster import Testbed, build_binaries  # noqa: E402
from tests.testbed.images import built_images  # noqa: E402

NAMESPACE = "demo"
RELEASE = "dreambooth"
OPERATOR_NAMESPACE = "dreambooth-system"
CHART = REPO / "charts" / "dreambooth-operator"
BUCKET = "dreambooth"
SECRET = "dreambooth-s3"
EXAMPLE = REPO / "examples" / "job-tiny.yaml"
SUBJECT = REPO / "examples" / "tiny-subject"
# The example job, trained long enough for the subject to show (as examples/train-tiny.yaml).
LEARNING = {
    "training": {"maxSteps": 600, "learningRate": 3.0e-3, "ema": True, "emaDecay": 0.99},
    "prior": {"numClassImages": 8, "sampleSteps": 10, "sampleBatchSize": 4},
    "checkpointing": {"everyNSteps": 100},
    "validation": {"numImages": 4, "steps": 25, "guidanceScale": 3.0},
}
FAMILIES = ("tiny", "sdxl", "sd3", "flux")


def learning_for(family: str) -> dict[str, dict[str, Any]]:
    """LEARNING; the other families' LoRA runs keep their own learning rate and train without EMA."""
    if family == "tiny":
        return LEARNING
    return {**LEARNING, "training": {"maxSteps": LEARNING["training"]["maxSteps"]}}


def family_job(manifest: dict[str, Any], family: str) -> dict[str, Any]:
    """The example job for another family: its tiny model, LoRA, and a name of its own."""
    if family == "tiny":
        return manifest
    manifest["metadata"]["name"] = f"tiny-{family}-dog"
    manifest["spec"]["model"].update({"source": f"tiny-{family}", "family": family})
    manifest["spec"]["training"]["lora"] = {"enabled": True, "rank": 8}
    manifest["spec"]["training"]["learningRate"] = 1.0e-3
    return manifest


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def start_testbed(root: Path) -> Testbed:
    bed = Testbed(root)
    built = build_binaries()
    if bed.is_up():
        say(f"test bed already up at {root}")
    else:
        say(f"starting the test bed (binaries: {built:.0f} s) ...")
        say(f"test bed up in {bed.start():.0f} s")
    return bed


def image_values(name: str, ref: str) -> list[str]:
    repository, _, tag = ref.rpartition(":")
    key = {"operator": "image", "trainer": "defaults.trainerImage", "inference": "defaults.inferenceImage"}[name]
    return ["--set", f"{key}.repository={repository}", "--set", f"{key}.tag={tag}"]


def install_chart(bed: Testbed, images: dict[str, str]) -> None:
    """`helm upgrade --install` of the chart: the operator runs in its pods on real-0, from its image."""
    env = bed.env_vars()
    helm_home = bed.root / "helm"
    helm_env = {**os.environ, "HELM_CACHE_HOME": str(helm_home / "cache"), "HELM_CONFIG_HOME": str(helm_home / "config"),
                "HELM_DATA_HOME": str(helm_home / "data")}
    values = [arg for name, ref in images.items() for arg in image_values(name, ref)]
    values += ["--set", f"defaults.storage.endpoint={env['AWS_ENDPOINT_URL'].removeprefix('http://')}",
               "--set", f"defaults.storage.bucket={BUCKET}", "--set", f"defaults.storage.credentialsSecret={SECRET}"]
    result = subprocess.run([str(bed.bin_dir / "helm"), "--kubeconfig", str(bed.kubeconfig), "upgrade", "--install", RELEASE,
                             str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace", *values, "--wait", "--timeout", "300s"],
                            env=helm_env, capture_output=True, text=True, timeout=360)
    if result.returncode != 0:
        raise SystemExit(f"[demo] helm install failed: {result.stderr.strip()} (pod logs in {bed.logs})")


def upload_subject(bed: Testbed, prefix: str) -> str:
    from minio import Minio

    env = bed.env_vars()
    client = Minio(env["AWS_ENDPOINT_URL"].removeprefix("http://"), env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], secure=False)
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    for photo in sorted(SUBJECT.glob("*.png")):
        client.fput_object(BUCKET, f"{prefix}/{photo.name}", str(photo))
    return f"s3://{BUCKET}/{prefix}"


def apply(bed: Testbed, manifest: dict[str, Any]) -> None:
    bed.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest))


def condition(job: dict[str, Any], kind: str) -> str | None:
    found = [c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] == kind]
    return found[0]["status"] if found else None


def follow(bed: Testbed, name: str, timeout: float = 1200) -> dict[str, Any]:
    """Print `kubectl get dbj` whenever its row changes, until Succeeded and ServingReady."""
    deadline = time.monotonic() + timeout
    last_row = ""
    print(bed.kubectl("get", "dbj", name, "-n", NAMESPACE).stdout.splitlines()[0], flush=True)
    while time.monotonic() < deadline:
        row = bed.kubectl("get", "dbj", name, "-n", NAMESPACE, "--no-headers").stdout.strip()
        if row.rsplit(None, 1)[0] != last_row:  # the AGE column alone changing is no news
            print(row, flush=True)
            last_row = row.rsplit(None, 1)[0]
        job = json.loads(bed.kubectl("get", "dbj", name, "-n", NAMESPACE, "-o", "json").stdout)
        phase = (job.get("status") or {}).get("phase")
        if phase == "Failed":
            raise SystemExit(f"[demo] the job failed: {json.dumps(job['status'], indent=1)}")
        if phase == "Succeeded" and condition(job, "ServingReady") == "True":
            return job
        time.sleep(1)
    raise SystemExit(f"[demo] the job did not finish in {timeout:.0f} s")


def fetch_image(bed: Testbed, prompt: str, target: Path) -> None:
    """One PNG from the job's endpoint; guidance and size are left to the served family's defaults."""
    pods = json.loads(bed.kubectl("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=inference", "-o", "json").stdout)["items"]
    ip = next(p["status"]["podIP"] for p in pods if p["status"].get("phase") == "Running")
    body = json.dumps({"prompt": prompt, "steps": 10, "seed": 1}).encode()
    request = urllib.request.Request(f"http://{ip}:8080/v1/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        target.write_bytes(response.read())
    say(f'POST http://{ip}:8080/v1/generate {{"prompt": "{prompt}"}} -> {target}')


def read_output(bed: Testbed, output_uri: str, key: str) -> bytes:
    from minio import Minio

    env = bed.env_vars()
    client = Minio(env["AWS_ENDPOINT_URL"].removeprefix("http://"), env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], secure=False)
    bucket, _, prefix = output_uri.removeprefix("s3://").partition("/")
    response = client.get_object(bucket, f"{prefix}/{key}")
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def before_after(bed: Testbed, output_uri: str, target: Path) -> tuple[dict[str, float], dict[str, float]]:
    """before-after.png from the trainer's fidelity grids; the figures before and after."""
    import io

    from PIL import Image, ImageDraw

    try:
        grids = [Image.open(io.BytesIO(read_output(bed, output_uri, f"samples/fidelity-{label}.png"))).convert("RGB")
                 for label in ("step-00000000", "final")]
    except Exception as error:  # the fidelity grids are optional output (validation.fidelity)
        say(f"no before/after grids ({type(error).__name__}); skipping {target.name}")
        return {}, {}
    scale, margin = 4, 16
    width, height = grids[0].width * scale, grids[0].height * scale
    canvas = Image.new("RGB", (2 * width + 3 * margin, height + 2 * margin), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (grid, label) in enumerate(zip(grids, ("before training", "after training"))):
        left = margin + column * (width + margin)
        canvas.paste(grid.resize((width, height), Image.NEAREST), (left, margin))
        draw.text((left, 2), f"{label}: instance prompt (top), class prompt (bottom)", fill="black")
    canvas.save(target)
    lines = [json.loads(line) for line in read_output(bed, output_uri, "metrics.jsonl").decode().splitlines()]
    figures = [{k: v for k, v in line.items() if k.startswith("fidelity/")} for line in lines]
    figures = [f for f in figures if f]
    return figures[0], figures[-1]


def disk_use(path: Path) -> str:
    """What `du` says a folder holds, in GB."""
    result = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return f"{int(result.stdout.split()[0]) / 1e9:.1f} GB" if result.returncode == 0 and result.stdout else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output", type=Path)
    parser.add_argument("--root", default=REPO / ".testbed", type=Path)
    parser.add_argument("--family", default="tiny", choices=FAMILIES, help="tiny: the SD1 example; sdxl/sd3/flux: that family's tiny model, LoRA")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    say("building the images (make images: a no-op when nothing changed) ...")
    images = built_images()
    for name, ref in images.items():
        say(f"  {name:<9} {ref}")
    bed = start_testbed(args.root.resolve())
    started_import = time.monotonic()
    images = dict(zip(images, bed.load_images(list(images.values()))))  # the refs real-0's containerd knows
    say(f"images runnable on real-0 ({time.monotonic() - started_import:.0f} s; imported once per content)")
    install_chart(bed, images)
    bed.kubectl("apply", "-f", str(REPO / "crds" / "dreambooth.dev_dreamboothjobs.yaml"))  # helm never upgrades CRDs
    operator_pod = json.loads(bed.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/component=operator",
                                          "-o", "json").stdout)["items"][0]["metadata"]["name"]
    say(f"chart installed: the operator runs in pod {OPERATOR_NAMESPACE}/{operator_pod} on real-0 ({images['operator']})")
    bed.kubectl("create", "namespace", NAMESPACE, check=False)
    bed.kubectl("delete", "dbj", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=120s", check=False)
    env = bed.env_vars()
    apply(bed, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
                "stringData": {"AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"]}})
    manifest = family_job(yaml.safe_load(EXAMPLE.read_text()), args.family)
    name = manifest["metadata"]["name"]
    instance = upload_subject(bed, f"subjects/{name}")
    say(f"subject photos uploaded to {instance}")
    manifest["spec"]["storage"]["endpoint"] = env["AWS_ENDPOINT_URL"].removeprefix("http://")
    manifest["spec"]["data"]["instanceUri"] = instance
    # The images come from the installation (the chart's defaults: the images just built).
    del manifest["spec"]["resources"]["image"], manifest["spec"]["serving"]["image"]
    for section, values in learning_for(args.family).items():
        manifest["spec"][section].update(values)
    apply(bed, manifest)
    say(f"applied {EXAMPLE.relative_to(REPO)} as {name}, model {manifest['spec']['model']['source']} (namespace {NAMESPACE}); following `kubectl get dbj {name}`:")
    job = follow(bed, name)
    status = job["status"]
    for prompt, file in (("a photo of sks dog", "subject.png"), ("a photo of sks dog on the moon", "subject-on-the-moon.png")):
        fetch_image(bed, prompt, out / file)
    before, after = before_after(bed, status["outputUri"], out / "before-after.png")
    chosen = json.loads(read_output(bed, status["outputUri"], "fidelity.json"))
    (out / "report.html").write_bytes(read_output(bed, status["outputUri"], "report.html"))
    best = chosen.get("best") or {}
    print(f"""
[demo] done in {time.monotonic() - started:.0f} s: {name} {status['phase']}, {status['progress']['step']}/{status['progress']['totalSteps']} steps, restarts {status.get('restarts', 0)}
  images:        {out / 'subject.png'}, {out / 'subject-on-the-moon.png'}
  learned:       {out / 'before-after.png'}
  fidelity:      distance of the instance prompt's images to the nearest photo {before.get('fidelity/instance_distance', 0):.3f} -> {after.get('fidelity/instance_distance', 0):.3f}
                 (class prompt's, kept generic by prior preservation: {before.get('fidelity/class_distance', 0):.3f} -> {after.get('fidelity/class_distance', 0):.3f})
  model:         {status.get('outputUri')}/final   (checkpoints: {status.get('latestCheckpoint')})
  best:          step {best.get('step')} by {chosen.get('select')}; served: {chosen.get('exports', {}).get('served')}
  report:        {out / 'report.html'}   (also {status.get('outputUri')}/report.html)
  endpoint:      {status.get('endpoint')}
  by hand:       source {bed.env_file}; kubectl get dbj -n {NAMESPACE}; kubectl describe dbj {name} -n {NAMESPACE}
  containers:    {', '.join(images.values())} (make images; run by real-0's kubelet on containerd)
  operator:      helm release {RELEASE} in {OPERATOR_NAMESPACE}; kubectl logs -n {OPERATOR_NAMESPACE} {operator_pod}
  logs:          kubectl logs; {bed.logs}/ (containerd, kubelet, kube-proxy, coredns, the control plane)
  disk:          {bed.root} {disk_use(bed.root)}; real-0's containerd {bed.real_node().containerd_root} {disk_use(bed.real_node().containerd_root)} (images unpacked once, kept across restarts)
  tear down:     make testbed-down   (stops the cluster, MinIO and every container)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
