"""The Python SDK: `Client()` for a cluster, `Job` for one DreamboothJob.

    from dreambooth_client import Client

    client = Client()                                  # kubeconfig, or the pod's own account
    job = client.submit("photos/", token="sks", class_name="dog")
    for status in job.progress():                      # one JobStatus per change
        print(status.phase, status.progress)
    job.wait(timeout=3600)                             # until it serves (JobFailed if it fails)
    job.generate("a photo of sks dog on the moon").save("moon.png")
    job.delete()

Every check `dreambooth submit` makes happens here (the CLI is a face over this module).
"""
from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreambooth_api.v1alpha1.labels import (
    COMPLETION_INDEX_ANNOTATION, LABEL_COMPONENT, LABEL_GANG, LABEL_JOB, SERVER_CONTAINER, TRAINER_CONTAINER,
)
from dreambooth_serving.settings import TOKEN_ENV

from .defaults import StorageFlags, StorageSettings, find_defaults_configmap, resolve_storage, settings_from_configmap
from .endpoint import Endpoint, Forwarder, service_ref
from .errors import AccessDenied, ClientError, EndpointError, JobFailed, LaunchInterrupted, NotFound
from .kube import KubeApi
from .manifest import DEFAULT_MODEL, PHOTOS_ANNOTATION, SubmitOptions, build_manifest, job_name, upload_prefix
from .photos import Photo, check_photos
from .status import JobStatus, Until, change_key, job_status, progress_from_record, with_fresher_progress
from .storage import JobStorage, credentials_from_secret, local_path, minio_client

if TYPE_CHECKING:
    from PIL.Image import Image

POLL_SECONDS = 1.0
CREATE_SETTLE_SECONDS = 1.0
CLIENT_ENDPOINT_ENV = "DREAMBOOTH_STORAGE_CLIENT_ENDPOINT"


@dataclass
class Submission:
    """A job ready to go: checked photos, where they will go, the validated manifest."""

    manifest: dict[str, Any]
    photos: list[Photo]
    storage: StorageSettings
    photos_uri: str

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.manifest["metadata"]["namespace"]


