"""One training run, start to finish: read data, ensure class images, fit, checkpoint, export.

`run_training(cfg)` is what `dreambooth train` calls in every pod (one process per rank; with
NPROC_PER_NODE > 1 Lightning re-launches the command for the other local ranks).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import UserInputError

log = logging.getLogger("dreambooth.train")

EXIT_OK = 0
EXIT_SIGTERM = 143
PRECISION = {"no": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


@dataclass(frozen=True)
class Placement:
    """Where this process runs and who it is in the gang."""

    accelerator: str
    devices: int
    num_nodes: int
    rank: int
    world: int
    backend: str
    attempt: int | None = None  # the operator's execution attempt; None for runs outside a cluster


def placement_from_env() -> Placement:
    from .distributed import dist_env_from

    env = dist_env_from()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Placement(
        accelerator="gpu" if cuda else "cpu",
        devices=env.nproc_per_node,
        num_nodes=env.nnodes,
        rank=env.node_rank * env.nproc_per_node + local_rank,
        world=env.world_size,
        backend="nccl" if cuda else "gloo",
        attempt=env.attempt,
    )


def json_logs_wanted(cfg: TrainConfig) -> bool:
    choice = os.environ.get("DREAMBOOTH_LOG_FORMAT") or cfg.output.log_format
    if choice == "auto":
        return not sys.stderr.isatty()
    return choice == "json"


def check_runtime(cfg: TrainConfig) -> None:
    """Refuse, before any work, what this machine cannot run."""
    if cfg.training.optimizer == "adamw_8bit" and not torch.cuda.is_available():
        raise UserInputError("training.optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes); use adamw on CPU")
    if cfg.training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserInputError("training.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    from .quantize import check_quantize_runtime

    check_quantize_runtime(cfg.model.quantize)


def resolved_precision(cfg: TrainConfig) -> str:
    """`auto` -> bf16 on a GPU that supports it, else no (fp32); other values as given."""
    choice = cfg.training.mixed_precision
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def half_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The training's half type on a GPU (frozen modules, class images, samples run in it), else None."""
    if not torch.cuda.is_available():
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved_precision(cfg))


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """Frozen modules run in half precision under mixed precision on a GPU (as diffusers does)."""
    return half_dtype(cfg) or torch.float32


def place_frozen_modules(parts: "object", family: "object", cfg: TrainConfig, device: torch.device) -> None:
    """Each module where and in what type the references keep it: frozen weights (a LoRA's base
    denoiser, frozen or LoRA-trained text encoders) in the training's half type under mixed
    precision, fully trained modules in fp32 (their master copy), the VAE in fp32 where the family
    needs it (SDXL, SD3). LoRA adapters are cast to fp32 when they are added (DreamBoothModule).
    Under FSDP the denoiser stays on the CPU: it reaches the GPU one sharded block at a time."""
    training = cfg.training
    half = frozen_dtype(cfg)
    parts.vae.to(device, torch.float32 if family.vae_in_fp32 else half)
    for index, encoder in enumerate(parts.text_encoders):
        fully_trained = training.train_text_encoder and index in family.trainable_text_encoders and not training.lora.enabled
        encoder.to(device, torch.float32 if fully_trained else half)
    parts.denoiser.to(device if training.strategy == "ddp" else "cpu", half if training.lora.enabled else torch.float32)


def training_precision(cfg: TrainConfig, device_type: str) -> "torch.autocast":
    """Autocast to the training's half type on a GPU; a no-op context in full precision."""
    dtype = half_dtype(cfg)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@torch.no_grad()
def encode_prompt_embeddings(text_encoder: torch.nn.Module, tokenizer: object, prompts: list[str]) -> torch.Tensor:
    """SD's text embeddings alone (the benchmark's baseline loop uses them)."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0].float().cpu()


@torch.no_grad()
def cached_text_conditions(cfg: TrainConfig, family: object, pipeline: object, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Every distinct prompt's text conditions, encoded once by the frozen encoders (kept as fp32)."""
    conds = family.encode_text(pipeline, prompts, device, family.training_text_length(cfg))
    return {name: value.float().cpu() for name, value in conds.items()}


def training_buckets(cfg: TrainConfig, pixel_multiple: int = 8) -> list[tuple[int, int]] | None:
    """The aspect-ratio buckets when data.bucketing is on (`pixel_multiple`: what the model's
    latents need, 8 for SD-like VAEs, 16 for Flux), else None (square crops)."""
    from .buckets import make_buckets

    if not cfg.data.bucketing:
        return None
    return make_buckets(cfg.data.resolution, cfg.data.bucket_step, pixel_multiple)


