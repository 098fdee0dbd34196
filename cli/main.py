"""The `dreambooth` command, above every room it dispatches to: train, generate, serve, crd, and
(from cli/cluster.py) submit and jobs, which go to the client.

Each command imports its room (trainer, serving, spec) lazily, so `--help` and `crd` stay fast
and `dreambooth train` in a pod loads only the trainer. Nothing imports this module.
Exit codes: 0 done; 2 bad config or input (do not retry); 143 stopped by SIGTERM after a
checkpoint (retry resumes); anything else is a failure worth a retry.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cluster import register as register_cluster_commands

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is first imported

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DreamBooth fine-tuning for Stable Diffusion.")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """Errors a user can act on become one line and an exit code, never a traceback."""
    from dreambooth_trainer.errors import UserInputError
    from dreambooth_trainer.storage import StorageError

    try:
        yield
    except UserInputError as error:
        fail(str(error))
    except StorageError as error:
        fail(str(error), EXIT_FAILED)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training config YAML.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: dotted.key=value (repeatable).")] = None,
) -> None:
    """Fine-tune a model on a subject; resumes from `latest` in output.uri when present."""
    from dreambooth_trainer.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as error:
        fail(str(error))
    from dreambooth_trainer.train import run_training

    with user_errors():
        code = run_training(cfg)
    raise typer.Exit(code)


@app.command()
def export(
    config: Annotated[Path, typer.Argument(help="The finished run's training config YAML.")],
    checkpoint: Annotated[str, typer.Option(help="best or step-N: what serving.checkpoint names.")],
) -> None:
    """Export a finished run's kept checkpoint for serving (exports/step-N/ or exports/best/, laid out as final/)."""
    import re

    from dreambooth_trainer.config import ConfigError, load_config

    if not re.fullmatch(r"best|step-[0-9]{1,9}", checkpoint):
        fail(f"--checkpoint {checkpoint!r}: expected best or step-N")
    try:
        cfg = load_config(config, [])
    except ConfigError as error:
        fail(str(error))
    from dreambooth_trainer.models import quiet_libraries
    from dreambooth_trainer.reexport import export_for_serving

    quiet_libraries()
    with user_errors():
        typer.echo(export_for_serving(cfg, checkpoint))


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Model URI: a final/ folder (local or s3://), tiny, or hf://org/name.")],
    prompt: Annotated[str, typer.Option(help="What to draw.")],
    out: Annotated[Path, typer.Option(help="Output PNG; with --num-images N, files OUT-0.png ... OUT-(N-1).png.")],
    negative_prompt: Annotated[str, typer.Option(help="What to avoid.")] = "",
    steps: Annotated[int, typer.Option(min=1, max=1000)] = 25,
    guidance_scale: Annotated[float, typer.Option(min=0.0)] = 7.5,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    num_images: Annotated[int, typer.Option(min=1, max=64)] = 1,
    width: Annotated[Optional[int], typer.Option(help="Multiple of 8; default the model's size.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Multiple of 8; default the model's size.")] = None,
    lora: Annotated[Optional[str], typer.Option(help="LoRA weights (diffusers safetensors) applied to the model.")] = None,
) -> None:
    """Generate images from a model; the same seed gives the same bytes."""
    from dreambooth_trainer.generate import ImageRequest, generate_images, png_bytes
    from dreambooth_trainer.models import load_pipeline, quiet_libraries

    quiet_libraries()
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % 8):
            fail(f"--{name} must be a positive multiple of 8 (got {value})")
    with user_errors():
        pipeline = load_pipeline(model)
        if lora:
            from dreambooth_trainer.export import apply_lora

            apply_lora(pipeline, lora)
        requests = [ImageRequest(prompt, negative_prompt, seed + index) for index in range(num_images)]
        images = generate_images(pipeline, requests, steps=steps, guidance=guidance_scale, height=height, width=width)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if num_images == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num_images)]
    for path, image in zip(paths, images):
        path.write_bytes(png_bytes(image))
        typer.echo(str(path))