class Client:
    """A cluster with the DreamBooth operator installed.

    `namespace` defaults to the kubeconfig context's (or the pod's own); `installation_namespace`
    says where the chart published its defaults when they cannot be found by listing; `api` is an
    already loaded `KubeApi` (e.g. one shared by several clients).
    """

    def __init__(self, namespace: str | None = None, *, kubeconfig: str | None = None, context: str | None = None,
                 installation_namespace: str | None = None, api: KubeApi | None = None) -> None:
        self.kube = api or KubeApi(kubeconfig, context)
        self.namespace = namespace or self.kube.default_namespace
        self.installation_namespace = installation_namespace
        self._defaults: dict[str, Any] | None = None
        self._defaults_read = False

    # --- jobs ------------------------------------------------------------------------------

    def job(self, name: str, namespace: str | None = None) -> "Job":
        """A handle on an existing DreamboothJob (NotFound when there is none)."""
        namespace = namespace or self.namespace
        self.kube.get_job(namespace, name)
        return Job(self, name, namespace)

    def jobs(self, namespace: str | None = None, all_namespaces: bool = False) -> list[JobStatus]:
        """Every job's status in the namespace (or all of them), oldest first."""
        bodies = self.kube.list_jobs(None if all_namespaces else namespace or self.namespace)
        return sorted((job_status(body) for body in bodies), key=lambda s: (s.created or "", s.namespace, s.name))

    def submit(self, photos: str | Path, *, token: str, class_name: str, model: str = DEFAULT_MODEL,
               family: str | None = None, prompt: str | None = None, lora: bool = False, steps: int | None = None,
               gpus: int | None = None, nodes: int | None = None, cpu: bool = False, queue: str | None = None,
               name: str | None = None, namespace: str | None = None, prior: bool = True, serve: bool = True,
               resolution: int | None = None, validation_prompts: list[str] | None = None,
               sample_every: int | None = None, overrides: Mapping[str, Any] | list[str] | None = None,
               storage: StorageFlags | None = None) -> "Job":
        """Check the photos, upload them, create the job; returns at once (see `Job.wait`).

        `overrides` sets any spec field by its dotted name (`{"training.learningRate": 1e-6}`).
        Raises ClientError (with a one-line message naming the cause) before anything is created."""
        options = SubmitOptions(
            token=token, class_name=class_name, model=model, family=family, prompt=prompt, lora=lora, steps=steps,
            gpus=gpus, nodes=nodes, cpu=cpu, queue=queue, name=name, prior=prior, serve=serve, resolution=resolution,
            validation_prompts=list(validation_prompts or []), sample_every=sample_every,
            overrides=_override_list(overrides),
        )
        return self.launch(self.prepare(Path(photos), options, namespace, storage or StorageFlags()))

    def prepare(self, photos_dir: Path, options: SubmitOptions, namespace: str | None = None,
                storage_flags: StorageFlags | None = None, check_storage: bool = True) -> Submission:
        """Everything short of creating: photos, storage, name, the manifest and the API server's
        own dry run (admission rules, RBAC). Nothing is written anywhere."""
        namespace = namespace or self.namespace
        photos = check_photos(photos_dir, options.training_resolution())
        settings = self.storage_settings(storage_flags or StorageFlags())
        name = job_name(options)
        if self.kube.find_job(namespace, name) is not None:
            raise ClientError(f"DreamboothJob {namespace}/{name} already exists; pick another --name")
        photos_uri = f"s3://{settings.bucket}/{upload_prefix(namespace, name)}"
        manifest = build_manifest(options, namespace, name, photos_uri, settings.spec())
        try:
            self.kube.create_job(manifest, dry_run=True)
        except NotFound as error:
            raise ClientError(f"the cluster has no DreamboothJob API (is the chart installed?): {error}") from None
        except ClientError as error:
            raise type(error)(f"the API server refuses the job: {error}") from None
        submission = Submission(manifest, photos, settings, photos_uri)
        if check_storage:
            self.storage_for(submission.namespace, settings).check_bucket(settings.bucket)
        return submission

    def launch(self, submission: Submission) -> "Job":
        """Upload the photos and create the job. Photos come down again after a failed or
        interrupted upload and after a create the API server did not make; a job it made keeps
        them, whatever happened to its answer. Ctrl-C raises LaunchInterrupted, which says which."""
        storage = self.storage_for(submission.namespace, submission.storage)
        interrupted = LaunchInterrupted(submission.namespace, submission.name, submission.photos_uri, False)
        try:
            storage.upload_photos(submission.photos_uri, submission.photos)
        except KeyboardInterrupt:
            raise interrupted from None
        try:
            self.kube.create_job(submission.manifest)
        except BaseException as error:
            # A create cut short by Ctrl-C may still be in the API server's hands: look twice.
            interrupted.created = self.was_created(submission, settle_s=CREATE_SETTLE_SECONDS if isinstance(error, KeyboardInterrupt) else 0)
            if interrupted.created is False:
                storage.delete(submission.photos_uri)
            if isinstance(error, KeyboardInterrupt):
                raise interrupted from None
            raise
        return Job(self, submission.name, submission.namespace, storage)

    def was_created(self, submission: Submission, settle_s: float = 0) -> bool | None:
        """Whether this submission's job exists (its photos annotation names this upload's fresh
        prefix, so a job of the same name from elsewhere does not count); None if the API cannot
        tell. With `settle_s`, a job not there yet is looked for once more after that long."""
        for attempt in range(2 if settle_s else 1):
            time.sleep(settle_s if attempt else 0)
            try:
                body = self.kube.find_job(submission.namespace, submission.name)
            except (ClientError, OSError):
                return None
            annotations = ((body or {}).get("metadata") or {}).get("annotations") or {}
            if annotations.get(PHOTOS_ANNOTATION) == submission.photos_uri:
                return True
        return False

    # --- storage ---------------------------------------------------------------------------

    def defaults_configmap(self) -> dict[str, Any] | None:
        if not self._defaults_read:
            self._defaults, _ = find_defaults_configmap(self.kube, self.installation_namespace)
            self._defaults_read = True
        return self._defaults

    def storage_settings(self, flags: StorageFlags) -> StorageSettings:
        if not flags.client_endpoint and os.environ.get(CLIENT_ENDPOINT_ENV):
            flags = replace(flags, client_endpoint=os.environ[CLIENT_ENDPOINT_ENV])
        return resolve_storage(flags, self.kube, self.installation_namespace)

    def storage_for(self, namespace: str, settings: StorageSettings) -> JobStorage:
        """The bucket through the credentials Secret in the job's namespace (the one its pods use)."""
        try:
            data = self.kube.read_secret(namespace, settings.credentials_secret)
        except NotFound:
            raise NotFound(f"storage credentials: Secret {namespace}/{settings.credentials_secret} not found; create it "
                           f"(kubectl -n {namespace} create secret generic {settings.credentials_secret} "
                           "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...)") from None
        credentials = credentials_from_secret(data, f"{namespace}/{settings.credentials_secret}")
        client = minio_client(settings.upload_endpoint, settings.upload_secure, credentials, settings.region)
        return JobStorage(client, settings.upload_endpoint)

    def job_storage_settings(self, body: dict[str, Any]) -> StorageSettings:
        """A job's own storage (spec.storage, else what the installation filled in), as reached from here."""
        spec = (body.get("spec") or {}).get("storage") or {}
        defaults = self.defaults_configmap()
        installed = settings_from_configmap(defaults) if defaults else None
        endpoint = spec.get("endpoint") or (installed.endpoint if installed else None)
        bucket = spec.get("bucket") or (installed.bucket if installed else None)
        if not endpoint or not bucket:
            raise ClientError(f"job {body['metadata']['name']} names no storage and the installation has no defaults")
        same_store = installed is not None and installed.endpoint == endpoint
        return StorageSettings(
            endpoint=endpoint, bucket=bucket,
            credentials_secret=((spec.get("credentialsSecretRef") or {}).get("name")
                                or (installed.credentials_secret if installed else "dreambooth-s3")),
            secure=bool(spec.get("secure", installed.secure if same_store and installed else False)),
            client_endpoint=os.environ.get(CLIENT_ENDPOINT_ENV) or (installed.client_endpoint if same_store and installed else ""),
            client_secure=installed.client_secure if same_store and installed else None,
            region=spec.get("region"),
        )