def with_model_defaults(cfg: TrainConfig, family: "object", pipeline: "object") -> TrainConfig:
    """The config with what only the loaded model tells filled in: data.resolution, when unset, is
    the model's native size."""
    if cfg.data.resolution is not None:
        return cfg
    data = cfg.data.model_copy(update={"resolution": family.native_size(pipeline)})
    return cfg.model_copy(update={"data": data})


def load_base_model(cfg: TrainConfig) -> tuple:
    """(family, pipeline) of the job's base model as loaded (fp32, on the CPU)."""
    from .models import load_model

    return load_model(cfg.model.source, seed=cfg.training.seed, tiny_resolution=cfg.model.tiny_resolution, family=cfg.model.family)


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of the trained weights, equal on every rank when DDP kept them in sync. Two integer
    sums of each tensor's bit patterns are computed where the tensor lives and read back once,
    so it costs milliseconds on a GPU even for SD1.5 (no 3 GB copy to the host)."""
    import hashlib

    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = []
    for _, tensor in sorted(module.state_dict().items()):
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP: this rank's shard
        flat = tensor.detach().reshape(-1)
        values = flat.view(bits[flat.element_size()]).to(torch.int64)
        positions = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
        sums.append(torch.stack([values.sum(), (values * positions).sum()]))
    digest = hashlib.sha256(torch.stack(sums).cpu().numpy().tobytes() if sums else b"")
    return digest.hexdigest()


def static_graph(cfg: TrainConfig) -> bool:
    """DDP's static graph, unless micro-batches accumulate: its first step would then run under
    `no_sync`, which a static graph cannot record (torch's reducer asserts in backward)."""
    return cfg.training.ddp.static_graph and cfg.training.gradient_accumulation_steps == 1


def ddp_strategy(cfg: TrainConfig, place: Placement, trainable_bytes: int) -> object:
    """DDP as the trainer wants it: a static graph, no buffer broadcast per forward, buckets sized
    for the model, optional gradient compression; every rank writes its share of checkpoints."""
    from pytorch_lightning.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    class EveryRankSavesDDPStrategy(DDPStrategy):
        def save_checkpoint(self, checkpoint: dict, filepath: str, storage_options: object = None) -> None:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    ddp = cfg.training.ddp
    hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}.get(ddp.gradient_compression)
    return EveryRankSavesDDPStrategy(
        process_group_backend=place.backend, find_unused_parameters=False, gradient_as_bucket_view=True,
        static_graph=static_graph(cfg), broadcast_buffers=False, bucket_cap_mb=ddp.bucket_cap_mb or bucket_cap_mb_for(trainable_bytes),
        ddp_comm_hook=hook,
    )


def check_strategy(cfg: TrainConfig, place: Placement) -> None:
    if cfg.training.strategy == "fsdp" and place.world < 2:
        raise UserInputError("training.strategy=fsdp shards the model across processes but this run has one; "
                             "use training.strategy=ddp, or run 2 or more processes (NNODES x NPROC_PER_NODE)")


def training_strategy(cfg: TrainConfig, place: Placement, trainable_bytes: int) -> object:
    """FSDP when asked for; else DDP in a gang, Lightning's single-device strategy alone."""
    if cfg.training.strategy == "fsdp":
        from .fsdp import fsdp_strategy

        return fsdp_strategy(cfg, place.world, place.backend)
    return ddp_strategy(cfg, place, trainable_bytes) if place.world > 1 else "auto"


def final_denoiser(cfg: TrainConfig, trainer: object, module: torch.nn.Module, rank: int) -> torch.nn.Module | None:
    """The trained UNet to export: as it is, or under FSDP gathered whole on rank 0 (a collective),
    on the training device for the final validation."""
    if cfg.training.strategy != "fsdp":
        return module.denoiser
    from .fsdp import denoiser_of, gathered_copy

    for optimizer in trainer.optimizers:
        optimizer.state.clear()  # the last checkpoint holds the moments; the whole denoiser needs the room
    plain = gathered_copy(denoiser_of(module), rank)
    return plain.to(module.device) if plain is not None else None


def bucket_cap_mb_for(trainable_bytes: int) -> int:
    """About 16 gradient buckets: few enough all-reduce calls, early enough overlap with backward."""
    return int(min(200, max(25, trainable_bytes / 16 / 2**20)))


