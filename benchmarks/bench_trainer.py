"""Trainer throughput: our training step vs the diffusers-style baseline, same process, same shapes.

Ours is the real thing: DreamBoothModule + DreamBoothBatches (cached latents and prompt
embeddings) driven by the same Lightning Trainer `dreambooth train` builds (make_trainer), with
the progress reporter writing metrics.jsonl/progress.json as in a job. The baseline is
diffusers' train_dreambooth.py inner loop (benchmarks/diffusers_loop_baseline.py).

    python benchmarks/bench_trainer.py                 # GPU: SD1.5 shapes at 512 px, 1 + 1 images; CPU: tiny shapes
    python benchmarks/bench_trainer.py --tiny          # tiny shapes anywhere (seconds)

Prints one JSON line per case and `trainer_speedup: X.XX` (images/s, best of ours / baseline).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import diffusers_loop_baseline as baseline  # noqa: E402

from dreambooth_trainer.config import config_from_dict  # noqa: E402
from dreambooth_trainer.data import DreamBoothBatches, ImageSet, LatentCache  # noqa: E402
from dreambooth_trainer.module import DreamBoothModule  # noqa: E402
from dreambooth_trainer.storage import LocalStorage  # noqa: E402
from dreambooth_trainer.tiny import tiny_tokenizer  # noqa: E402
from dreambooth_trainer.models import quiet_libraries  # noqa: E402
from dreambooth_trainer.train import Placement, encode_prompt_embeddings, make_trainer  # noqa: E402

H100_H200_BF16_DENSE_TFLOPS = 989.4  # spec-sheet dense bf16 peak used for MFU


class StepTimer(pl.Callback):
    """Wall time of optimizer steps (warmup, warmup + steps], synchronised at both ends."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        step = trainer.global_step
        if step in (self.warmup, self.warmup + self.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if step == self.warmup:
                self.t0 = time.perf_counter()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            else:
                self.t1 = time.perf_counter()


def random_images(count: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def our_case(dev: str, tiny: bool, per_side: int, steps: int, warmup: int, compile_mode: str | None) -> dict:
    torch.manual_seed(0)
    with torch.device(dev):
        unet, vae, text_encoder, resolution = baseline.build(tiny)
    gpu = dev == "cuda"
    cfg = config_from_dict({
        "data": {"instance_uri": "unused", "instance_prompt": "a photo of sks dog", "resolution": resolution},
        "prior": {"class_prompt": "a photo of dog", "num_class_images": 4},
        "training": {"max_steps": warmup + steps, "batch_size": per_side, "learning_rate": 5e-6, "cache_latents": True,
                     "mixed_precision": "bf16" if gpu else "no", "channels_last": gpu, "max_grad_norm": None,
                     "compile": compile_mode is not None, "compile_mode": compile_mode or "default"},
        "checkpointing": {"every_n_steps": 10**6, "on_sigterm": False},
        "output": {"uri": tempfile.mkdtemp(prefix="bench-"), "tensorboard": False},
    })
    tokenizer = tiny_tokenizer()
    vae.to(dev, torch.bfloat16 if gpu else torch.float32).requires_grad_(False)
    text_encoder.to(dev, torch.bfloat16 if gpu else torch.float32).requires_grad_(False)
    instance = ImageSet(random_images(4, resolution, 1), cfg.data.instance_prompt)
    klass = ImageSet(random_images(4, resolution, 2), cfg.prior.class_prompt)
    cache = LatentCache()
    cache.fill(vae, [instance, klass], resolution, (False,))
    embeddings = encode_prompt_embeddings(text_encoder, tokenizer, [cfg.data.instance_prompt, cfg.prior.class_prompt])
    scheduler = baseline.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    module = DreamBoothModule(cfg, unet, vae, text_encoder, tokenizer, scheduler, embeddings).to(dev)
    batches = DreamBoothBatches(instance, klass, resolution, True, False, per_side, 0, 0, 1, 0, cfg.training.max_steps, cache)
    flops = count_step_flops(module, batches, dev)
    timer = StepTimer(warmup, steps)
    place = Placement("gpu" if gpu else "cpu", 1, 1, 0, 1, "nccl" if gpu else "gloo")
    trainer, _, _ = make_trainer(cfg, place, LocalStorage(Path(cfg.output.uri)), True, 0, extra_callbacks=[timer])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=gpu))
    seconds = (timer.t1 - timer.t0) / steps
    images = 2 * per_side
    result = {"case": f"ours per_side={per_side} cached compile={compile_mode}", "s_per_step": round(seconds, 4),
              "images_per_s": round(images / seconds, 2), "tflop_per_step": round(flops / 1e12, 3),
              "achieved_tflops": round(flops / seconds / 1e12, 1)}
    if gpu:
        result["mfu_vs_989"] = round(flops / seconds / 1e12 / H100_H200_BF16_DENSE_TFLOPS, 3)
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def count_step_flops(module: DreamBoothModule, batches: DreamBoothBatches, dev: str) -> float:
    """FLOPs of one eager forward + backward of our step (the optimizer's are negligible)."""
    with FlopCounterMode(display=False) as counter, torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        loss = module.compute_loss({k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batches.batch_at(0).items()})
        loss.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without a GPU)")
    parser.add_argument("--per-side", type=int, default=1, help="instance images per step (as many class images)")
    parser.add_argument("--modes", default="default,reduce-overhead", help="compile modes to try on a GPU")
    args = parser.parse_args()
    quiet_libraries()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args.tiny = args.tiny or dev == "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}), flush=True)
    steps, warmup = (4, 2) if args.tiny else (20, 8)
    base = baseline.train_case(dev, args.tiny, args.per_side, False, *( (2, 1) if args.tiny else (15, 4)))
    print(json.dumps({"baseline": True, **base}), flush=True)
    ours = []
    modes: list[str | None] = [None] + ([m for m in args.modes.split(",") if m] if dev == "cuda" else [])
    for mode in modes:
        try:
            result = our_case(dev, args.tiny, args.per_side, steps, warmup + (6 if mode else 0), mode)
            ours.append(result)
            print(json.dumps(result), flush=True)
        except Exception as error:  # one failing mode must not hide the others
            print(json.dumps({"case": f"ours compile={mode}", "error": repr(error)[:400]}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    best = max(ours, key=lambda r: r["images_per_s"])
    print(json.dumps({"baseline_peak_gib": base.get("peak_gib"), "ours_peak_gib": best.get("peak_gib"), "best": best["case"]}))
    print(f"trainer_speedup: {best['images_per_s'] / base['images_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
