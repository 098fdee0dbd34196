"""`dreambooth submit` and `dreambooth jobs ...`: the cluster commands, shared with the kubectl
plugin (`kubectl dreambooth ...`). Only typer is imported here; each command imports
dreambooth_client (and with it the Kubernetes client) when it runs, never before.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer

if TYPE_CHECKING:
    from dreambooth_client import Client, Job

EXIT_BAD_INPUT = 2

Namespace = Annotated[Optional[str], typer.Option("--namespace", "-n", help="Namespace (default: the kubeconfig context's).")]
Kubeconfig = Annotated[Optional[str], typer.Option(help="Path of the kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).")]
Context = Annotated[Optional[str], typer.Option(help="kubeconfig context to use.")]
Name = Annotated[str, typer.Argument(help="Name of the DreamboothJob.")]
LocalPort = Annotated[int, typer.Option(min=1, max=65535, help="Local port in the printed port-forward and curl lines.")]


@contextmanager
def client_errors() -> Iterator[None]:
    """ClientError -> 'error: <one line per cause>' on stderr and its exit code, never a traceback."""
    from dreambooth_client.errors import ClientError

    try:
        yield
    except ClientError as error:
        for line in str(error).splitlines() or ["failed"]:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(error.exit_code) from None


def make_client(namespace: str | None, kubeconfig: str | None, context: str | None,
                installation_namespace: str | None = None) -> "Client":
    from dreambooth_client import Client

    return Client(namespace, kubeconfig=kubeconfig, context=context, installation_namespace=installation_namespace)


def open_job(name: str, namespace: str | None, kubeconfig: str | None, context: str | None) -> "Job":
    return make_client(namespace, kubeconfig, context).job(name)


def submit(
    photos: Annotated[Path, typer.Argument(help="Folder with 3-20 photos of the subject (jpg, png, webp, bmp).")],
    token: Annotated[str, typer.Option(help="Rare word that will name the subject, e.g. sks.")],
    class_name: Annotated[str, typer.Option("--class", help="What the subject is, e.g. dog (prior preservation draws this class).")],
    model: Annotated[Optional[str], typer.Option(help="Base model: hf://org/name[@rev], s3://bucket/prefix, or tiny (built-in, for trying things out).")] = None,
    family: Annotated[Optional[str], typer.Option(help="Model family (spec model.family), when the model does not say.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Instance prompt (must contain the token); default 'a photo of TOKEN CLASS'.")] = None,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters instead of the full UNet.")] = False,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps (default: the spec's, 400).")] = None,
    gpus: Annotated[Optional[int], typer.Option(min=1, help="GPUs per node.")] = None,
    nodes: Annotated[Optional[int], typer.Option(min=1, help="Nodes (pods) in the training gang.")] = None,
    cpu: Annotated[bool, typer.Option(help="Train and serve on CPUs (no GPU asked; for tiny models).")] = False,
    prior: Annotated[bool, typer.Option(help="Prior preservation with generated class images.")] = True,
    serve: Annotated[bool, typer.Option(help="Serve the model when training succeeds.")] = True,
    resolution: Annotated[Optional[int], typer.Option(min=8, help="Training resolution (default: the model's).")] = None,
    sample_every: Annotated[Optional[int], typer.Option(min=0, help="Validation samples every N steps (default: 4 per run; 0: only at the end).")] = None,
    validation_prompt: Annotated[Optional[list[str]], typer.Option(help="Prompt for validation samples and the final image (repeatable).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Job name (default: TOKEN-CLASS-xxxxx).")] = None,
    namespace: Namespace = None,
    queue: Annotated[Optional[str], typer.Option(help="Kueue LocalQueue to run in (label kueue.x-k8s.io/queue-name).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any spec field: dotted.key=value (repeatable), e.g. training.learningRate=1e-6.")] = None,
    storage_endpoint: Annotated[Optional[str], typer.Option(help="S3/MinIO host:port the pods use (default: the installation's).")] = None,
    bucket: Annotated[Optional[str], typer.Option(help="Bucket (default: the installation's).")] = None,
    credentials_secret: Annotated[Optional[str], typer.Option(help="Secret in the namespace with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default: the installation's).")] = None,
    upload_endpoint: Annotated[Optional[str], typer.Option(help="host:port at which THIS machine reaches the same storage, when the pods' address is in-cluster only.")] = None,
    installation_namespace: Annotated[Optional[str], typer.Option(help="Namespace of the operator's Helm release (where its defaults are published).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Local folder for samples and the final image (default: ./NAME).")] = None,
    image_prompt: Annotated[Optional[str], typer.Option(help="Prompt of the image drawn by the endpoint at the end (default: the first validation prompt).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the DreamboothJob YAML; upload and create nothing.")] = False,
    detach: Annotated[bool, typer.Option(help="Create the job and return; do not follow it.")] = False,
    plain: Annotated[bool, typer.Option(help="One plain line per change even on a terminal.")] = False,
    local_port: LocalPort = 8080,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Photos to a live endpoint: check, upload, create a DreamboothJob, follow it, draw an image."""
    from dreambooth_client import commands
    from dreambooth_client.defaults import StorageFlags
    from dreambooth_client.errors import ClusterUnreachable
    from dreambooth_client.manifest import DEFAULT_MODEL, SubmitOptions

    with client_errors():
        options = SubmitOptions(
            token=token, class_name=class_name, model=model or DEFAULT_MODEL, family=family, prompt=prompt,
            validation_prompts=list(validation_prompt or []), prior=prior, lora=lora, steps=steps,
            resolution=resolution, gpus=gpus, nodes=nodes, cpu=cpu, queue=queue, name=name, serve=serve,
            sample_every=sample_every, overrides=list(set_ or []),
        )
        flags = StorageFlags(endpoint=storage_endpoint, bucket=bucket, credentials_secret=credentials_secret,
                             client_endpoint=upload_endpoint)
        try:
            client = make_client(namespace, kubeconfig, context, installation_namespace)
        except ClusterUnreachable:
            if not (dry_run and storage_endpoint and bucket):
                raise
            client = None
        code = commands.submit(photos, options, client=client, namespace=namespace, storage_flags=flags, out=out,
                               dry_run=dry_run, detach=detach, plain=plain, image_prompt=image_prompt,
                               local_port=local_port)
    raise typer.Exit(code)