def validate_module(validator: object, module: "object", step: int | None, with_samples: bool = True) -> object:
    """Validation of the module as it would be exported: its EMA weights when it keeps an EMA."""
    from .validation import averaged_weights

    with averaged_weights(module):
        return validator(module.denoiser, list(module.text_encoders), step, with_samples=with_samples)


def make_trainer(cfg: TrainConfig, place: Placement, output: "object", json_logs: bool, start_step: int,
                 validator: object | None = None, extra_callbacks: list | None = None, trainable_bytes: int = 0,
                 ledger: "object | None" = None) -> tuple:
    """The Lightning Trainer every run uses (and the benchmark measures): returns it with the
    checkpoint trigger and the progress reporter, whose state the caller reads afterwards.
    `ledger` (rank 0): the fidelity scores per step, which keep the best checkpoint from pruning."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.environments import LightningEnvironment

    from .callbacks import CheckpointTrigger, ProgressReporter, ValidationSampler
    from .checkpoint import ObjectStoreCheckpointIO

    training = cfg.training
    workdir = Path(tempfile.mkdtemp(prefix="dreambooth-"))
    tb_dir = workdir / "tb" if cfg.output.tensorboard and place.rank == 0 else None
    progress = ProgressReporter(cfg, output, place.world, start_step, tb_dir, json_logs, place.rank, ledger)
    if ledger is not None:
        ledger.load(progress.lines)  # the scores of the runs this one resumes
    trigger = CheckpointTrigger(cfg, progress, place.attempt)
    validation = []
    # Under FSDP rank 0 alone cannot run the sharded denoiser: only the final validation runs.
    if validator is not None and (cfg.validation.every_n_steps or cfg.validation.fidelity.enabled) and training.strategy != "fsdp":
        validation = [ValidationSampler(cfg, output, lambda m, step, samples: validate_module(validator, m, step, samples), progress, ledger)]
    # Extra callbacks (the benchmark's timer) run first, so they never time a checkpoint write;
    # validation runs before the progress reporter hands its step over.
    callbacks: list = [*(extra_callbacks or []), *validation, progress, trigger]
    strategy = training_strategy(cfg, place, trainable_bytes)
    trainer = pl.Trainer(
        accelerator=place.accelerator, devices=place.devices, num_nodes=place.num_nodes, strategy=strategy,
        precision=PRECISION[resolved_precision(cfg)], max_steps=training.max_steps,
        accumulate_grad_batches=training.gradient_accumulation_steps, gradient_clip_val=training.max_grad_norm,
        logger=False, callbacks=callbacks, enable_checkpointing=False,
        plugins=[ObjectStoreCheckpointIO(output, cfg.checkpointing.keep_last, place.rank, place.world, place.attempt,
                                         lambda: kept_for_serving(cfg, ledger)), LightningEnvironment()],
        use_distributed_sampler=False, enable_progress_bar=not json_logs, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(workdir),
    )
    return trainer, trigger, progress


def kept_for_serving(cfg: TrainConfig, ledger: "object | None") -> set[int]:
    """Checkpoints pruning keeps whatever keep_last says: the best so far and the step output.serve names."""
    from dreambooth_api.v1alpha1.spec import served_step

    pinned = served_step(cfg.output.serve)
    return (ledger.protected_steps() if ledger is not None else set()) | ({pinned} if pinned else set())


@dataclass(frozen=True)
class ScoringPlan:
    """How this run scores fidelity: the backbones' sources, the prompt set, the rule picking the best."""

    sources: dict[str, str]
    prompts: "object | None"
    rule: "object | None"


def scoring_plan(cfg: TrainConfig) -> ScoringPlan:
    from .families import TINY_SOURCES
    from .fidelity import backbone_sources
    from .selection import resolve_rule
    from .validation import fidelity_prompts

    from dreambooth_api.v1alpha1.spec import served_step

    fidelity, pinned, training = cfg.validation.fidelity, served_step(cfg.output.serve), cfg.training
    if pinned is not None and (pinned > training.max_steps or (pinned % cfg.checkpointing.every_n_steps and pinned != training.max_steps)):
        raise UserInputError(f"output.serve {cfg.output.serve} is not a checkpoint of this run (every "
                             f"checkpointing.every_n_steps={cfg.checkpointing.every_n_steps} steps and at training.max_steps={training.max_steps})")
    if not fidelity.enabled:
        return ScoringPlan({}, None, None)
    sources = backbone_sources(fidelity, cfg.validation.fidelity_model, cfg.model.source in TINY_SOURCES)
    prompts = fidelity_prompts(cfg) if sources else None
    return ScoringPlan(sources, prompts, resolve_rule(fidelity.select, "dino" in sources, "clip" in sources))


