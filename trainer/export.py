"""Export the trained model: diffusers layout (safetensors) under final/, LoRA files under final/lora/.

final/                     a complete pipeline, loadable by DiffusionPipeline.from_pretrained
                           (with LoRA on, the adapters are fused into it)
final/dreambooth.json      the family and what it trained with (prediction type, Flux guidance)
final/lora/pytorch_lora_weights.safetensors   LoRA in diffusers key layout
final/lora/lora_kohya.safetensors             the same LoRA in kohya (A1111/ComfyUI) key layout
                                              (SD, SDXL; Flux in BFL names; SD3 has none: ComfyUI reads diffusers keys)
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UserInputError
from .storage import Storage, is_s3, open_storage

if TYPE_CHECKING:
    from .families import ModelFamily

FINAL = "final"
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


def merged_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy with LoRA adapters merged into the base weights and removed."""
    fused = copy.deepcopy(module)
    if not getattr(fused, "peft_config", None):
        return fused
    if hasattr(fused, "fuse_lora"):  # diffusers models
        fused.fuse_lora()
        fused.unload_lora()
        return fused
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(fused.named_modules()):  # transformers text encoders: merge layer by layer
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(fused.get_submodule(parent_name) if parent_name else fused, child, layer.get_base_layer())
    del fused.peft_config
    fused._hf_peft_config_loaded = False
    return fused



def export_pipeline(pipeline: object, denoiser: torch.nn.Module, text_encoders: torch.nn.Module | list[torch.nn.Module],
                    storage: Storage, lora: bool, family: object | None = None) -> str:
    """Save the pipeline with the trained modules under `final/` of storage; returns its URI.
    The pipeline class and scheduler (with its prediction_type) are the base model's."""
    from .families import family_of_pipeline

    family = family or family_of_pipeline(pipeline)
    encoders = as_list(text_encoders)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, FINAL)
        if lora:
            write_lora_files(local / "lora", family, denoiser, encoders)
            denoiser = merged_copy(denoiser)
            encoders = [merged_copy(e) if getattr(e, "peft_config", None) else e for e in encoders]
        final = family.with_trained(pipeline, denoiser, encoders)
        final.save_pretrained(str(local), safe_serialization=True)
        # What the family trained with (prediction type; Flux's guidance and T5 length) beside the model.
        (local / METADATA).write_text(json.dumps(family.metadata(pipeline), indent=2))
        storage.delete_prefix(FINAL)
        storage.upload_tree(FINAL, local)
    return storage.describe(FINAL)


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
