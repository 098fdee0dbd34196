"""Export the trained model: diffusers layout (safetensors) under final/, LoRA files under final/lora/.

final/                     a complete pipeline, loadable by DiffusionPipeline.from_pretrained
                           (with LoRA on, the adapters are fused into it)
final/dreambooth.json      the family and what it trained with (prediction type, Flux guidance)
final/lora/pytorch_lora_weights.safetensors   LoRA in diffusers key layout
final/lora/lora_kohya.safetensors             the same LoRA in kohya (A1111/ComfyUI) key layout
                                              (SD, SDXL; Flux in BFL names; SD3 has none: ComfyUI reads diffusers keys)
exports/best/, exports/step-N/                another checkpoint, laid out as final/ (the best by the
                                              fidelity scores; a step serving.checkpoint names)

A folder is complete once its dreambooth.json is there: it is uploaded last.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .errors import UserInputError
from .storage import Storage, is_s3, open_storage

if TYPE_CHECKING:
    from .families import ModelFamily

FINAL = "final"
EXPORTS = "exports"
BEST = "best"
LORA_DIFFUSERS = "pytorch_lora_weights.safetensors"
LORA_KOHYA = "lora_kohya.safetensors"
METADATA = "dreambooth.json"


def as_family(family_or_class: object) -> "ModelFamily":
    """A family, given one or a diffusers pipeline class (the older call style)."""
    from .families import ModelFamily, family_from_class_name

    return family_or_class if isinstance(family_or_class, ModelFamily) else family_from_class_name(family_or_class.__name__)


def as_list(text_encoders: torch.nn.Module | list[torch.nn.Module] | None) -> list[torch.nn.Module]:
    if text_encoders is None:
        return []
    return list(text_encoders) if isinstance(text_encoders, (list, tuple, torch.nn.ModuleList)) else [text_encoders]


def write_lora_files(folder: Path, family: object, denoiser: torch.nn.Module,
                     text_encoders: torch.nn.Module | list[torch.nn.Module] | None) -> None:
    """The adapters in diffusers layout (what `Pipeline.load_lora_weights(folder)` reads; raw PEFT
    keys with each adapter's config, alpha included, as metadata) and, for the families that have
    one, kohya's layout (A1111/ComfyUI), each module with its trained alpha."""
    from safetensors.torch import save_file

    family = as_family(family)
    encoders = as_list(text_encoders)
    family.save_lora(folder, denoiser, encoders)
    kohya = family.kohya_lora(denoiser, encoders)
    if kohya is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in kohya.items()}, str(folder / LORA_KOHYA))


def is_trained(module: torch.nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


def is_exported(storage: Storage, prefix: str) -> bool:
    return storage.exists(f"{prefix}/{METADATA}")


def export_pipeline(load_base: Callable[[], object], denoiser: torch.nn.Module, text_encoders: torch.nn.Module | list[torch.nn.Module],
                    storage: Storage, lora: bool, family: object | None = None, metadata: dict | None = None,
                    prefixes: tuple[str, ...] = (FINAL,)) -> str:
    """Save the trained model under `final/` of storage (or each of `prefixes`); returns the first's
    URI. The frozen parts are the base model as it was loaded (`load_base()` reads a fresh copy:
    training cast its own to the half type), the trained parts come from their fp32 master copies.
    With LoRA, lora/ holds the adapter files and the folder the base with that very file fused in."""
    from .families import family_of_pipeline

    encoders = as_list(text_encoders)
    base = load_base()
    family = as_family(family) if family is not None else family_of_pipeline(base)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, FINAL)
        if lora:
            write_lora_files(local / "lora", family, denoiser, encoders)
            base.load_lora_weights(str(local / "lora"), weight_name=LORA_DIFFUSERS)
            base.fuse_lora()
            base.unload_lora_weights()
            final = base
        else:
            base_encoders = family.components(base).text_encoders
            final = family.with_trained(base, denoiser, [trained if is_trained(trained) else frozen
                                                         for trained, frozen in zip(encoders, base_encoders)])
        final.save_pretrained(str(local), safe_serialization=True)
        # What the family trained with (prediction type; Flux's guidance and T5 length) beside the model.
        description = json.dumps(metadata or family.metadata(base), indent=2)
        for prefix in prefixes:
            storage.delete_prefix(prefix)
            storage.upload_tree(prefix, local)
            storage.write_text(f"{prefix}/{METADATA}", description)  # last: the folder is complete
    return storage.describe(prefixes[0])


def trained_module_at(cfg: "object", storage: Storage, key: str) -> "object":
    """The DreamBoothModule of the run with a checkpoint's trained weights in it (the EMA average
    when the run keeps one: what would have been exported had training stopped there), on the CPU."""
    from .checkpoint import load_checkpoint_state, read_manifest
    from .module import DreamBoothModule
    from .train import load_base_model, with_model_defaults

    manifest = read_manifest(storage, key)
    if manifest.get("layout", "tensors") != "tensors":
        raise UserInputError(f"checkpoint {storage.describe(key)} is sharded (training.strategy fsdp): only final/ is exported from such a run")
    family, pipeline = load_base_model(cfg)
    cfg = with_model_defaults(cfg, family, pipeline)
    module = DreamBoothModule(cfg, family, pipeline)
    state = load_checkpoint_state(storage, key, 0, manifest["world"])
    expected = set(module.state_dict())
    missing = sorted(expected - set(state["state_dict"]))
    if missing:
        raise UserInputError(f"checkpoint {storage.describe(key)} lacks trained weights {missing[:3]} ...: written by another config?")
    module.load_state_dict(state["state_dict"], strict=False)
    if module.ema is not None and "ema" in state:
        module.ema.load_state_dict(state["ema"])
        module.ema.copy_to(module.ema_parameters())
    return module


def export_checkpoint(cfg: "object", storage: Storage, key: str, prefixes: tuple[str, ...]) -> str:
    """Export a stored checkpoint (`checkpoints/step-N`) to `prefixes`, laid out as final/."""
    from .train import load_base_model

    module = trained_module_at(cfg, storage, key)
    return export_pipeline(lambda: load_base_model(cfg)[1], module.denoiser, list(module.text_encoders), storage,
                           lora=cfg.training.lora.enabled, family=module.family, metadata=module.family.metadata(module._pipeline, module.cfg),
                           prefixes=prefixes)


def fetch_lora_file(uri: str, folder: Path) -> Path:
    """The diffusers LoRA file named by `uri` (a .safetensors file, or a folder holding
    pytorch_lora_weights.safetensors; local or s3://), as a local path (s3:// is copied into `folder`)."""
    name = uri.rsplit("/", 1)[-1] if uri.endswith(".safetensors") else LORA_DIFFUSERS
    if not is_s3(uri):
        path = Path(uri).expanduser()
        return path if path.suffix == ".safetensors" else path / name
    parent = uri.rsplit("/", 1)[0] if uri.endswith(".safetensors") else uri
    folder.mkdir(parents=True, exist_ok=True)
    open_storage(parent).download_file(name, folder / name)
    return folder / name


def apply_lora(pipeline: object, uri: str) -> None:
    """Load LoRA weights (a diffusers safetensors file or a folder holding one) into a pipeline."""
    path = fetch_lora_file(uri, Path(tempfile.mkdtemp(prefix="lora-")))
    if not path.exists():
        raise UserInputError(f"LoRA weights {uri}: no {path.name} there")
    pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
