"""`python -m tests.testbed up|down|status [--root DIR]`: what `make testbed-up`/`testbed-down` run."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tests.testbed.cluster import DEFAULT_ROOT, Testbed, build_binaries, marked_pids
from tests.testbed.images import RECORD
from tests.testbed.kueue import start_kueue


def load_recorded_images(bed: Testbed) -> None:
    """Import the images build/images.json records (`make images`) into real-0's containerd."""
    if not RECORD.exists():
        print("no images recorded yet (make images); real-0 runs only what is imported later")
        return
    refs = [entry["ref"] for entry in json.loads(RECORD.read_text())["images"].values()]
    start = time.monotonic()
    runnable = bed.load_images(refs)
    print(f"images runnable on real-0 ({time.monotonic() - start:.0f} s): {' '.join(runnable)}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("TESTBED_ROOT", DEFAULT_ROOT)))
    parser.add_argument("--name", default=os.environ.get("TESTBED_NAME", "dreambooth-testbed"))
    parser.add_argument("--no-build", action="store_true", help="do not run build.sh first")
    args = parser.parse_args()
    bed = Testbed(args.root, name=args.name)
    if args.command == "up":
        build_s = 0.0 if args.no_build else build_binaries()
        print(f"test-bed binaries: {build_s:.0f} s (build.sh; a warm cache does nothing)", flush=True)
        if bed.is_up():
            print(f"test bed already up: source {bed.env_file}")
            return 0
        start_s = bed.start()
        print(f"test bed started in {start_s:.1f} s")
        if os.environ.get("TESTBED_IMAGES", "1") != "0":  # what `make images` built, runnable on real-0
            load_recorded_images(bed)
        if os.environ.get("TESTBED_KUEUE", "1") != "0":
            start_kueue(bed, gpus=int(os.environ.get("TESTBED_KUEUE_GPUS", "16")))
        print(bed.kubectl("get", "nodes", "-o", "wide").stdout, end="")
        print(f"use it: source {bed.env_file}   (kubectl, helm, KUBECONFIG, MinIO endpoint/credentials)")
        return 0
    if args.command == "down":
        t0 = time.monotonic()
        left = bed.stop()
        if left:
            print(f"processes still running after testbed-down: {left}", file=sys.stderr)
            return 1
        print(f"test bed down in {time.monotonic() - t0:.1f} s; no test-bed process left")
        return 0
    up = bed.is_up()
    print(f"test bed at {bed.root}: {'up' if up else 'down'}; marked processes: {marked_pids(bed.root)}")
    return 0 if up else 1


if __name__ == "__main__":
    sys.exit(main())