jobs_app = typer.Typer(no_args_is_help=True, help="The everyday verbs for DreamboothJobs.")


@jobs_app.command("list")
def list_(
    namespace: Namespace = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Jobs of every namespace.")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="table, json or yaml.")] = "table",
    kubeconfig: Kubeconfig = None, context: Context = None,
) -> None:
    """Jobs with phase, progress, loss, ETA, restarts, serving and age."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.list_jobs(make_client(namespace, kubeconfig, context), namespace, all_namespaces, output)
    raise typer.Exit(code)


@jobs_app.command()
def describe(name: Name, namespace: Namespace = None,
             output: Annotated[str, typer.Option("--output", "-o", help="text, json or yaml.")] = "text",
             kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Phase, progress, conditions, endpoint and recent events of one job."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.describe(open_job(name, namespace, kubeconfig, context), output)
    raise typer.Exit(code)


@jobs_app.command()
def logs(name: Name, namespace: Namespace = None,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming.")] = False,
         tail: Annotated[Optional[int], typer.Option(min=1, help="Only the last N lines.")] = None,
         rank: Annotated[int, typer.Option(min=0, help="Trainer pod (node rank) of the newest gang.")] = 0,
         inference: Annotated[bool, typer.Option(help="The inference server's log instead.")] = False,
         kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """The log of the rank-0 trainer pod (or the inference server)."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.logs(open_job(name, namespace, kubeconfig, context), follow, tail, inference, rank)
    raise typer.Exit(code)


