"""Load a Stable Diffusion pipeline from any model source the config accepts."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline

from .errors import UserInputError
from .storage import is_s3, open_storage
from .tiny import tiny_pipeline

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


def fetch_s3_model(uri: str) -> Path:
    """Download an s3:// diffusers folder once into the local cache (complete copies only)."""
    folder = model_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = folder / ".complete"
    if not done.exists():
        storage = open_storage(uri)
        if not storage.exists("model_index.json"):
            raise UserInputError(f"{uri} holds no model_index.json: not a diffusers model folder")
        storage.download_tree("", folder)
        done.write_text(uri)
    return folder


def load_pipeline(source: str, seed: int = 0, tiny_resolution: int = 32, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """`tiny`, `hf://org/name[@rev]`, `s3://bucket/prefix` or a local diffusers folder."""
    if source == "tiny":
        return tiny_pipeline(seed=seed, sample_size=tiny_resolution).to(dtype=dtype)
    kwargs = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if source.startswith("hf://"):
        repo, revision = parse_hf_source(source)
        return StableDiffusionPipeline.from_pretrained(repo, revision=revision, **kwargs)
    folder = fetch_s3_model(source) if is_s3(source) else Path(source).expanduser()
    if not (folder / "model_index.json").exists():
        raise UserInputError(f"model source {source} has no model_index.json (not a diffusers folder)")
    return StableDiffusionPipeline.from_pretrained(str(folder), **kwargs)


def sampler_for(pipeline: StableDiffusionPipeline, name: str) -> object:
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
