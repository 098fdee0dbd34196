"""Trainer throughput: our training step vs the diffusers-style baseline, same process, same shapes.

Ours is the real thing: DreamBoothModule + DreamBoothBatches (cached latents and prompt
embeddings) driven by the Lightning Trainer `dreambooth train` builds (make_trainer), progress
reporter and checkpoint trigger included. The baselines are diffusers' train_dreambooth.py inner
loop (benchmarks/diffusers_loop_baseline.py, as users run it) and its variants
(benchmarks/baseline_variants.py: cached latents + embeddings; that and compiled; whole jobs with
accelerate-style checkpoints every 50 steps).

Every case runs ROUNDS times, the sides alternating, in this one process; medians are compared.

    python benchmarks/bench_trainer.py          # GPU: SD1.5 shapes at 512 px; CPU: tiny shapes
    python benchmarks/bench_trainer.py --tiny   # tiny shapes anywhere

Prints one JSON line per run and, at the end:
  trainer_speedup            ours / the users' loop                     (images/s, 1 + 1 images)
  trainer_speedup_same_work  ours / the loop with cached latents and embeddings
  trainer_speedup_tuned      ours / the cached loop, torch.compile'd
  job_speedup                the baseline job's wall time / ours (checkpoint every 50 steps)
  mfu_1+1, mfu_4+4           our UNet FLOPs per second / the device's peak: on a GPU the spec-sheet
                             dense bf16 peak; on a CPU the fp32 matmul rate measured here, with the
                             same threads (a CPU has no spec figure torch can read)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import baseline_variants as variants  # noqa: E402
import diffusers_loop_baseline as baseline  # noqa: E402

from dreambooth_trainer.config import config_from_dict  # noqa: E402
from dreambooth_trainer.data import DreamBoothBatches, ImageSet, LatentCache  # noqa: E402
from dreambooth_trainer.models import quiet_libraries  # noqa: E402
from dreambooth_trainer.module import DreamBoothModule  # noqa: E402
from dreambooth_trainer.storage import LocalStorage  # noqa: E402
from dreambooth_trainer.tiny import tiny_tokenizer  # noqa: E402
from dreambooth_trainer.families import FAMILIES, Components  # noqa: E402
from dreambooth_trainer.train import Placement, encode_prompt_embeddings, make_trainer  # noqa: E402

H100_H200_BF16_DENSE_TFLOPS = 989.4  # spec-sheet dense bf16 peak used for MFU
ROUNDS = 3
JOB_CHECKPOINT_EVERY = 50


class StepTimer(pl.Callback):
    """Wall time of optimizer steps (start, stop], synchronised at both ends."""

    def __init__(self, start: int, stop: int | None) -> None:
        self.start, self.stop = start, stop
        self.t0 = self.t1 = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        step = trainer.global_step
        if step in (self.start, self.stop):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if step == self.start:
                self.t0 = time.perf_counter()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            else:
                self.t1 = time.perf_counter()


def random_images(count: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def our_run(dev: str, tiny: bool, per_side: int, max_steps: int, compile_mode: str | None, timer: StepTimer,
            checkpoint_every: int = 10**6, output: Path | None = None) -> tuple[float, float | None, float | None]:
    """Fit our trainer on the baseline's shapes; returns (timed seconds, peak GiB, worst checkpoint stall)."""
    torch.manual_seed(0)
    with torch.device(dev):
        unet, vae, text_encoder, resolution = baseline.build(tiny)
    gpu = dev == "cuda"
    output = output or Path(tempfile.mkdtemp(prefix="bench-"))
    cfg = config_from_dict({
        "data": {"instance_uri": "unused", "instance_prompt": "a photo of sks dog", "resolution": resolution},
        "prior": {"class_prompt": "a photo of dog", "num_class_images": 4},
        "training": {"max_steps": max_steps, "batch_size": per_side, "learning_rate": 5e-6, "cache_latents": True,
                     "mixed_precision": "bf16" if gpu else "no", "channels_last": gpu, "max_grad_norm": None,
                     "compile": compile_mode is not None, "compile_mode": compile_mode or "default"},
        "checkpointing": {"every_n_steps": checkpoint_every, "on_sigterm": False},
        "output": {"uri": str(output), "tensorboard": False},
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
    sd = FAMILIES["sd"]
    pipeline = sd.assemble(Components(unet, vae, [text_encoder], [tokenizer], scheduler))
    module = DreamBoothModule(cfg, sd, pipeline, {"prompt_embeds": embeddings}).to(dev)
    batches = DreamBoothBatches(instance, klass, resolution, True, False, per_side, 0, 0, 1, 0, max_steps, cache)
    place = Placement("gpu" if gpu else "cpu", 1, 1, 0, 1, "nccl" if gpu else "gloo")
    trainer, trigger, _ = make_trainer(cfg, place, LocalStorage(output), True, 0, extra_callbacks=[timer])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=gpu))
    trainer.strategy.checkpoint_io.wait()
    end = timer.t1 if timer.stop is not None else time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    return end - timer.t0, peak, max(trigger.stalls) if trigger.stalls else None