@jobs_app.command()
def delete(name: Name, namespace: Namespace = None,
           purge: Annotated[bool, typer.Option(help="Also delete its outputs and uploaded photos from storage.")] = False,
           kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Delete a job (its pods, Services and server go with it)."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.delete(open_job(name, namespace, kubeconfig, context), purge)
    raise typer.Exit(code)


@jobs_app.command()
def samples(name: Name, namespace: Namespace = None,
            out: Annotated[Optional[Path], typer.Option(help="Folder (default ./NAME/samples).")] = None,
            kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Download the validation samples not yet downloaded."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.samples(open_job(name, namespace, kubeconfig, context), out)
    raise typer.Exit(code)


@jobs_app.command()
def checkpoints(name: Name, namespace: Namespace = None, kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Every scored checkpoint with its fidelity scores (DINO, CLIP-I, CLIP-T, pixel, prior), the best marked."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.checkpoints(open_job(name, namespace, kubeconfig, context))
    raise typer.Exit(code)


@jobs_app.command()
def report(name: Name, namespace: Namespace = None,
           out: Annotated[Optional[Path], typer.Option(help="File (default ./NAME/report.html).")] = None,
           kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Download the run's report.html (photos, curves, scores, the prompt grid per checkpoint) and print its path."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.report(open_job(name, namespace, kubeconfig, context), out)
    raise typer.Exit(code)


@jobs_app.command()
def download(name: Name, namespace: Namespace = None,
             out: Annotated[Optional[Path], typer.Option(help="Folder (default ./NAME/final or ./NAME/final-lora).")] = None,
             everything: Annotated[bool, typer.Option("--all", help="For a LoRA job, the whole final/ pipeline too.")] = False,
             kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Download the trained model: final/ (diffusers layout), or the LoRA weights of a LoRA job."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.download(open_job(name, namespace, kubeconfig, context), out, everything)
    raise typer.Exit(code)


@jobs_app.command()
def follow(name: Name, namespace: Namespace = None,
           out: Annotated[Optional[Path], typer.Option(help="Folder for samples and the final image (default ./NAME).")] = None,
           plain: Annotated[bool, typer.Option(help="One plain line per change even on a terminal.")] = False,
           image_prompt: Annotated[Optional[str], typer.Option(help="Draw one image from the endpoint at the end.")] = None,
           local_port: LocalPort = 8080,
           kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Follow a job (again) until it serves: progress, samples, the endpoint."""
    from dreambooth_client import commands

    with client_errors():
        job = open_job(name, namespace, kubeconfig, context)
        code = commands.follow(job, out or Path(job.name), plain=plain, image_prompt=image_prompt, local_port=local_port)
    raise typer.Exit(code)


@jobs_app.command()
def generate(name: Name,
             prompt: Annotated[str, typer.Argument(help="What to draw (name the subject with its token).")],
             namespace: Namespace = None,
             out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("out.png"),
             seed: Annotated[Optional[int], typer.Option(min=0)] = None,
             steps: Annotated[Optional[int], typer.Option(min=1, max=150)] = None,
             kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Draw one image with the job's endpoint (through the API server from outside the cluster)."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.generate(open_job(name, namespace, kubeconfig, context), prompt, out, seed, steps)
    raise typer.Exit(code)


@jobs_app.command("port-forward")
def port_forward(name: Name, namespace: Namespace = None,
                 port: Annotated[int, typer.Option(min=0, max=65535, help="Local port (0: any free one).")] = 8080,
                 kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """A local port for the job's endpoint (curl, the OpenAI SDK, the web page) until Ctrl-C."""
    from dreambooth_client import commands

    with client_errors():
        code = commands.port_forward(open_job(name, namespace, kubeconfig, context), port)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `submit` and the `jobs` group to a command tree (the `dreambooth` one, the plugin's)."""
    app.command()(submit)
    app.add_typer(jobs_app, name="jobs")


plugin = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="kubectl dreambooth: submit and manage DreamboothJobs (the same as `dreambooth submit|jobs`).")
register(plugin)


def kubectl_plugin() -> None:
    """`kubectl-dreambooth` on the PATH makes `kubectl dreambooth ...` (kubectl's plugin convention)."""
    plugin(prog_name="kubectl dreambooth")