def finish_run(cfg: TrainConfig, output: "object", trainer: object, ledger: "object", export_final: "object",
               photos: list) -> None:
    """Rank 0 after the last step: final/ (and exports/best/ when the final step is the best),
    the best checkpoint's export, fidelity.json, the report; then pruning with the final scores."""
    from dreambooth_api.v1alpha1.spec import served_export_prefix, served_step

    from .callbacks import FIDELITY, fidelity_document
    from .checkpoint import age_order, complete_checkpoints, step_of
    from .export import BEST, EXPORTS, FINAL, export_checkpoint
    from .report import write_report

    step, serve = trainer.global_step, cfg.output.serve
    # step -> its stored key (checkpoints are keyed by attempt too: the newest attempt's wins)
    stored = {step_of(key): key for key in sorted(complete_checkpoints(output), key=age_order)}
    kept = set(stored)
    best = ledger.best(kept)
    # serving.checkpoint best with nothing scored serves the final model from exports/best/ too.
    best_step = best.step if best is not None else step if serve == BEST else None
    export_best = best_step is not None and (cfg.validation.fidelity.export_best or serve == BEST)
    # Every stored checkpoint to export: its step -> the folders it goes to.
    wanted: dict[int, list[str]] = {}
    if export_best:
        wanted.setdefault(best_step, []).append(f"{EXPORTS}/{BEST}")
    pinned = served_step(serve)
    if pinned is not None:
        wanted.setdefault(pinned, []).append(served_export_prefix(serve))
    final_uri = export_final((FINAL, *wanted.pop(step, [])))
    for other, prefixes in sorted(wanted.items()):
        if other not in kept:
            raise UserInputError(f"output.serve {serve}: checkpoints/step-{other:08d} is not stored")
        export_checkpoint(cfg, output, stored[other], tuple(prefixes))
    exports: dict[str, Any] = {"final": FINAL}
    if export_best:
        exports.update({"best": f"{EXPORTS}/{BEST}", "best_step": best_step})
    if pinned is not None:
        exports[serve] = served_export_prefix(serve)
    exports["served"] = served_export_prefix(serve)
    io = trainer.strategy.checkpoint_io
    io.prune()  # the final scores may have moved the best: an older protected checkpoint can go
    ledger.kept, ledger.exports = {step_of(key) for key in complete_checkpoints(output)}, exports
    document = fidelity_document(ledger)
    output.write_text(FIDELITY, json.dumps(document, indent=1))
    report = write_report(output, cfg, document, photos, f"step-{best_step}" if serve == BEST else serve)
    log.info("done", extra={"final": final_uri, "step": step, "best_step": best_step, "served": exports["served"], "report": report})


