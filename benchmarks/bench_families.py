"""SDXL-LoRA and Flux-LoRA: our trainer vs the diffusers example loops, same process, same shapes.

Ours is `dreambooth train` itself (`run_training` on a config: LoRA, cached latents and text,
prior preservation with class photos from a folder, the trainer's own precision and frozen-weight
dtypes), timed by a callback over a window of optimizer steps; the run stops after the window. The
baselines are the inner loops of diffusers' train_dreambooth_lora_sdxl.py and
train_dreambooth_lora_flux.py (benchmarks/family_lora_baselines.py) on a freshly loaded copy of the
very model our run loads, trained in place (one denoiser on the GPU), with the AdamW implementation
our run picked: the built-in tiny models on CPU (`tiny-sdxl`, `tiny-flux`), or any model folder given
with --sdxl / --flux (gpu_session.sh saves random full-size ones, benchmarks/random_models.py).

    python benchmarks/bench_families.py                    # tiny shapes on CPU
    python benchmarks/bench_families.py --sdxl DIR --flux DIR --resolution 1024   # native sizes

Prints one JSON line per run (step time, images/s, peak GPU memory of the timed steps) and per
family `<family>_lora_speedup`: the median of per-round ratios (ours / diffusers, images/s) over
ABBA rounds after a warm-up until steady, with each round's ratio and the spread; on a GPU also both
sides' peak memory.
"""
from __future__ import annotations

import argparse
import shutil
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
import measure  # noqa: E402

PROMPTS = ("a photo of sks dog", "a photo of dog")


def photos_folder(count: int, size: int, seed: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"photo-{index}.png")
    return folder


def our_config(source: str, resolution: int, per_side: int, max_steps: int, photos: Path, class_photos: Path, output: Path,
               gradient_checkpointing: bool) -> Any:
    from dreambooth_trainer.config import config_from_dict

    return config_from_dict({
        "model": {"source": source, "tiny_resolution": resolution},
        "data": {"instance_uri": str(photos), "instance_prompt": PROMPTS[0], "resolution": resolution},
        "prior": {"class_prompt": PROMPTS[1], "class_uri": str(class_photos), "num_class_images": 2},
        "training": {"max_steps": max_steps, "batch_size": per_side, "cache_latents": True,
                     "gradient_checkpointing": gradient_checkpointing, "lora": {"enabled": True, "rank": 4}},
        "validation": {"fidelity": False},
        "output": {"uri": str(output), "log_format": "json"},
    })


def our_case(args: argparse.Namespace, source: str, steps: int, warmup: int, photos: Path, class_photos: Path) -> dict[str, Any]:
    """`run_training` with a step timer first among the Lightning Trainer's callbacks."""
    timer = measure.window_timer(warmup, steps)
    output = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    try:
        measure.timed_training(our_config(source, args.resolution, args.per_side, warmup + steps + 2, photos, class_photos, output,
                                          args.gradient_checkpointing), timer)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    seconds = (timer.t1 - timer.t0) / steps
    return {"case": f"ours {source} lora per_side={args.per_side} {args.resolution}px gradient_checkpointing={args.gradient_checkpointing}",
            "s_per_step": round(seconds, 4), "images_per_s": round(2 * args.per_side / seconds, 2),
            **measure.per_cpu_second(2 * args.per_side * steps, timer.cpu1 - timer.cpu0),
            "peak_gib": None if timer.peak_gib is None else round(timer.peak_gib, 2), "optimizer": timer.optimizer}


def loaded(source: str, resolution: int, device: str) -> Any:
    from dreambooth_trainer.models import load_pipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_pipeline(source, seed=0, tiny_resolution=resolution, dtype=dtype).to(device)


def without_text_encoders(pipeline: Any) -> None:
    """The scripts drop the frozen text encoders once the prompts are encoded (free_memory)."""
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipeline, name, None) is not None:
            getattr(pipeline, name).to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def sdxl_baseline(args: argparse.Namespace, source: str, steps: int, warmup: int, device: str, optimizer: dict[str, Any]) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    pipeline = loaded(source, args.resolution, device)
    embeds, _, pooled, _ = pipeline.encode_prompt(list(PROMPTS), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    without_text_encoders(pipeline)
    pipeline.vae.to(torch.float32)  # the script keeps SDXL's VAE in fp32 (NaNs in half precision)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    with torch.enable_grad():
        return baselines.sdxl_lora_case(pipeline.unet, pipeline.vae, baselines.Conditions(embeds, pooled), scheduler, args.resolution,
                                        args.per_side, steps, warmup, optimizer, device=device,
                                        gradient_checkpointing=args.gradient_checkpointing)


@torch.no_grad()
def flux_baseline(args: argparse.Namespace, source: str, steps: int, warmup: int, device: str, optimizer: dict[str, Any]) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipeline = loaded(source, args.resolution, device)
    length = min(512, pipeline.tokenizer_2.model_max_length)
    embeds, pooled, text_ids = pipeline.encode_prompt(list(PROMPTS), list(PROMPTS), device=device, max_sequence_length=length)
    without_text_encoders(pipeline)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)  # unshifted training sigmas
    with torch.enable_grad():
        return baselines.flux_lora_case(pipeline.transformer, pipeline.vae, baselines.Conditions(embeds, pooled, text_ids),
                                        scheduler, args.resolution, args.per_side, steps, warmup, optimizer, device=device,
                                        gradient_checkpointing=args.gradient_checkpointing)


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
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per family (ABBA order)")
    parser.add_argument("--max-warmup-rounds", type=int, default=2, help="warm-up rounds at most, until both sides are steady")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (CPU 30, GPU 10)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first in each run (CPU 5, GPU 4)")
    parser.add_argument("--families", default="sdxl,flux")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (Flux at 1024 px on an 80 GB card needs it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads for both sides (default 1, as bench_trainer.py: multi-threaded CPU figures swing on a shared machine)")
    args = parser.parse_args()
    from bench_trainer import quiet

    quiet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    steps = args.steps or (30 if device == "cpu" else 10)  # a tiny CPU step is ~20 ms: fewer swing with the load
    warmup = args.warmup_steps or (5 if device == "cpu" else 4)
    measure.emit({"record": measure.run_record(), "resolution": args.resolution, "cpu_threads": torch.get_num_threads()})
    photos, class_photos = photos_folder(4, args.resolution, 0), photos_folder(2, args.resolution, 1)
    cases = {"sdxl": (args.sdxl, sdxl_baseline), "flux": (args.flux, flux_baseline)}
    try:
        for family in args.families.split(","):
            source, baseline = cases[family]
            picked: dict[str, Any] = {}

            def ours(source: str = source) -> dict[str, Any]:
                result = our_case(args, source, steps, warmup, photos, class_photos)
                picked.update(result["optimizer"])
                return result

            def theirs(source: str = source, baseline: Any = baseline) -> dict[str, Any]:
                if not picked:
                    raise RuntimeError("ours has not run yet: no AdamW implementation to match")
                return baseline(args, source, steps, warmup, device, picked)

            pair = measure.Pair(f"{family}_lora_speedup", ours, theirs)
            summary = measure.run_pair(pair, args.rounds, args.max_warmup_rounds)
            summary.update({side: {"peak_gib": median(pair.runs[side], "peak_gib"), "s_per_step": median(pair.runs[side], "s_per_step")}
                            for side in ("ours", "baseline")})
            measure.emit(summary)
            measure.say_summary(summary)
    finally:
        shutil.rmtree(photos, ignore_errors=True)
        shutil.rmtree(class_photos, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