def parse_adapters(specs: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or not name or not uri:
            fail(f"--adapter {spec!r}: expected NAME=URI (a LoRA folder or .safetensors file, local or s3://)")
        pairs.append((name, uri))
    return tuple(pairs)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="final/ folder (local or s3://), tiny, or a base model for --lora/--adapter/--registry.")],
    host: str = "127.0.0.1",
    port: int = 8080,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    max_batch: Annotated[int, typer.Option(min=1)] = 8,
    max_queue: Annotated[int, typer.Option(min=1)] = 64,
    lora: Annotated[Optional[str], typer.Option(help="LoRA weights applied on top of --model (one subject, no switching).")] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the UNet.")] = False,
    model_name: Annotated[Optional[str], typer.Option(help="The `model` name of the base model in requests; default: --model.")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(help="NAME=URI: a LoRA adapter served as model NAME (repeatable).")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="Registry file of adapters (the operator mounts one); re-read when it changes.")] = None,
    max_adapters: Annotated[int, typer.Option(min=1, help="Adapters kept on the device (least recently used out first).")] = 32,
    max_adapter_mib: Annotated[int, typer.Option(min=1, help="MiB of adapter weights kept on the device.")] = 2048,
    max_adapters_per_batch: Annotated[int, typer.Option(min=1, help="Distinct adapters in one UNet batch (1: one adapter per batch).")] = 8,
    tiny_seed: Annotated[int, typer.Option(min=0, help="Seed of the built-in tiny model (its training.seed).")] = 0,
    tiny_resolution: Annotated[int, typer.Option(min=8, help="Image side the tiny model is shaped for.")] = 32,
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="A Host name a server without a token answers besides loopback names and IP addresses (repeatable; also DREAMBOOTH_ALLOWED_HOSTS, comma-separated; * for any).")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="A web origin whose pages may call the APIs (repeatable; also DREAMBOOTH_CORS_ORIGINS); none by default.")] = None,
    request_timeout: Annotated[float, typer.Option(min=1, help="Seconds a request may wait and be drawn; then its work is dropped.")] = 300.0,
    max_pixel_steps: Annotated[int, typer.Option(min=1, help="Most images × width × height × steps one request may ask for.")] = 10 * 1024 * 1024 * 50,
) -> None:
    """Serve over HTTP: the OpenAI Images API, POST /v1/generate, a web page at /, probes and /metrics."""
    from dreambooth_serving.server import run_server
    from dreambooth_serving.settings import ALLOWED_HOSTS_ENV, CORS_ORIGINS_ENV, ServerSettings, api_token_from_env, names_from_env

    settings = ServerSettings(
        model=model, model_name=model_name, device=device, max_batch=max_batch, max_queue=max_queue, lora=lora,
        compile=compile, api_token=api_token_from_env(), tiny_seed=tiny_seed, tiny_resolution=tiny_resolution,
        adapters=parse_adapters(adapter or []), registry=str(registry) if registry else None,
        max_resident_adapters=max_adapters, max_adapter_bytes=max_adapter_mib * 1024**2,
        max_adapters_per_batch=max_adapters_per_batch, listen_host=host,
        allowed_hosts=(*(allowed_host or []), *names_from_env(ALLOWED_HOSTS_ENV)),
        cors_origins=(*(cors_origin or []), *names_from_env(CORS_ORIGINS_ENV)),
        request_timeout_s=request_timeout, max_pixel_steps=max_pixel_steps,
    )
    run_server(settings, port=port)


