"""Load a model of any supported family from any model source the config accepts."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from .errors import UserInputError
from .storage import is_s3, open_storage

if TYPE_CHECKING:
    from .families import ModelFamily

SAMPLERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}


def model_cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_CACHE") or Path.home() / ".cache" / "dreambooth"
    return Path(root) / "models"


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf://org/name@rev` -> ('org/name', 'rev')."""
    name = source.removeprefix("hf://")
    repo, _, revision = name.partition("@")
    return repo, revision or None


def fetch_s3_folder(uri: str, required: str) -> Path:
    """Download an s3:// model folder once into the local cache (complete copies only); `required`
    is the file that makes it one (model_index.json for a pipeline, config.json for a transformers model)."""
    folder = model_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = folder / ".complete"
    if not done.exists():
        storage = open_storage(uri)
        if not storage.exists(required):
            raise UserInputError(f"{uri} holds no {required}: not a {'diffusers' if required == 'model_index.json' else 'transformers'} model folder")
        storage.download_tree("", folder)
        done.write_text(uri)
    return folder


def fetch_s3_model(uri: str) -> Path:
    """Download an s3:// diffusers folder once into the local cache (complete copies only)."""
    return fetch_s3_folder(uri, "model_index.json")


def family_for(source: str, revision: str | None = None) -> "ModelFamily":
    """The family of a model source: the built-in tiny name, or model_index.json's pipeline class
    (read alone, before any weights load)."""
    from .families import TINY_SOURCES, family_from_class_name, family_of_folder

    if source in TINY_SOURCES:
        return TINY_SOURCES[source]
    if source.startswith("hf://"):
        from diffusers import DiffusionPipeline

        repo, revision = parse_hf_source(source)
        return family_from_class_name(DiffusionPipeline.load_config(repo, revision=revision).get("_class_name", ""))
    return family_of_folder(model_folder(source))


def model_folder(source: str) -> Path:
    folder = fetch_s3_model(source) if is_s3(source) else Path(source).expanduser()
    if not (folder / "model_index.json").exists():
        raise UserInputError(f"model source {source} has no model_index.json (not a diffusers folder)")
    return folder


def load_model(source: str, seed: int = 0, tiny_resolution: int = 32, dtype: torch.dtype = torch.float32,
               family: str = "auto") -> tuple["ModelFamily", Any]:
    """`tiny`, `tiny-sdxl`, `tiny-sd3`, `tiny-flux`, `hf://org/name[@rev]`, `s3://bucket/prefix` or a
    local diffusers folder -> (its family, its pipeline). `family` is `model.family` (auto or a name)."""
    from .families import TINY_SOURCES, resolve_family

    detected = resolve_family(family, family_for(source), source)
    if source in TINY_SOURCES:
        pipeline = detected.tiny(seed, tiny_resolution).to(dtype=dtype)
        for module in pipeline.components.values():  # inference mode, as from_pretrained gives (no dropout)
            if isinstance(module, torch.nn.Module):
                module.eval()
        return detected, pipeline
    kwargs = {"torch_dtype": dtype, **detected.extra_pipeline_kwargs()}
    kwargs.pop("feature_extractor", None)
    pipeline_class = detected.pipeline_class()
    if source.startswith("hf://"):
        repo, revision = parse_hf_source(source)
        return detected, pipeline_class.from_pretrained(repo, revision=revision, **kwargs)
    return detected, pipeline_class.from_pretrained(str(model_folder(source)), **kwargs)


def load_pipeline(source: str, seed: int = 0, tiny_resolution: int = 32, dtype: torch.dtype = torch.float32) -> Any:
    """The pipeline alone (any family), as `load_model` loads it."""
    return load_model(source, seed, tiny_resolution, dtype)[1]


def sampler_for(pipeline: Any, name: str) -> object:
    """A fresh inference scheduler of the named kind with the pipeline's beta schedule."""
    return SAMPLERS[name].from_config(pipeline.scheduler.config)


def quiet_libraries() -> None:
    """Library chatter (deprecations, dtype notes, progress bars) drowns the training log."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
