"""Export the trained model: diffusers layout (safetensors) under final/, LoRA files under final/lora/.

final/                     a complete pipeline, loadable by DiffusionPipeline.from_pretrained
                           (with LoRA on, the adapters are fused into it)
final/lora/pytorch_lora_weights.safetensors   LoRA in diffusers key layout
final/lora/lora_kohya.safetensors             the same LoRA in kohya (A1111/ComfyUI) key layout
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from .errors import UserInputError
from .storage import Storage, is_s3, open_storage

FINAL = "final"
LORA_DIFFUSERS = "pytorch_lora_weights.safetensors"
LORA_KOHYA = "lora_kohya.safetensors"


def lora_state_dicts(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, dict[str, torch.Tensor]]:
    from peft.utils import get_peft_model_state_dict

    layers = {"unet": get_peft_model_state_dict(unet)}
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        layers["text_encoder"] = get_peft_model_state_dict(text_encoder)
    return layers


def write_lora_files(folder: Path, pipeline_cls: type, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    layers = lora_state_dicts(unet, text_encoder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(layers["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(layers["text_encoder"]) if "text_encoder" in layers else None,
        safe_serialization=True,
    )
    kohya: dict[str, torch.Tensor] = {}
    for prefix, state in layers.items():
        peft_keys = {f"{prefix}.{key}": value for key, value in state.items()}
        kohya.update(convert_state_dict_to_kohya(peft_keys))
    save_file({k: v.detach().cpu().contiguous() for k, v in kohya.items()}, str(folder / LORA_KOHYA))


def fused_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy with LoRA adapters merged into the base weights and removed."""
    fused = copy.deepcopy(module)
    if hasattr(fused, "fuse_lora") and getattr(fused, "peft_config", None):
        fused.fuse_lora()
        fused.unload_lora()
    return fused


def export_pipeline(pipeline: object, unet: torch.nn.Module, text_encoder: torch.nn.Module, storage: Storage, lora: bool) -> str:
    """Save the pipeline with the trained modules under `final/` of storage; returns its URI."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, FINAL)
        if lora:
            write_lora_files(local / "lora", StableDiffusionPipeline, unet, text_encoder)
            unet = fused_copy(unet)
            text_encoder = fused_copy(text_encoder) if getattr(text_encoder, "peft_config", None) else text_encoder
        final = StableDiffusionPipeline(
            vae=pipeline.vae, text_encoder=text_encoder, tokenizer=pipeline.tokenizer, unet=unet,
            scheduler=pipeline.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        final.save_pretrained(str(local), safe_serialization=True)
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
