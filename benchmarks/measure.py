"""What the benchmarks share: the record every figure carries, `dreambooth train` itself timed over a
window of its steps, rounds in ABBA order after a warm-up until steady, per-round ratios and their
spread, FLOPs counted from the shapes a step really runs, JSON lines printed as they are measured.
"""
from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from record import load_average, run_record  # noqa: F401 - the benchmarks take both from here

STEADY_TOLERANCE = 0.10  # a side is warm when its figure moved less than this between two rounds
_observers: list[Any] = []  # diagnostics' callbacks (profile_step.py), put just before the timer


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once (gpu_session.sh files each line as it comes)."""
    print(json.dumps(record), flush=True)


def figure(name: str, value: float | None, **details: Any) -> None:
    """A figure as a JSON line, and `name: value` for humans."""
    emit({"figure": name, "value": None if value is None else round(value, 4), **details})
    say(name, value)


def say(name: str, value: float | None, note: str = "") -> None:
    shown = "n/a (a side failed or was skipped; see the lines above)" if value is None else f"{value:.3f}"
    print(f"{name}: {shown}{f'  ({note})' if note and value is not None else ''}", flush=True)


def say_summary(summary: dict[str, Any]) -> None:
    """A pair's figure for humans: the median, its rounds' spread and, on a CPU, the per-CPU-second median."""
    note = "" if not summary.get("spread") else f"rounds {summary['spread'][0]:.3f}-{summary['spread'][1]:.3f}"
    if summary.get("per_cpu_second_value") is not None:
        note += f"; per CPU-second {summary['per_cpu_second_value']:.3f}"
    say(summary["figure"], summary["value"], note)


# -- timing `dreambooth train` --------------------------------------------------------------------------
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class WindowMeasured(Exception):
    """Raised by the timer once its steps are measured: the run stops there, before the final
    checkpoint and export (gigabytes at full size, and no part of a step's time)."""


def window_timer(warmup: int, steps: int | None, count_flops: bool = False) -> Any:
    """A Lightning callback timing optimizer steps (warmup, warmup + steps], synchronised at both
    ends, optionally counting one more step's FLOPs, then stopping the run. With `steps=None` it
    times a whole job instead: from step `warmup` until the last checkpoint is written."""
    import pytorch_lightning as pl
    from torch.utils.flop_counter import FlopCounterMode

    class WindowTimer(pl.Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = 0.0
            self.cpu0 = self.cpu1 = 0.0  # this process's CPU seconds: on a CPU the device's own work, whatever else runs
            self.peak_gib: float | None = None
            self.flops: dict[str, float] | None = None
            self.optimizer: dict[str, Any] = {}
            self.counter: FlopCounterMode | None = None
            self.last = None if steps is None else warmup + steps + (1 if count_flops else 0)

        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.optimizer = optimizer_implementation(trainer.optimizers[0])

        def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *_: Any) -> None:
            if count_flops and trainer.global_step == warmup + steps:
                self.counter = FlopCounterMode(display=False)
                self.counter.__enter__()

        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *_: Any) -> None:
            step = trainer.global_step
            if step == warmup:
                synchronize()
                self.t0, self.cpu0 = time.perf_counter(), time.process_time()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            elif steps is not None and step == warmup + steps:
                synchronize()
                self.t1, self.cpu1 = time.perf_counter(), time.process_time()
                if torch.cuda.is_available():
                    self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
            if self.counter is not None and step == self.last:
                self.counter.__exit__(None, None, None)
                self.flops = flop_split(self.counter, type(module.denoiser).__name__)
                self.counter = None
            if self.last is not None and step >= self.last:
                raise WindowMeasured()

        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if steps is None:  # a whole job: its last checkpoint (started after the last step) counts
                trainer.strategy.checkpoint_io.wait()
                synchronize()
                self.t1 = time.perf_counter()

    return WindowTimer()


