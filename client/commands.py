"""What `dreambooth submit` and `dreambooth jobs ...` do, over the SDK. Each function prints for a
human and returns the exit code; ClientError (one line, exit 2) is left to the command face."""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .defaults import StorageFlags
from .display import Display, display_for
from .endpoint import OPENAI_PATH, call_lines
from .errors import ClientError, ClusterUnreachable, LaunchInterrupted
from .manifest import SubmitOptions, build_manifest, job_name, upload_prefix
from .photos import check_photos
from .sdk import Client, Job
from .status import JobStatus, format_seconds, progress_text, serving_text

EXIT_INTERRUPTED = 130
DEFAULT_LOCAL_PORT = 8080
SAMPLE_SYNC_SECONDS = 3.0


def echo(text: str = "") -> None:
    print(text, flush=True)


# --- submit ----------------------------------------------------------------------------------


def submit(photos_dir: Path, options: SubmitOptions, *, client: Client | None, namespace: str | None,
           storage_flags: StorageFlags, out: Path | None, dry_run: bool, detach: bool, plain: bool,
           image_prompt: str | None, local_port: int = DEFAULT_LOCAL_PORT) -> int:
    """Photos to a live endpoint: check, upload, create, follow, draw one image, say how to call it."""
    if dry_run:
        echo(yaml.safe_dump(dry_run_manifest(photos_dir, options, client, namespace, storage_flags), sort_keys=False).rstrip())
        return 0
    assert client is not None
    submission = client.prepare(photos_dir, options, namespace, storage_flags)
    try:
        job = client.launch(submission)
    except LaunchInterrupted as interrupted:
        echo(str(interrupted))
        return EXIT_INTERRUPTED
    echo(f"uploaded {len(submission.photos)} photos to {submission.photos_uri}")
    echo(f"dreamboothjob.dreambooth.dev/{job.name} created in namespace {job.namespace}")
    if detach:
        echo(f"follow it with: dreambooth jobs follow {job.name} -n {job.namespace}")
        return 0
    return follow(job, out or Path(job.name), plain=plain, image_prompt=image_prompt or options.prompts()[0],
                  local_port=local_port)


def dry_run_manifest(photos_dir: Path, options: SubmitOptions, client: Client | None, namespace: str | None,
                     storage_flags: StorageFlags) -> dict[str, Any]:
    """The job `submit` would create; needs the cluster only for storage defaults not given as flags."""
    if client is not None:
        return client.prepare(photos_dir, options, namespace, storage_flags, check_storage=False).manifest
    if not (storage_flags.endpoint and storage_flags.bucket):
        raise ClusterUnreachable("--dry-run without a cluster needs --storage-endpoint and --bucket")
    check_photos(photos_dir, options.training_resolution())
    namespace = namespace or "default"
    name = job_name(options)
    from .defaults import resolve_storage

    settings = resolve_storage(storage_flags, None)
    return build_manifest(options, namespace, name, f"s3://{settings.bucket}/{upload_prefix(namespace, name)}", settings.spec())


# --- following a job ---------------------------------------------------------------------------


class SampleSync:
    """Validation samples into a local folder as they appear (at most every few seconds)."""

    def __init__(self, job: Job, folder: Path) -> None:
        self.job, self.folder = job, folder
        self.next_at = 0.0
        self.count = len(list(folder.glob("*.png"))) if folder.exists() else 0
        self.latest: str | None = None

    def sync(self, force: bool = False) -> list[Path]:
        if not force and time.monotonic() < self.next_at:
            return []
        self.next_at = time.monotonic() + SAMPLE_SYNC_SECONDS
        new = self.job.samples(self.folder)
        if new:
            self.count += len(new)
            self.latest = new[-1].name
        return new