@app.command()
def plan(job: Annotated[Path, typer.Argument(help="A DreamboothJob manifest (YAML; several documents allowed).")]) -> None:
    """Print the memory plan of a DreamboothJob: what each GPU holds (weights, gradients and optimizer
    state exact; activations an estimate) against resources.gpuMemory."""
    import copy

    import yaml

    from dreambooth_api.v1alpha1.sections import ConfigError
    from dreambooth_api.v1alpha1.spec import KIND, memory_plan, parse_spec

    try:
        documents = [d for d in yaml.safe_load_all(job.read_text()) if isinstance(d, dict) and d.get("kind") == KIND]
    except (OSError, yaml.YAMLError) as error:
        fail(f"{job}: {error}")
    if not documents:
        fail(f"{job} holds no {KIND}")
    for document in documents:
        data = copy.deepcopy(document.get("spec") or {})
        gpu_memory = (data.get("resources") or {}).pop("gpuMemory", None)  # a plan that does not fit is still printed
        try:
            spec = parse_spec(data)
            plan = memory_plan(spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpu_memory": gpu_memory})}))
        except (ConfigError, ValueError) as error:
            fail(f"{job}: {error}")
        typer.echo(f"{document.get('metadata', {}).get('name', job.stem)}: " + plan.table())


@app.command(name="eval")
def eval_(
    model: Annotated[str, typer.Option(help="Model URI: a final/ or exports/ folder (local or s3://), tiny, or hf://org/name.")],
    photos: Annotated[str, typer.Option(help="The subject photos: a folder or s3://bucket/prefix.")],
    class_noun: Annotated[Optional[str], typer.Option(help="The class noun the paper's prompts use (dog, backpack, ...).")] = None,
    token: Annotated[str, typer.Option(help="The identifier the model was trained with.")] = "sks",
    prompts: Annotated[Optional[Path], typer.Option(help="A file of prompts, one a line ({token}, {class}); default the paper's 25.")] = None,
    dino: Annotated[Optional[str], typer.Option(help="DINO backbone: tiny, hf://facebook/dino-vits16, s3:// or a folder.")] = None,
    clip: Annotated[Optional[str], typer.Option(help="CLIP backbone: tiny, hf://openai/clip-vit-base-patch32, s3:// or a folder.")] = None,
    lora: Annotated[Optional[str], typer.Option(help="LoRA weights applied to the model.")] = None,
    steps: Annotated[int, typer.Option(min=1, max=1000)] = 25,
    guidance_scale: Annotated[Optional[float], typer.Option(min=0.0, help="Default: the family's.")] = None,
    images_per_prompt: Annotated[int, typer.Option(min=1, max=16, help="The paper drew 4.")] = 4,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    resolution: Annotated[Optional[int], typer.Option(help="Multiple of 8; default the model's size.")] = None,
) -> None:
    """Score a model's subject fidelity (DINO, CLIP-I, CLIP-T) on a prompt set, printed beside the
    DreamBooth paper's table."""
    from dreambooth_trainer.data import list_images, read_images
    from dreambooth_trainer.evaluate import EvalSettings, evaluate, paper_table
    from dreambooth_trainer.fidelity import load_backbones, prompt_set
    from dreambooth_trainer.models import load_pipeline, quiet_libraries
    from dreambooth_trainer.storage import open_storage

    quiet_libraries()
    if not (dino or clip):
        fail("name a backbone: --dino and/or --clip (tiny for the built-in random ones)")
    with user_errors():
        templates = [line.strip() for line in prompts.read_text().splitlines() if line.strip()] if prompts else []
        prompt_list = prompt_set(templates, token, class_noun, "--prompts")
        storage = open_storage(photos)
        subject = read_images(storage, list_images(storage, "--photos"), "--photos")
        backbones = load_backbones({kind: source for kind, source in (("dino", dino), ("clip", clip)) if source})
        pipeline = load_pipeline(model)
        if lora:
            from dreambooth_trainer.export import apply_lora

            apply_lora(pipeline, lora)
        settings = EvalSettings(steps, guidance_scale, images_per_prompt, seed, resolution)
        scores, real = evaluate(pipeline, backbones, subject, prompt_list, settings)
    typer.echo(f"{len(prompt_list.prompts)} prompts ({prompt_list.source}) x {images_per_prompt} images, {len(subject)} photos, {steps} steps")
    for kind, info in backbones.infos().items():
        typer.echo(f"{kind}: {info['name']}@{info['revision']} (scale {info['scale']:g})")
    typer.echo(paper_table(model, scores, real))


@app.command()
def crd() -> None:
    """Print the DreamboothJob CustomResourceDefinition generated from the API package."""
    typer.echo(crd_yaml(), nl=False)


def crd_yaml() -> str:
    """The committed CRD file's text: `crd_manifest()` of the API package as YAML."""
    import yaml

    from dreambooth_api.v1alpha1.spec import crd_manifest

    header = "# Generated by `dreambooth crd` from dreambooth_api.v1alpha1; do not edit by hand.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


register_cluster_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