def optimizer_implementation(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Which AdamW kernel a run steps with (fused / foreach / None = torch's default for the device)."""
    return {"class": type(optimizer).__name__, "fused": optimizer.defaults.get("fused"), "foreach": optimizer.defaults.get("foreach")}


@contextlib.contextmanager
def observed_by(callback: Any) -> Iterator[None]:
    """Runs within: `callback` joins every timed run's Trainer just before the timer (diagnostics)."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def timed_training(cfg: Any, timer: Any) -> None:
    """`run_training(cfg)` — the very function `dreambooth train` runs — with `timer` as the first
    callback of the Lightning Trainer it builds; its own log lines are kept out of the figures."""
    from dreambooth_trainer import train

    build = train.make_trainer

    def with_timer(*args: Any, **kwargs: Any) -> Any:
        kwargs["extra_callbacks"] = [*_observers, timer, *(kwargs.get("extra_callbacks") or [])]
        return build(*args, **kwargs)

    train.make_trainer = with_timer
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = train.run_training(cfg)
    except WindowMeasured:
        return
    except Exception as error:
        raise RuntimeError(f"run_training failed: {error!r}; its log ends: {log.getvalue()[-600:]}") from error
    finally:
        train.make_trainer = build
    if code:
        raise RuntimeError(f"run_training exited {code}: {log.getvalue()[-600:]}")


# -- FLOPs ------------------------------------------------------------------------------------------
def flop_split(counter: Any, denoiser_class: str) -> dict[str, float]:
    """The counter's total and the denoiser's share (the work both sides must do; the VAE and text
    encoder, which a cache skips, are the rest). Counted on the shapes the step really ran."""
    counts = counter.get_flop_counts()
    denoiser = sum(sum(per_op.values()) for name, per_op in counts.items() if name == denoiser_class or name.endswith(f".{denoiser_class}"))
    return {"step": float(counter.get_total_flops()), "denoiser": float(denoiser)}


def counted_flops(step: Callable[[], Any], denoiser_class: str) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return flop_split(counter, denoiser_class)


# -- rounds ----------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One figure: ours against its baseline, `key` per run (higher is better unless `lower_is_better`)."""

    figure: str
    ours: Callable[[], dict[str, Any]]
    baseline: Callable[[], dict[str, Any]]
    key: str = "images_per_s"
    lower_is_better: bool = False
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"ours": [], "baseline": []})


def _run(side: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        result = side()
    except Exception as error:  # one failing run must not hide the others
        result = {"error": repr(error)[:600]}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**result, "load_average_1min": load_average()}


def per_cpu_second(images: int, cpu_seconds: float) -> dict[str, float]:
    """On a CPU only: images per CPU-second of this process (its threads' work, not the wall clock
    that other processes on a shared machine stretch)."""
    if torch.cuda.is_available() or cpu_seconds <= 0:
        return {}
    return {"images_per_cpu_s": round(images / cpu_seconds, 3)}


def _steady(previous: dict[str, Any], current: dict[str, Any], key: str) -> bool:
    if key not in previous or key not in current:
        return False
    return abs(current[key] - previous[key]) <= STEADY_TOLERANCE * previous[key]


def run_pair(pair: Pair, rounds: int, max_warmup_rounds: int) -> dict[str, Any]:
    """Warm-up rounds until both sides move less than STEADY_TOLERANCE between two rounds (at most
    `max_warmup_rounds`), then `rounds` measured rounds in ABBA order (ours first in even rounds).
    The figure is the median of the per-round ratios (ours over baseline, in the better direction)."""
    order = {"ours": pair.ours, "baseline": pair.baseline}
    previous: dict[str, dict[str, Any]] = {}
    warmups = 0
    for index in range(max_warmup_rounds):
        current = {}
        for side in (("ours", "baseline") if index % 2 == 0 else ("baseline", "ours")):
            current[side] = _run(order[side])
            emit({"pair": pair.figure, "side": side, "warmup_round": index, **current[side]})
        warmups += 1
        if previous and all(_steady(previous[side], current[side], pair.key) for side in order):
            break
        previous = current
    ratios, cpu_ratios = [], []
    for index in range(rounds):
        current = {}
        for side in (("ours", "baseline") if index % 2 == 0 else ("baseline", "ours")):
            current[side] = _run(order[side])
            emit({"pair": pair.figure, "side": side, "round": index, **current[side]})
            if "error" not in current[side]:
                pair.runs[side].append(current[side])
        if all(pair.key in current[side] for side in order):
            ours, base = current["ours"][pair.key], current["baseline"][pair.key]
            ratios.append(base / ours if pair.lower_is_better else ours / base)
        if all("images_per_cpu_s" in current[side] for side in order):
            cpu_ratios.append(current["ours"]["images_per_cpu_s"] / current["baseline"]["images_per_cpu_s"])
    result = summary(pair, ratios, warmups)
    if cpu_ratios:
        result.update({"per_cpu_second_value": round(statistics.median(cpu_ratios), 4),
                       "per_cpu_second_per_round": [round(r, 4) for r in cpu_ratios]})
    return result


def summary(pair: Pair, ratios: list[float], warmups: int) -> dict[str, Any]:
    def median(side: str) -> float | None:
        values = [run[pair.key] for run in pair.runs[side]]
        return round(statistics.median(values), 4) if values else None

    loads = [run["load_average_1min"] for side in pair.runs.values() for run in side]
    return {"figure": pair.figure, "value": round(statistics.median(ratios), 4) if ratios else None,
            "per_round": [round(r, 4) for r in ratios], "spread": [round(min(ratios), 4), round(max(ratios), 4)] if ratios else None,
            "rounds": len(ratios), "warmup_rounds": warmups, "key": pair.key,
            "ours_median": median("ours"), "baseline_median": median("baseline"),
            "load_average_1min": [min(loads), max(loads)] if loads else None}
