"""Where a step's time goes, ours (`run_training`, as bench_trainer runs it) beside the train_dreambooth.py
loop, over the timed steps only (diagnostics; the figures come from bench_trainer.py).

    python benchmarks/profile_step.py --cached --compiled               # CPU time per phase, both sides
    python benchmarks/profile_step.py --cached --compiled --cprofile    # cProfile of ours' timed steps
    python benchmarks/profile_step.py --cprofile --baseline             # ... of the loop's

Phases: the main thread's CPU time (time.thread_time, which other processes on a shared machine
stretch least; with one intra-op thread it is all of a step's compute) of each call to what both
sides run (the denoiser's forward, backward, gradient clipping, AdamW's kernel, zero_grad, the LR
scheduler) and of ours' Lightning machinery (batch fetch, callback hooks), as medians per step. A
cProfile of a whole run (set-up, compile) blames whatever function the compiler or the garbage
collector lands in; hence the window.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import contextlib
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench_trainer as bench  # noqa: E402
import measure  # noqa: E402
import random_models  # noqa: E402
import script_loop  # noqa: E402

PhaseTimes = dict[str, list[float]]


@contextlib.contextmanager
def patched(owner: Any, name: str, label: str, times: PhaseTimes) -> Iterator[None]:
    """`owner.name` timed in main-thread CPU seconds per call into `times[label]`, for the block."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            times[label].append(time.thread_time() - started)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def phase_hooks(times: PhaseTimes) -> list[tuple[Any, str, str]]:
    """(owner, attribute, label) of every timed phase; none is inside a compiled region."""
    import pytorch_lightning.loops.training_epoch_loop as epoch_loop
    import pytorch_lightning.trainer.call as lightning_call
    import pytorch_lightning.utilities.combined_loader as combined_loader
    import torch
    import torch.optim.adam as adam

    from dreambooth_trainer.families.sd import StableDiffusion
    from dreambooth_trainer.module import DreamBoothModule

    return [(torch.Tensor, "backward", "backward"), (torch.nn.utils, "clip_grad_norm_", "gradient clipping"),
            (adam, "_fused_adam", "AdamW kernel (fused)"), (adam, "_multi_tensor_adam", "AdamW kernel (foreach)"),
            (torch.optim.Optimizer, "zero_grad", "zero_grad"), (torch.optim.lr_scheduler.LRScheduler, "step", "LR scheduler step"),
            (StableDiffusion, "predict", "denoiser forward"), (DreamBoothModule, "compute_loss", "ours: forward + loss"),
            (combined_loader.CombinedLoader, "__next__", "ours: Lightning batch fetch"),
            (lightning_call, "_call_callback_hooks", "ours: Lightning callback hooks"),
            (epoch_loop._TrainingEpochLoop, "_update_learning_rates", "ours: Lightning LR update"),
            (script_loop.ScriptLoop, "step", "step")]


def step_ticks(times: PhaseTimes) -> Any:
    """Ours' whole step: main-thread CPU from one batch's start to the next's."""
    import pytorch_lightning as pl

    class StepTicks(pl.Callback):
        def __init__(self) -> None:
            self.last: float | None = None

        def on_train_batch_start(self, *_: Any) -> None:
            now = time.thread_time()
            if self.last is not None:
                times["step"].append(now - self.last)
            self.last = now
    return StepTicks()