def run_training(cfg: TrainConfig) -> int:
    import pytorch_lightning as pl

    from .callbacks import configure_logging
    from .checkpoint import find_resume_checkpoint, step_of
    from .class_images import ensure_class_images
    from .data import DreamBoothBatches, LatentCache, load_instance_images
    from .distributed import dist_env_from, wait_for_master
    from .export import export_pipeline
    from .models import load_model, quiet_libraries
    from .module import DreamBoothModule, refuse_other_families_options
    from .fidelity import Backbones
    from .quantize import quantize_frozen_modules
    from .selection import FidelityLedger
    from .storage import S3Storage, open_storage

    json_logs = json_logs_wanted(cfg)
    configure_logging(json_logs)
    quiet_libraries()
    check_runtime(cfg)
    scoring = scoring_plan(cfg)  # a bad fidelity setting fails every rank before any work
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    place = placement_from_env()
    check_strategy(cfg, place)
    training = cfg.training
    output = open_storage(cfg.output.uri)
    if isinstance(output, S3Storage) and place.rank == 0:
        output.ensure_bucket()

    instance_storage = open_storage(cfg.data.instance_uri)
    instance = load_instance_images(instance_storage, cfg.data.instance_prompt, cfg.data.token, cfg.data.caption_template)
    resume_key = find_resume_checkpoint(output) if cfg.checkpointing.resume else None
    start_step = step_of(resume_key) if resume_key else 0
    log.info("starting", extra={"rank": place.rank, "world": place.world, "instance_images": len(instance.images),
                                "resume_from": resume_key, "start_step": start_step, "output": output.describe()})

    pl.seed_everything(training.seed, workers=True, verbose=False)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if place.accelerator == "gpu" else torch.device("cpu")
    family, pipeline = load_base_model(cfg)
    cfg = with_model_defaults(cfg, family, pipeline)
    refuse_other_families_options(cfg, family)  # as soon as the family is known, before class images are drawn
    parts = family.components(pipeline)
    place_frozen_modules(parts, family, cfg, device)
    quantized = quantize_frozen_modules(parts, family, cfg)

    klass = None
    generated = 0
    if cfg.prior.enabled:
        from .fsdp import moved_while

        with training_precision(cfg, device.type), moved_while(parts.denoiser, device):
            result = ensure_class_images(cfg, pipeline, place.rank, place.world)
        klass, generated = result.image_set, result.generated_here
    rank_record = {"rank": place.rank, "class_images_generated": generated}
    output.write_text(f"ranks/{place.rank}.json", json.dumps(rank_record))

    buckets = training_buckets(cfg, family.pixel_multiple)
    latent_cache, text_conds = None, None
    if training.cache_latents:
        latent_cache = LatentCache()
        flips = (False, True) if cfg.data.random_flip else (False,)
        latent_cache.fill(parts.vae, [instance, klass], cfg.data.resolution, flips, buckets)

    accumulate = training.gradient_accumulation_steps
    batches = DreamBoothBatches(instance, klass, cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip,
                                training.batch_size, training.seed, place.rank, place.world,
                                start=start_step * accumulate, stop=training.max_steps * accumulate,
                                latent_cache=latent_cache, buckets=buckets, caption_dropout=cfg.data.caption_dropout)
    if not training.train_text_encoder:
        with training_precision(cfg, device.type):
            text_conds = cached_text_conditions(cfg, family, pipeline, batches.prompts, device)
    module = DreamBoothModule(cfg, family, pipeline, text_conds, batches.prompts)
    if quantized:  # frozen and the same on every rank: DDP need not broadcast the 8-bit tensors
        module._ddp_params_and_buffers_to_ignore = [name for name, p in module.named_parameters() if not p.requires_grad]
    # Pinned host memory lets Lightning copy batches to the GPU without making the host wait.
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.data.num_workers,
                                         pin_memory=place.accelerator == "gpu")

    trainable_bytes = sum(p.numel() * p.element_size() for p in module.trainable_parameters())
    validator = ledger = None
    if place.rank == 0:
        from .fidelity import load_backbones
        from .validation import Validator

        backbones = load_backbones(scoring.sources).to(device) if cfg.validation.fidelity.enabled else None
        validator = Validator(cfg, pipeline, instance.images, training_precision(cfg, device.type), backbones or Backbones(), family, scoring.prompts)
        ledger = FidelityLedger(scoring.rule, cfg.checkpointing.every_n_steps, training.max_steps, backbones.infos() if backbones else {})
    trainer, trigger, progress = make_trainer(cfg, place, output, json_logs, start_step, validator, trainable_bytes=trainable_bytes, ledger=ledger)
    wait_for_master(dist_env_from())
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_key)
    trainer.strategy.checkpoint_io.wait()  # the last checkpoint is written before anything else

    output.write_text(f"ranks/{place.rank}.json", json.dumps({**rank_record, "step": trainer.global_step, "weights_digest": weights_digest(module),
                                                              "checkpoint_stall_seconds": [round(s, 3) for s in trigger.stalls]}))
    if trigger.stopped_by_sigterm:
        progress.close()
        log.info("stopped by SIGTERM after a checkpoint", extra={"step": trainer.global_step})
        return EXIT_SIGTERM
    denoiser = final_denoiser(cfg, trainer, module, place.rank)
    if trainer.is_global_zero:
        if module.ema is not None:
            module.ema.copy_to(module.ema_parameters())
        result = validator(denoiser, list(module.text_encoders), None)
        for key, data in result.files.items():
            output.write_bytes(key, data)
        progress.record(trainer.global_step, result.figures)
        ledger.add(trainer.global_step, result.figures)
        finish_run(cfg, output, trainer, ledger, lambda prefixes: export_pipeline(
            lambda: load_base_model(cfg)[1], denoiser, list(module.text_encoders), output, lora=training.lora.enabled,
            family=family, metadata=family.metadata(pipeline, cfg), prefixes=prefixes), instance.images)
        progress.flush("succeeded")
    progress.close()
    trainer.strategy.barrier("export")
    return EXIT_OK
