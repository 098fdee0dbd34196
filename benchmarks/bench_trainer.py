"""Trainer throughput: `dreambooth train` against diffusers' train_dreambooth.py loop, same process,
same modules, same photos.

Ours is `run_training` itself (what `dreambooth train` and a trainer pod run) on a config at the
defaults users get (gradient clipping 1.0, `mixed_precision: auto`, constant LR, AdamW), reading
the photos from folders, timed over a window of its optimizer steps by a callback; the run stops
after the window (no final checkpoint or export, which are no part of a step). The baseline is the
script's loop as users run it (benchmarks/script_loop.py: per-step data loading, clipping, the LR
scheduler's step, zero_grad, `.item()`), on the same model folder (benchmarks/random_models.py:
the loop's SD1.5 shapes on a GPU, its tiny shapes on a CPU), with the AdamW implementation our run
picked. Every figure is the median of per-round ratios over ABBA rounds after a warm-up until
steady; each round's ratio and the spread are printed.

    python benchmarks/bench_trainer.py                 # GPU: SD1.5 shapes at 512 px; CPU: tiny shapes
    python benchmarks/bench_trainer.py --figures trainer_speedup --rounds 6

Figures (images/s, ours over the baseline, 1 instance + 1 class image per step unless named):
  trainer_speedup            HEADLINE: users' defaults (no latent cache) vs the loop as users run it
  trainer_speedup_same_work  ours with training.cache_latents vs the loop with cached latents and
                             text embeddings: the same FLOPs
  trainer_speedup_tuned      ours cached + training.compile (+ channels_last on a GPU) vs the cached
                             loop with its UNet torch.compile'd (the same backend: inductor, its C++
                             code on a CPU)
  trainer_speedup_4+4        the headline pair at 4 + 4 images (the script's default batch is 4)
  job_speedup                100 steps with a checkpoint every 50, wall time (the loop saves as
                             accelerate's save_state does); CPU only by default (--job-rounds)
  mfu_1+1, mfu_4+4           the UNet's FLOPs per step (counted by torch.utils.flop_counter on the
                             step each side really ran) / ours' seconds per step / the device's peak
                             (spec-sheet dense bf16 on H100/H200; on a CPU the fp32 matmul rate
                             measured here with the same threads)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import measure  # noqa: E402
import random_models  # noqa: E402
import script_loop  # noqa: E402

PROMPTS = ("a photo of sks dog", "a photo of dog")
SPEC_BF16_DENSE_TFLOPS = {"H100": 989.4, "H200": 989.4}  # SXM spec sheets; other cards get no MFU
JOB_STEPS, JOB_CHECKPOINT_EVERY = 100, 50
COMPILE_WARMUP = 3  # more untimed steps for compiled sides: the graphs are made in the first ones


@dataclass
class Setup:
    model_dir: Path
    instance_dir: Path
    class_dir: Path
    device: str
    resolution: int
    steps: int
    warmup: int
    compile_backend: str
    scratch: Path


def photo_folder(folder: Path, count: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def our_config(setup: Setup, per_side: int, max_steps: int, cached: bool, compiled: bool, output: Path,
               checkpoint_every: int = 10**6) -> Any:
    """The defaults users get, plus the case's photos, prompts and step count; validation off (it
    runs before and after the steps, outside every timed window)."""
    from dreambooth_trainer.config import config_from_dict

    gpu = setup.device == "cuda"
    training: dict[str, Any] = {"max_steps": max_steps, "batch_size": per_side, "cache_latents": cached}
    if compiled:
        training.update({"compile": True, "compile_backend": setup.compile_backend, "channels_last": gpu})
    return config_from_dict({
        "model": {"source": str(setup.model_dir)},
        "data": {"instance_uri": str(setup.instance_dir), "instance_prompt": PROMPTS[0], "resolution": setup.resolution},
        "prior": {"class_prompt": PROMPTS[1], "class_uri": str(setup.class_dir), "num_class_images": 4},
        "training": training,
        "checkpointing": {"every_n_steps": checkpoint_every},
        "validation": {"fidelity": False},
        "output": {"uri": str(output), "log_format": "json"},
    })


def fresh_output(setup: Setup) -> Path:
    return Path(tempfile.mkdtemp(prefix="ours-", dir=setup.scratch))


def our_step_case(setup: Setup, per_side: int, cached: bool, compiled: bool, count_flops: bool) -> dict[str, Any]:
    warmup = setup.warmup + (COMPILE_WARMUP if compiled else 0)
    timer = measure.window_timer(warmup, setup.steps, count_flops and not compiled)
    output = fresh_output(setup)
    try:
        measure.timed_training(our_config(setup, per_side, warmup + setup.steps + 2, cached, compiled, output), timer)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    seconds = (timer.t1 - timer.t0) / setup.steps
    kind = "cached + compiled" if compiled else "cached" if cached else "users' defaults"
    return {"case": f"dreambooth train, {kind}, per_side={per_side}", "s_per_step": round(seconds, 5),
            "images_per_s": round(2 * per_side / seconds, 3), **measure.per_cpu_second(2 * per_side * setup.steps, timer.cpu1 - timer.cpu0),
            "peak_gib": None if timer.peak_gib is None else round(timer.peak_gib, 2),
            "optimizer": timer.optimizer, **({"flops": timer.flops} if timer.flops else {})}


def our_job_case(setup: Setup, per_side: int) -> dict[str, Any]:
    """The whole run (checkpoints every 50 steps to a local folder) from step 1 to the last checkpoint written."""
    timer = measure.window_timer(1, None)
    output = fresh_output(setup)
    try:
        measure.timed_training(our_config(setup, per_side, JOB_STEPS, False, False, output, checkpoint_every=JOB_CHECKPOINT_EVERY), timer)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    return {"case": f"dreambooth train job per_side={per_side} steps={JOB_STEPS} checkpoint_every={JOB_CHECKPOINT_EVERY}",
            "seconds": round(timer.t1 - timer.t0, 3), "optimizer": timer.optimizer}


class Sides:
    """Builds each pair's two sides; the baseline steps with the AdamW implementation ours last used,
    and each side's FLOPs are counted once per pair."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.optimizer: dict[str, dict[str, Any]] = {}
        self.flops: dict[tuple[str, str], dict[str, float]] = {}

    def ours(self, pair: str, per_side: int, cached: bool = False, compiled: bool = False) -> Any:
        def run() -> dict[str, Any]:
            result = our_step_case(self.setup, per_side, cached, compiled, count_flops=(pair, "ours") not in self.flops)
            self.optimizer[pair] = result["optimizer"]
            if "flops" in result:
                self.flops[(pair, "ours")] = result["flops"]
            return result
        return run

    def baseline(self, pair: str, per_side: int, cached: bool = False, compiled: bool = False) -> Any:
        def run() -> dict[str, Any]:
            if pair not in self.optimizer:
                raise RuntimeError("ours has not run yet: no AdamW implementation to match")
            s = self.setup
            result = script_loop.train_case(s.model_dir, s.instance_dir, s.class_dir, PROMPTS, per_side, s.steps,
                                            s.warmup + (COMPILE_WARMUP if compiled else 0), s.device, self.optimizer[pair], cached,
                                            s.compile_backend if compiled else None, count_flops=(pair, "baseline") not in self.flops)
            if "flops" in result:
                self.flops[(pair, "baseline")] = result["flops"]
            return result
        return run

    def jobs(self) -> tuple[Any, Any]:
        def ours() -> dict[str, Any]:
            result = our_job_case(self.setup, 1)
            self.optimizer["job_speedup"] = result["optimizer"]
            return result

        def baseline() -> dict[str, Any]:
            s = self.setup
            folder = Path(tempfile.mkdtemp(prefix="script-job-", dir=s.scratch))
            try:
                return script_loop.job_case(s.model_dir, s.instance_dir, s.class_dir, PROMPTS, 1, JOB_STEPS, JOB_CHECKPOINT_EVERY,
                                            folder, s.device, self.optimizer["job_speedup"])
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return ours, baseline