@contextlib.contextmanager
def loop_denoiser_timed(times: PhaseTimes) -> Iterator[None]:
    """The loop calls its (possibly compiled) UNet as `self.model(...)`: that call, timed."""
    original = script_loop.ScriptLoop.__init__

    def init(self: script_loop.ScriptLoop, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        model = self.model

        def denoise(*a: Any, **k: Any) -> Any:
            started = time.thread_time()
            try:
                return model(*a, **k)
            finally:
                times["denoiser forward"].append(time.thread_time() - started)
        self.model = denoise

    script_loop.ScriptLoop.__init__ = init
    try:
        yield
    finally:
        script_loop.ScriptLoop.__init__ = original


def phases(side: Callable[[], dict[str, Any]], steps: int, ours: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """Run one side with every phase timed; per-phase medians over its last `steps` calls (the timed ones)."""
    times: PhaseTimes = collections.defaultdict(list)
    with contextlib.ExitStack() as stack:
        for owner, name, label in phase_hooks(times):
            stack.enter_context(patched(owner, name, label, times))
        stack.enter_context(measure.observed_by(step_ticks(times)) if ours else loop_denoiser_timed(times))
        result = side()
    return result, {label: statistics.median(values[-steps:]) for label, values in sorted(times.items()) if values}


def print_phases(name: str, result: dict[str, Any], medians: dict[str, float]) -> None:
    cpu = f"; process CPU {2 * 1e3 / result['images_per_cpu_s']:.2f} ms/step" if "images_per_cpu_s" in result else ""
    print(f"{name}: wall {result['s_per_step'] * 1e3:.2f} ms/step{cpu}; main-thread CPU per call, median:")
    for label, seconds in medians.items():
        print(f"    {label:<34} {seconds * 1e3:8.2f} ms")


def profiled_window(warmup: int, steps: int, profile: cProfile.Profile) -> Any:
    """Profiles ours' steps (warmup, warmup + steps]; runs before the bench's timer, which ends the run."""
    import pytorch_lightning as pl

    class ProfiledWindow(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == warmup:
                profile.enable()
            elif trainer.global_step == warmup + steps:
                profile.disable()
    return ProfiledWindow()


def profile_loop(setup: bench.Setup, per_side: int, cached: bool, compiled: bool, profile: cProfile.Profile) -> None:
    optimizer = {"fused": True} if setup.device == "cpu" else {}  # what ours picks at the defaults
    loop = script_loop.ScriptLoop(script_loop.load(setup.model_dir, setup.device), setup.instance_dir, setup.class_dir, bench.PROMPTS,
                                  per_side, setup.device, optimizer, cached, setup.compile_backend if compiled else None)
    try:
        for _ in range(setup.warmup + (bench.COMPILE_WARMUP if compiled else 0)):
            loop.step()
        profile.runcall(lambda: [loop.step() for _ in range(setup.steps)])
    finally:
        loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", action="store_true", help="training.cache_latents / the loop's cached latents and text")
    parser.add_argument("--compiled", action="store_true", help="training.compile / the loop's UNet torch.compile'd (inductor)")
    parser.add_argument("--per-side", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--cprofile", action="store_true", help="cProfile of the timed steps instead of the phases")
    parser.add_argument("--baseline", action="store_true", help="with --cprofile: the loop's steps, not ours")
    parser.add_argument("--top", type=int, default=40, help="cProfile rows")
    args = parser.parse_args()
    bench.quiet()
    device = "cuda" if bench.torch.cuda.is_available() else "cpu"
    if device == "cpu":
        bench.torch.set_num_threads(1)
    family = "sd15-tiny" if device == "cpu" else "sd15"
    models = Path(tempfile.gettempdir()) / "dreambooth-bench-models" / family
    random_models.saved(family, models)
    scratch = Path(tempfile.mkdtemp(prefix="profile-step-"))
    resolution = 16 if device == "cpu" else 512
    setup = bench.Setup(models, bench.photo_folder(scratch / "instance", 4, resolution, 1), bench.photo_folder(scratch / "class", 4, resolution, 2),
                        device, resolution, args.steps, 5, "inductor", scratch)
    warmup = setup.warmup + (bench.COMPILE_WARMUP if args.compiled else 0)
    ours = lambda: bench.our_step_case(setup, args.per_side, args.cached, args.compiled, False)  # noqa: E731
    if args.cprofile:
        profile = cProfile.Profile()
        if args.baseline:
            profile_loop(setup, args.per_side, args.cached, args.compiled, profile)
        else:
            with measure.observed_by(profiled_window(warmup, args.steps, profile)):
                ours()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
        return 0
    ours_result, ours_phases = phases(ours, args.steps, ours=True)
    loop = lambda: script_loop.train_case(models, setup.instance_dir, setup.class_dir, bench.PROMPTS, args.per_side, args.steps,  # noqa: E731
                                          warmup, device, ours_result["optimizer"], args.cached, "inductor" if args.compiled else None)
    loop_result, loop_phases = phases(loop, args.steps, ours=False)
    print_phases("ours", ours_result, ours_phases)
    print_phases("train_dreambooth.py loop", loop_result, loop_phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
