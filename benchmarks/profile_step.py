"""Where does one of our runs spend host time? cProfile over bench_trainer's `our_step_case` (diagnostics).

    python benchmarks/profile_step.py [--cached] [--compiled] [--per-side N]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_trainer as bench  # noqa: E402
import random_models  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", action="store_true")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--per-side", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
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
                        device, resolution, args.steps, 3, "inductor", scratch)
    profile = cProfile.Profile()
    profile.runcall(bench.our_step_case, setup, args.per_side, args.cached, args.compiled, False)
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