def measured_cpu_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """The best fp32 matmul rate of this process's threads (FLOP/s): the CPU's stand-in for a peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # the first call allocates
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def device_peak(device: str) -> tuple[float | None, str]:
    if device == "cpu":
        return measured_cpu_peak_flops(), f"fp32 1024^3 matmul measured in this process, {torch.get_num_threads()} thread(s)"
    name = torch.cuda.get_device_name()
    for card, tflops in SPEC_BF16_DENSE_TFLOPS.items():
        if card in name:
            return tflops * 1e12, f"{card} spec-sheet dense bf16"
    return None, f"no spec-sheet peak known for {name}"


def report_mfu(label: str, pair: str, summary: dict[str, Any], sides: Sides, peak: float | None, peak_note: str) -> None:
    """The FLOPs each side's step really ran, and ours' denoiser FLOPs per second over the peak."""
    counts = {side: sides.flops.get((pair, side)) for side in ("ours", "baseline")}
    ours_seconds = 2 * int(label[0]) / summary["ours_median"] if summary.get("ours_median") else None
    for side, count in counts.items():
        measure.emit({"flops": f"one optimizer step at {label}", "side": side, "counted_by": "torch.utils.flop_counter.FlopCounterMode",
                    "step_tflop": None if count is None else round(count["step"] / 1e12, 6),
                    "denoiser_tflop": None if count is None else round(count["denoiser"] / 1e12, 6)})
    ours = counts["ours"]
    value = None
    if ours and ours_seconds and peak:
        value = ours["denoiser"] / ours_seconds / peak
    measure.figure(f"mfu_{label}", value, achieved_tflops=None if not (ours and ours_seconds) else round(ours["denoiser"] / ours_seconds / 1e12, 6),
                 peak_tflops=None if peak is None else round(peak / 1e12, 4), peak=peak_note,
                 denoiser_tflop_per_step=None if not ours else round(ours["denoiser"] / 1e12, 6), s_per_step=ours_seconds)


def quiet() -> None:
    """The trainer's own quieting, and the progress bars of loading and saving the model folder."""
    from huggingface_hub.utils import disable_progress_bars
    import transformers

    from dreambooth_trainer.models import quiet_libraries

    quiet_libraries()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without a GPU)")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per figure (ABBA order)")
    parser.add_argument("--max-warmup-rounds", type=int, default=3, help="warm-up rounds at most, until both sides are steady")
    parser.add_argument("--compiled-warmup-rounds", type=int, default=None,
                        help="the same for the compiled pair (default: --max-warmup-rounds; its runs warm up inside too)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (CPU 30, GPU 20)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first in each run (CPU 5, GPU 8)")
    parser.add_argument("--figures", default="trainer_speedup,trainer_speedup_same_work,trainer_speedup_tuned,trainer_speedup_4+4,job_speedup",
                        help="which figures, comma-separated")
    parser.add_argument("--job-rounds", type=int, default=None, help="measured rounds of the job case (CPU: --rounds; GPU: 0)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for both compiled sides")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "dreambooth-bench-models",
                        help="where the random model folder is saved (reused)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads for both sides (default 1: on a shared machine OpenMP's spin-waits "
                             "make multi-threaded CPU figures swing tenfold between rounds)")
    args = parser.parse_args()
    quiet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    tiny = args.tiny or device == "cpu"
    measure.emit({"record": measure.run_record(), "cpu_threads": torch.get_num_threads()})
    family = "sd15-tiny" if tiny else "sd15"
    measure.emit({"model": random_models.saved(family, args.models / family)})
    model_dir = args.models / family
    resolution = 16 if tiny else 512
    scratch = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    setup = Setup(model_dir, photo_folder(scratch / "instance", 4, resolution, 1), photo_folder(scratch / "class", 4, resolution, 2),
                  device, resolution, args.steps or (30 if tiny else 20), args.warmup_steps or (5 if tiny else 8), args.compile_backend, scratch)
    sides = Sides(setup)
    ours_job, baseline_job = sides.jobs()
    pairs = {
        "trainer_speedup": measure.Pair("trainer_speedup", sides.ours("trainer_speedup", 1), sides.baseline("trainer_speedup", 1)),
        "trainer_speedup_same_work": measure.Pair("trainer_speedup_same_work", sides.ours("trainer_speedup_same_work", 1, cached=True),
                                                  sides.baseline("trainer_speedup_same_work", 1, cached=True)),
        "trainer_speedup_tuned": measure.Pair("trainer_speedup_tuned", sides.ours("trainer_speedup_tuned", 1, cached=True, compiled=True),
                                              sides.baseline("trainer_speedup_tuned", 1, cached=True, compiled=True)),
        "trainer_speedup_4+4": measure.Pair("trainer_speedup_4+4", sides.ours("trainer_speedup_4+4", 4), sides.baseline("trainer_speedup_4+4", 4)),
        "job_speedup": measure.Pair("job_speedup", ours_job, baseline_job, key="seconds", lower_is_better=True),
    }
    job_rounds = args.job_rounds if args.job_rounds is not None else (args.rounds if device == "cpu" else 0)
    wanted = [name for name in args.figures.split(",") if name]
    unknown = set(wanted) - set(pairs)
    if unknown:
        parser.error(f"unknown figures {sorted(unknown)}; known: {sorted(pairs)}")
    if args.compiled_warmup_rounds is None:
        args.compiled_warmup_rounds = args.max_warmup_rounds
    summaries: dict[str, dict[str, Any]] = {}
    try:
        for name in wanted:
            rounds = job_rounds if name == "job_speedup" else args.rounds
            if rounds == 0:
                measure.emit({"figure": name, "value": None, "skipped": "0 rounds asked for"})
                continue
            warmup_rounds = args.compiled_warmup_rounds if name == "trainer_speedup_tuned" else args.max_warmup_rounds
            summaries[name] = measure.run_pair(pairs[name], rounds, warmup_rounds)
            measure.emit(summaries[name])
        peak, note = device_peak(device)
        for label, pair in (("1+1", "trainer_speedup"), ("4+4", "trainer_speedup_4+4")):
            if pair in summaries:
                report_mfu(label, pair, summaries[pair], sides, peak, note)
        for summary in summaries.values():
            measure.say_summary(summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