def _override_list(overrides: Mapping[str, Any] | list[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, list):
        return list(overrides)
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


class Job:
    """One DreamboothJob: its status, progress, samples, endpoint, logs and outputs."""

    def __init__(self, client: Client, name: str, namespace: str, storage: JobStorage | None = None) -> None:
        self.client = client
        self.name = name
        self.namespace = namespace
        self._storage = storage

    def __repr__(self) -> str:
        return f"Job({self.namespace}/{self.name})"

    # --- status ----------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        return self.client.kube.get_job(self.namespace, self.name)

    @property
    def status(self) -> JobStatus:
        """A fresh reading (training progress from rank 0's own record when that is newer)."""
        return self.refresh()

    def refresh(self) -> JobStatus:
        body = self.body()
        status = job_status(body)
        if status.output_uri and status.phase in ("Running", "Restarting"):
            record = self.storage(body).read_json(status.output_uri, "progress.json")
            status = with_fresher_progress(status, progress_from_record(record))
        return status

    def watch(self, poll: float = POLL_SECONDS, until: Until = "serving") -> Iterator[JobStatus]:
        """A reading every `poll` seconds until `until` is reached (or the job failed)."""
        while True:
            status = self.refresh()
            yield status
            if status.reached(until):
                return
            time.sleep(poll)

    def progress(self, poll: float = POLL_SECONDS, until: Until = "serving") -> Iterator[JobStatus]:
        """One JobStatus per change (phase, step, restarts, serving), until `until` or failure."""
        last = None
        for status in self.watch(poll, until):
            if change_key(status) != last:
                last = change_key(status)
                yield status

    def wait(self, timeout: float | None = None, until: Until = "serving", poll: float = POLL_SECONDS) -> JobStatus:
        """Block until the job serves (or finished training, with until="finished");
        JobFailed when it fails, TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for status in self.watch(poll, until):
            if status.failed:
                raise JobFailed(f"DreamboothJob {self.namespace}/{self.name} failed: {status.failure}")
            if status.reached(until):
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"DreamboothJob {self.namespace}/{self.name} is {status.phase} after {timeout} s")
        raise AssertionError("watch ended before the goal")

    # --- storage ---------------------------------------------------------------------------

    def storage(self, body: dict[str, Any] | None = None) -> JobStorage:
        if self._storage is None:
            settings = self.client.job_storage_settings(body or self.body())
            self._storage = self.client.storage_for(self.namespace, settings)
        return self._storage

    def sample_names(self) -> list[str]:
        """Validation grids written so far (`step-00000100.png`, ..., `final.png`)."""
        uri = self.status.output_uri
        return [key.removeprefix("samples/") for key in self.storage().list(uri, "samples")] if uri else []

    def samples(self, dest: str | Path | None = None) -> list[Path]:
        """Download the samples not yet in `dest` (default `./<name>/samples`); returns the new files."""
        folder = Path(dest) if dest is not None else Path(self.name) / "samples"
        uri = self.status.output_uri
        if not uri:
            return []
        targets = [(key, local_path(folder, key.removeprefix("samples/"), key)) for key in self.storage().list(uri, "samples")]
        return [self.storage().download(uri, key, path) for key, path in targets if not path.exists()]

    def download(self, dest: str | Path | None = None, everything: bool = False) -> Path:
        """The trained model for local use: `final/` (diffusers layout), or only `final/lora/` for a
        LoRA job unless `everything`. Returns the local folder."""
        status = self.status
        if not status.succeeded or not status.output_uri:
            raise ClientError(f"DreamboothJob {self.namespace}/{self.name} is {status.phase}: nothing to download yet")
        prefix = "final/lora" if status.lora and not everything else "final"
        folder = Path(dest) if dest is not None else Path(self.name) / prefix.replace("/", "-")
        if not self.storage().download_tree(status.output_uri, prefix, folder):
            raise NotFound(f"{status.output_uri}/{prefix} holds nothing")
        return folder

    def fidelity(self) -> dict[str, Any]:
        """fidelity.json: the scores of every checkpoint, the best, where the exports are."""
        uri = self.status.output_uri
        document = self.storage().read_json(uri, "fidelity.json") if uri else None
        if document is None:
            raise NotFound(f"DreamboothJob {self.namespace}/{self.name} has no fidelity.json yet (written at the first scored checkpoint)")
        return document

    def report(self, dest: str | Path | None = None) -> Path:
        """Download report.html (written at the end of training) to `dest` (default ./NAME/report.html)."""
        uri = self.status.output_uri
        if not uri or "report.html" not in self.storage().list(uri, "report.html"):
            raise NotFound(f"DreamboothJob {self.namespace}/{self.name} has no report.html yet (the trainer writes it at the end)")
        return self.storage().download(uri, "report.html", Path(dest) if dest is not None else Path(self.name) / "report.html")

    # --- the endpoint ------------------------------------------------------------------------

    def endpoint(self, with_token: bool = True) -> Endpoint:
        """The job's inference server; `with_token`: with the token it wants (read from its Secret)."""
        status = self.status
        if not status.endpoint:
            raise EndpointError(f"DreamboothJob {self.namespace}/{self.name} has no endpoint "
                                f"({'serving is off' if not status.serving_enabled else status.phase})")
        return Endpoint(self.client.kube, service_ref(status.endpoint), model=status.model_name,
                        token=self.api_token(status) if with_token else None)

    def api_token(self, status: JobStatus | None = None) -> str | None:
        """The token the job's server wants: DREAMBOOTH_API_TOKEN when set, else read from the
        job's serving.auth.tokenSecretRef (None when the server has none)."""
        status = status or self.status
        if os.environ.get(TOKEN_ENV):
            return os.environ[TOKEN_ENV]
        if status.token_secret is None:
            return None
        secret, key = status.token_secret
        try:
            data = self.client.kube.read_secret(self.namespace, secret)
        except (NotFound, AccessDenied) as error:
            raise EndpointError(f"the endpoint wants the token in Secret {self.namespace}/{secret} (key {key}) and it "
                                f"cannot be read ({error}); set {TOKEN_ENV} instead") from None
        if not data.get(key):
            raise EndpointError(f"Secret {self.namespace}/{secret} has no key {key!r} (serving.auth.tokenSecretRef)")
        return data[key]

    def generate_png(self, prompt: str, *, negative_prompt: str = "", steps: int | None = None,
                     guidance_scale: float | None = None, seed: int | None = None, width: int | None = None,
                     height: int | None = None) -> bytes:
        """One PNG drawn by the job's endpoint (through the API server when outside the cluster)."""
        png, _ = self.endpoint().generate(prompt, negative_prompt=negative_prompt or None, steps=steps,
                                          guidance_scale=guidance_scale, seed=seed, width=width, height=height)
        return png

    def generate(self, prompt: str, **params: Any) -> "Image":
        """Like `generate_png`, as a PIL image (shows itself in a notebook; `.save(path)` writes it)."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.generate_png(prompt, **params)))
        image.load()
        return image

    def port_forward(self, port: int = 0) -> Forwarder:
        """A local `http://127.0.0.1:<port>` for the endpoint (0: any free port); use as a context manager."""
        return Forwarder(self.endpoint(with_token=False), port)  # clients through the port bring their own token

    # --- pods ------------------------------------------------------------------------------

    def pod(self, inference: bool = False, rank: int = 0) -> dict[str, Any]:
        """The newest gang's pod of that rank (or a ready inference pod)."""
        component = "inference" if inference else "trainer"
        pods = self.client.kube.list_pods(self.namespace, f"{LABEL_JOB}={self.name},{LABEL_COMPONENT}={component}")
        if not inference:
            pods = [p for p in pods if (p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION) == str(rank)]
            pods.sort(key=lambda p: int((p["metadata"].get("labels") or {}).get(LABEL_GANG, "0")), reverse=True)
        else:
            pods.sort(key=lambda p: (p.get("status") or {}).get("phase") != "Running")
        if not pods:
            what = "inference pod" if inference else f"trainer pod of rank {rank}"
            raise NotFound(f"DreamboothJob {self.namespace}/{self.name} has no {what} (yet, or any more)")
        return pods[0]

    def stream_logs(self, follow: bool = False, tail: int | None = None, inference: bool = False,
                    rank: int = 0) -> Iterator[bytes]:
        pod = self.pod(inference, rank)
        container = SERVER_CONTAINER if inference else TRAINER_CONTAINER
        return self.client.kube.pod_log(self.namespace, pod["metadata"]["name"], container, tail, follow)

    def logs(self, tail: int | None = None, inference: bool = False, rank: int = 0) -> str:
        """The log of rank 0 of the newest gang (or of the inference server)."""
        return b"".join(self.stream_logs(False, tail, inference, rank)).decode(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        from dreambooth_api.v1alpha1.spec import KIND

        events = self.client.kube.list_events(self.namespace, KIND, self.name)
        return sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    # --- the end -------------------------------------------------------------------------------

    def delete(self, purge: bool = False) -> None:
        """Delete the job (its pods, Services and server go with it). With `purge`, also what it
        left in storage: its outputs and the photos `submit` uploaded."""
        body = self.body()
        if purge:
            storage = self.storage(body)
            uris = [(body.get("status") or {}).get("outputUri"), (body["metadata"].get("annotations") or {}).get(PHOTOS_ANNOTATION)]
            for uri in filter(None, uris):
                storage.delete(uri)
        self.client.kube.delete_job(self.namespace, self.name)
