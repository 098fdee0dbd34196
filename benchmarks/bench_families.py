"""SDXL-LoRA and Flux-LoRA: our trainer vs the diffusers example loops, same process, same shapes.

Ours is `dreambooth train` itself (`run_training` on a config: LoRA, cached latents and text,
prior preservation), timed by a callback between two optimizer steps. The baselines are the inner
loops of diffusers' train_dreambooth_lora_sdxl.py and train_dreambooth_lora_flux.py
(benchmarks/family_lora_baselines.py) on the very modules our run loads: the built-in tiny
model's on CPU (`tiny-sdxl`, `tiny-flux`), or any model folder given with --sdxl / --flux (a GPU
session saves random full-size ones; see gpu_session.sh).

    python benchmarks/bench_families.py                    # tiny shapes on CPU
    python benchmarks/bench_families.py --sdxl DIR --flux DIR --resolution 1024   # native sizes

Prints one JSON line per run, then per family `<family>_lora_speedup: ours / diffusers` (images/s,
medians of ROUNDS alternating runs) and, on a GPU, both sides' peak memory.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import family_lora_baselines as baselines  # noqa: E402
from bench_trainer import StepTimer, alternate  # noqa: E402

ROUNDS = 3
PROMPTS = ("a photo of sks dog", "a photo of dog")


def photos_folder(count: int, size: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"photo-{index}.png")
    return folder


def our_config(source: str, resolution: int, per_side: int, max_steps: int, photos: Path, gpu: bool) -> Any:
    from dreambooth_trainer.config import config_from_dict

    return config_from_dict({
        "model": {"source": source, "tiny_resolution": resolution},
        "data": {"instance_uri": str(photos), "instance_prompt": PROMPTS[0], "resolution": resolution},
        "prior": {"class_prompt": PROMPTS[1], "num_class_images": 2, "sample_steps": 1, "sample_batch_size": 2},
        "training": {"max_steps": max_steps, "batch_size": per_side, "learning_rate": 1e-4, "cache_latents": True,
                     "mixed_precision": "bf16" if gpu else "no", "max_grad_norm": 1.0, "lora": {"enabled": True, "rank": 4}},
        "checkpointing": {"every_n_steps": 10**6, "on_sigterm": False},
        "validation": {"fidelity": False},
        "output": {"uri": tempfile.mkdtemp(prefix="bench-ours-"), "tensorboard": False, "log_format": "json"},
    })


def our_case(source: str, resolution: int, per_side: int, steps: int, warmup: int, photos: Path) -> dict[str, Any]:
    """`run_training` with a step timer added to the Lightning Trainer it builds."""
    from dreambooth_trainer import train

    gpu = torch.cuda.is_available()
    timer = StepTimer(warmup, warmup + steps)
    build = train.make_trainer

    def with_timer(*args: Any, **kwargs: Any) -> Any:
        kwargs["extra_callbacks"] = [*(kwargs.get("extra_callbacks") or []), timer]
        return build(*args, **kwargs)

    train.make_trainer = with_timer
    log = io.StringIO()  # the trainer's own progress lines would bury the figures
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = train.run_training(our_config(source, resolution, per_side, warmup + steps, photos, gpu))
    finally:
        train.make_trainer = build
    if code:
        raise RuntimeError(f"run_training exited {code}: {log.getvalue()[-400:]}")
    seconds = (timer.t1 - timer.t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    return baselines.result(f"ours {source} lora per_side={per_side} {resolution}px", per_side, seconds, peak)


def loaded(source: str, resolution: int, device: str) -> Any:
    from dreambooth_trainer.models import load_pipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_pipeline(source, seed=0, tiny_resolution=resolution, dtype=dtype).to(device)


@torch.no_grad()
def sdxl_baseline(source: str, resolution: int, per_side: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    pipeline = loaded(source, resolution, device)
    embeds, _, pooled, _ = pipeline.encode_prompt(list(PROMPTS), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    pipeline.vae.to(torch.float32)  # the script keeps SDXL's VAE in fp32 (NaNs in half precision)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    with torch.enable_grad():
        return baselines.sdxl_lora_case(pipeline.unet, pipeline.vae, baselines.Conditions(embeds, pooled), scheduler,
                                        resolution, per_side, steps, warmup, device=device)


@torch.no_grad()
def flux_baseline(source: str, resolution: int, per_side: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipeline = loaded(source, resolution, device)
    length = min(512, pipeline.tokenizer_2.model_max_length)
    embeds, pooled, text_ids = pipeline.encode_prompt(list(PROMPTS), list(PROMPTS), device=device, max_sequence_length=length)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)  # unshifted training sigmas
    with torch.enable_grad():
        return baselines.flux_lora_case(pipeline.transformer, pipeline.vae, baselines.Conditions(embeds, pooled, text_ids),
                                        scheduler, resolution, per_side, steps, warmup, device=device)


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdxl", default="tiny-sdxl", help="SDXL model source (default: the built-in tiny-sdxl)")
    parser.add_argument("--flux", default="tiny-flux", help="Flux model source (default: the built-in tiny-flux)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--per-side", type=int, default=1, help="instance images per step (as many class images join them)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--families", default="sdxl,flux")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads for both sides (default 1, as bench_trainer.py: multi-threaded CPU figures swing on a shared machine)")
    args = parser.parse_args()
    from dreambooth_trainer.models import quiet_libraries

    quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    steps, warmup = (8, 3) if device == "cpu" else (10, 4)
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                      "resolution": args.resolution, "rounds": args.rounds, "cpu_threads": torch.get_num_threads()}), flush=True)
    photos = photos_folder(4, args.resolution)
    cases = {"sdxl": (args.sdxl, sdxl_baseline), "flux": (args.flux, flux_baseline)}
    figures: dict[str, float | None] = {}
    for family in args.families.split(","):
        source, baseline = cases[family]
        runs = alternate({
            "diffusers": lambda: baseline(source, args.resolution, args.per_side, steps, warmup, device),
            "ours": lambda: our_case(source, args.resolution, args.per_side, steps, warmup, photos),
        }, args.rounds)
        ours, theirs = median(runs["ours"], "images_per_s"), median(runs["diffusers"], "images_per_s")
        figures[f"{family}_lora_speedup"] = ours / theirs if ours and theirs else None
        if device == "cuda":
            figures[f"{family}_lora_peak_gib_ours"] = median(runs["ours"], "peak_gib")
            figures[f"{family}_lora_peak_gib_diffusers"] = median(runs["diffusers"], "peak_gib")
    for name, value in figures.items():
        print(f"{name}: {'n/a' if value is None else f'{value:.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