def follow(job: Job, out: Path, *, plain: bool = False, image_prompt: str | None = None,
           local_port: int = DEFAULT_LOCAL_PORT) -> int:
    """Show the job until it serves (or fails); Ctrl-C stops following, never the job."""
    samples = SampleSync(job, out / "samples")
    display = display_for(sys.stdout, str(samples.folder), force_plain=plain)
    status: JobStatus | None = None
    try:
        for status in job.watch():
            display.update(status)
            _note_samples(display, samples, samples.sync())
        _note_samples(display, samples, samples.sync(force=True))
    except KeyboardInterrupt:
        display.close()
        echo(f"stopped following; {job.namespace}/{job.name} keeps running. "
             f"Follow again: dreambooth jobs follow {job.name} -n {job.namespace}")
        return EXIT_INTERRUPTED
    display.close()
    assert status is not None
    if status.failed:
        echo(f"error: DreamboothJob {job.namespace}/{job.name} failed: {status.failure}")
        return 1
    echo(f"report: {status.output_uri}/report.html (fetch it: dreambooth jobs report {job.name} -n {job.namespace})")
    if not status.serving_enabled:
        echo(f"trained: {status.output_uri}/final (download it: dreambooth jobs download {job.name} -n {job.namespace})")
        return 0
    return finish(job, status, out, image_prompt, local_port)


def _note_samples(display: Display, samples: SampleSync, new: list[Path]) -> None:
    for path in new:
        display.note(f"sample saved: {path}")
    if new:
        display.samples(samples.count, samples.latest)


def finish(job: Job, status: JobStatus, out: Path, image_prompt: str | None, local_port: int) -> int:
    """Draw one image from the live endpoint, then say how to call it."""
    endpoint = job.endpoint()
    if image_prompt:
        png, seed = endpoint.generate(image_prompt, seed=42)
        path = out / f"{job.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        echo(f"image from the endpoint ({image_prompt!r}, seed {seed}): {path}")
    try:
        openai = OPENAI_PATH in endpoint.paths()
    except ClientError:
        openai = False
    for line in call_lines(status, image_prompt or "a photo of the subject", port=local_port, openai=openai):
        echo(line)
    return 0


# --- jobs verbs ------------------------------------------------------------------------------


def list_jobs(client: Client, namespace: str | None, all_namespaces: bool, output: str) -> int:
    statuses = client.jobs(namespace, all_namespaces)
    if output in ("json", "yaml"):
        bodies = [client.kube.get_job(s.namespace, s.name) for s in statuses]
        echo(json.dumps(bodies, indent=1) if output == "json" else yaml.safe_dump(bodies, sort_keys=False).rstrip())
        return 0
    rows = [["NAMESPACE"] * all_namespaces + ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "RESTARTS", "SERVING", "AGE"]]
    for s in statuses:
        p = s.progress
        rows.append([s.namespace] * all_namespaces + [
            s.name, s.phase, f"{p.step}/{p.total_steps}" if p else "-", f"{p.loss:.4f}" if p and p.loss is not None else "-",
            format_seconds(p.eta_seconds) if p and p.step < p.total_steps else "-", str(s.restarts),
            ("ready" if s.serving_ready else "no") if s.serving_enabled else "off", _age(s.created),
        ])
    if len(rows) == 1:
        echo(f"No DreamboothJobs in {'any namespace' if all_namespaces else f'namespace {namespace or client.namespace}'}.")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _age(created: str | None) -> str:
    if not created:
        return "-"
    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()
    return format_seconds(max(0.0, seconds))


