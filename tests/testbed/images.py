"""The images pods on real-0 run: built from this checkout by images/build.py (`make images`).

A build of an unchanged tree rebuilds nothing (seconds); after a code change only the layer
holding the project's own packages is rebuilt, so tests always run the checkout's code.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "images" / "build.py"
RECORD = REPO / "build" / "images.json"


def built_images(*names: str) -> dict[str, str]:
    """{name: unique image ref} for `names` (all three by default), built first where stale."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(BUILD), *names], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"images/build.py {' '.join(names)} failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    print(f"\n[images] {' '.join(names) or 'all'} ready in {time.monotonic() - start:.1f} s", file=sys.stderr)
    recorded = json.loads(RECORD.read_text())["images"]
    return {name: entry["ref"] for name, entry in recorded.items() if not names or name in names}