def our_step_case(dev: str, tiny: bool, per_side: int, steps: int, warmup: int, compile_mode: str | None) -> dict:
    seconds, peak, _ = our_run(dev, tiny, per_side, warmup + steps, compile_mode, StepTimer(warmup, warmup + steps))
    per_step = seconds / steps
    return {"case": f"ours per_side={per_side} compile={compile_mode}", "s_per_step": round(per_step, 4),
            "images_per_s": round(2 * per_side / per_step, 2), "peak_gib": None if peak is None else round(peak, 2)}


def our_job_case(dev: str, tiny: bool, per_side: int, steps: int, every: int, folder: Path) -> dict:
    """Steps 2..N timed (step 1 warms up, as the baseline job's does), checkpoints every `every`
    steps written to a local folder, until the last checkpoint is complete."""
    seconds, _, stall = our_run(dev, tiny, per_side, steps, None, StepTimer(1, None), checkpoint_every=every, output=folder)
    return {"case": f"ours job per_side={per_side} steps={steps} checkpoint_every={every}", "seconds": round(seconds, 3),
            "checkpoint_stall_s": None if stall is None else round(stall, 3)}


def baseline_job_case(dev: str, tiny: bool, per_side: int, steps: int, every: int, folder: Path) -> dict:
    return variants.job_case(dev, tiny, per_side, steps, every, folder)