def describe(job: Job, output: str) -> int:
    body = job.body()
    if output in ("json", "yaml"):
        echo(json.dumps(body, indent=1) if output == "json" else yaml.safe_dump(body, sort_keys=False).rstrip())
        return 0
    status = job.refresh()
    spec = body.get("spec") or {}
    echo(f"Name:        {status.name}")
    echo(f"Namespace:   {status.namespace}")
    echo(f"Phase:       {status.phase}{'  (' + status.message + ')' if status.message else ''}")
    echo(f"Model:       {(spec.get('model') or {}).get('source', '-')}{'  (LoRA)' if status.lora else ''}")
    echo(f"Subject:     {(spec.get('data') or {}).get('instancePrompt', '-')}  photos {(spec.get('data') or {}).get('instanceUri', '-')}")
    echo(f"Progress:    {progress_text(status.progress) if status.progress else '-'}")
    echo(f"Restarts:    {status.restarts}")
    echo(f"Output:      {status.output_uri or '-'}")
    echo(f"Serving:     {serving_text(status)}")
    echo("Conditions:")
    for c in status.conditions:
        echo(f"  {c.type:<14} {c.status:<6} {c.reason:<24} {c.message}")
    events = job.events()
    echo("Events:" if events else "Events:      none")
    for event in events[-10:]:
        when = event.get("lastTimestamp") or event.get("eventTime") or ""
        echo(f"  {when:<21} {event.get('type', ''):<8} {event.get('reason', ''):<20} {event.get('message', '')}")
    return 0


def logs(job: Job, follow_: bool, tail: int | None, inference: bool, rank: int) -> int:
    try:
        for chunk in job.stream_logs(follow_, tail, inference, rank):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def delete(job: Job, purge: bool) -> int:
    job.delete(purge)
    echo(f"dreamboothjob.dreambooth.dev/{job.name} deleted{' (outputs and uploaded photos purged)' if purge else ''}")
    return 0


def samples(job: Job, out: Path | None) -> int:
    folder = out or Path(job.name) / "samples"
    new = job.samples(folder)
    for path in new:
        echo(str(path))
    echo(f"{len(new)} new sample{'s' if len(new) != 1 else ''} in {folder}")
    return 0


CHECKPOINT_COLUMNS = (("fidelity/dino", "DINO"), ("fidelity/clip_i", "CLIP-I"), ("fidelity/clip_t", "CLIP-T"),
                      ("fidelity/instance_distance", "PIXEL"), ("fidelity/prior_similarity", "PRIOR-SIM"))


def checkpoint_rows(document: dict[str, Any]) -> list[str]:
    """fidelity.json as a table: one row per scored step, the best and the pruned marked."""
    best = (document.get("best") or {}).get("step")
    lines = ["STEP      " + "".join(f"{title:>11}" for _, title in CHECKPOINT_COLUMNS) + "  NOTE"]
    for row in document.get("steps", []):
        cells = "".join(f"{row[key]:>11.4f}" if isinstance(row.get(key), (int, float)) else f"{'-':>11}" for key, _ in CHECKPOINT_COLUMNS)
        notes = ["best" if row["step"] == best else "", "base model" if row["step"] == 0 else "",
                 "pruned" if row["step"] and row.get("kept") is False else ""]
        lines.append(f"{row['step']:<10}{cells}  {' '.join(n for n in notes if n)}".rstrip())
    lines.append(f"select: {document.get('select')}; served: {(document.get('exports') or {}).get('served', 'final')}")
    lines += [f"{kind}: {b['name']}@{b['revision']} (scale {b['scale']:g})" for kind, b in (document.get("backbones") or {}).items()]
    return lines


def checkpoints(job: Job) -> int:
    for line in checkpoint_rows(job.fidelity()):
        echo(line)
    return 0


def report(job: Job, out: Path | None) -> int:
    echo(str(job.report(out)))
    return 0


def download(job: Job, out: Path | None, everything: bool) -> int:
    folder = job.download(out, everything)
    echo(f"downloaded to {folder}")
    return 0


def generate(job: Job, prompt: str, out: Path, seed: int | None, steps: int | None) -> int:
    png, used = job.endpoint().generate(prompt, seed=seed, steps=steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    echo(f"{out} (seed {used})")
    return 0


def port_forward(job: Job, port: int) -> int:
    """Hold a local port open to the endpoint until Ctrl-C."""
    try:
        forwarder = job.port_forward(port).start()
    except OSError as error:
        raise ClientError(f"cannot listen on 127.0.0.1:{port} ({error.strerror})") from None
    echo(f"Forwarding {forwarder.url} -> {forwarder.endpoint.service.url} (through the Kubernetes API server); Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        forwarder.close()
    return 0
