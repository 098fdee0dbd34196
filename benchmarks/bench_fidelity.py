"""What scoring fidelity at each checkpoint costs, as a share of a training step, on the tiny example.

One run of examples/train-tiny.yaml per prompt set (its five prompts, then the paper's 25), a
checkpoint every EVERY steps. metrics.jsonl stamps each optimizer step's end, so a step's time
is the gap to the previous one; a scored step's gap minus the median unscored gap is the
scoring's extra time (its images: the instance and class prompts' rows and the prompt set,
drawn at validation.steps, then embedded by both backbones).

    python benchmarks/bench_fidelity.py [--steps 40] [--every 10]

Prints one JSON line per prompt set: median step seconds, median extra seconds per scored
checkpoint, and their ratio (`checkpoint_cost_in_steps`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.train import run_training

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train-tiny.yaml"


def measure(prompts: list[str] | None, steps: int, every: int, folder: Path) -> dict[str, float | int | str]:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["data"]["instance_uri"] = str(REPO / data["data"]["instance_uri"])
    data["training"]["max_steps"] = steps
    data["checkpointing"] = {"every_n_steps": every, "keep_last": 2}
    data["validation"]["prompts"] = []
    if prompts is not None:
        data["validation"]["fidelity"]["prompts"] = prompts
    data["output"] = {"uri": str(folder), "tensorboard": False, "progress_every_seconds": 10}
    assert run_training(config_from_dict(data)) == 0
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    times = {line["step"]: line["time"] for line in lines if "time" in line}
    gaps = {step: times[step] - times[step - 1] for step in times if step - 1 in times}
    scored = [gaps[step] for step in gaps if step % every == 0 and step < steps]
    plain = [gap for step, gap in gaps.items() if step % every and step % every != 1]  # not right after a checkpoint write either
    step_s, extra_s = statistics.median(plain), statistics.median(scored) - statistics.median(plain)
    count = len(data["validation"]["fidelity"]["prompts"]) or 25  # []: the paper's 25
    return {"prompts": count, "steps_per_scoring": data["validation"]["steps"], "step_seconds": round(step_s, 4),
            "checkpoint_extra_seconds": round(extra_s, 3), "checkpoint_cost_in_steps": round(extra_s / step_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for name, prompts in (("example", None), ("paper", [])):
            row = measure(prompts, args.steps, args.every, Path(root) / name)
            print(json.dumps({"set": name, **row}), flush=True)


if __name__ == "__main__":
    main()