def unet_step_flops(dev: str, tiny: bool, per_side: int) -> float:
    """FLOPs of one UNet forward + backward at this batch: the useful work both sides do, counted
    once with torch's FlopCounterMode (the VAE and text encoder, which ours caches, not counted)."""
    torch.manual_seed(0)
    with torch.device(dev):
        unet, _, te, res = baseline.build(tiny)
    batch = 2 * per_side
    latents = torch.randn(batch, 4, res // 8, res // 8, device=dev)
    hidden = torch.randn(batch, 77, te.config.hidden_size, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    with FlopCounterMode(display=False) as counter, torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        unet(latents, t, hidden).sample.float().square().mean().backward()
    return float(counter.get_total_flops())


def measured_cpu_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """The best fp32 matmul rate of this process's threads (FLOP/s): the CPU's stand-in for a peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: the first call allocates
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def alternate(sides: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Run every side once per round, in turn, `rounds` times; print each run."""
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for round_index in range(rounds):
        for name, run in sides.items():
            try:
                result = run()
            except Exception as error:  # one failing side must not hide the others
                result = {"error": repr(error)[:400]}
            print(json.dumps({"side": name, "round": round_index, **result}), flush=True)
            if "error" not in result:
                results[name].append(result)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def ratio(numerator: list[dict], denominator: list[dict], key: str) -> float | None:
    if not numerator or not denominator:
        return None
    return median_of(numerator, key) / median_of(denominator, key)


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without a GPU)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--modes", default=None, help="our compile modes, comma-separated (GPU default: none,default,reduce-overhead)")
    parser.add_argument("--job-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads for both sides (default 1: on a shared machine OpenMP's spin-waits "
                             "make multi-threaded CPU figures swing tenfold between rounds)")
    args = parser.parse_args()
    quiet_libraries()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    tiny = args.tiny or dev == "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                      "rounds": args.rounds, "cpu_threads": torch.get_num_threads()}), flush=True)
    steps, warmup = (10, 3) if tiny else (20, 8)
    modes = [None if m == "none" else m for m in (args.modes or ("none,default,reduce-overhead" if dev == "cuda" else "none")).split(",")]
    sides: dict[str, Callable[[], dict]] = {
        "baseline": lambda: baseline.train_case(dev, tiny, 1, False, steps, warmup),
        "baseline_cached": lambda: variants.cached_train_case(dev, tiny, 1, steps, warmup),
        "baseline_cached_compiled": lambda: variants.cached_train_case(dev, tiny, 1, steps, warmup + 3, compile_unet=True),
    }
    for mode in modes:
        sides[f"ours_{mode or 'eager'}"] = lambda mode=mode: our_step_case(dev, tiny, 1, steps, warmup + (3 if mode else 0), mode)
    step_results = alternate(sides, args.rounds)
    ours = {name: runs for name, runs in step_results.items() if name.startswith("ours_") and runs}
    best = max(ours, key=lambda name: median_of(ours[name], "images_per_s")) if ours else None

    best_mode = None if best in (None, "ours_eager") else best.removeprefix("ours_")
    wide = alternate({"baseline_4+4": lambda: baseline.train_case(dev, tiny, 4, False, steps, warmup),
                      "ours_4+4": lambda: our_step_case(dev, tiny, 4, steps, warmup + (3 if best_mode else 0), best_mode)}, args.rounds)
    folder = Path(tempfile.mkdtemp(prefix="bench-job-"))
    jobs = alternate({"baseline_job": lambda: baseline_job_case(dev, tiny, 1, args.job_steps, JOB_CHECKPOINT_EVERY, folder / "baseline"),
                      "ours_job": lambda: our_job_case(dev, tiny, 1, args.job_steps, JOB_CHECKPOINT_EVERY, folder / "ours")}, args.rounds)

    figures: dict[str, float | None] = {}
    if best:
        figures["trainer_speedup"] = ratio(ours[best], step_results["baseline"], "images_per_s")
        figures["trainer_speedup_same_work"] = ratio(ours[best], step_results["baseline_cached"], "images_per_s")
        figures["trainer_speedup_tuned"] = ratio(ours[best], step_results["baseline_cached_compiled"], "images_per_s")
    figures["job_speedup"] = ratio(jobs["baseline_job"], jobs["ours_job"], "seconds")
    peak = H100_H200_BF16_DENSE_TFLOPS * 1e12 if dev == "cuda" else measured_cpu_peak_flops()
    for label, per_side, runs in (("1+1", 1, ours.get(best or "", [])), ("4+4", 4, wide["ours_4+4"])):
        flops = unet_step_flops(dev, tiny, per_side)
        achieved = flops / median_of(runs, "s_per_step") if runs else None
        figures[f"mfu_{label}"] = achieved / peak if achieved else None
        print(json.dumps({"flops": f"UNet forward+backward at {label}", "tflop_per_step": round(flops / 1e12, 6),
                          "achieved_tflops": round(achieved / 1e12, 6) if achieved else None,
                          "peak_tflops": round(peak / 1e12, 6),
                          "peak": "spec-sheet dense bf16" if dev == "cuda" else "fp32 matmul measured in this process"}), flush=True)
    print(json.dumps({"best": best, "medians": {name: median_of(runs, "images_per_s" if "job" not in name else "seconds")
                                                for name, runs in {**step_results, **wide, **jobs}.items() if runs}}), flush=True)
    for name, value in figures.items():
        print(f"{name}: {'n/a (that side failed; see its lines above)' if value is None else f'{value:.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
