"""`make demo`: the product's main job on this machine, end to end, with the tiny model.

Trains examples/train-tiny.yaml (prior preservation, checkpoints, export), then generates
images of the learned subject into demo-output/. Prints where everything is.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dreambooth(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("dreambooth")), *args]
    print("$ dreambooth " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "DREAMBOOTH_LOG_FORMAT": "text"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output", type=Path)
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    run = out / "run"
    started = time.monotonic()
    dreambooth("train", "examples/train-tiny.yaml", "--set", f"output.uri={run}")
    prompts = {"subject.png": "a photo of sks toy", "subject-on-the-moon.png": "a photo of sks toy on the moon"}
    for name, prompt in prompts.items():
        dreambooth("generate", "--model", str(run / "final"), "--prompt", prompt, "--steps", "10", "--seed", "1",
                   "--out", str(out / name))
    progress = json.loads((run / "progress.json").read_text())
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s: {progress['step']}/{progress['total_steps']} steps, "
          f"final loss {progress['loss']}")
    print(f"  model (diffusers layout): {run / 'final'}")
    print(f"  checkpoints:              {run / 'checkpoints'} (latest: {(run / 'latest').read_text()})")
    print(f"  metrics and progress:     {run / 'metrics.jsonl'}, {run / 'progress.json'}")
    print(f"  images:                   {', '.join(str(out / name) for name in prompts)}")
    print(f"  remove everything:        rm -rf {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
