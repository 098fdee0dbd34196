"""The record every benchmark figure carries (date, commit, machine, load, command), without torch:
the operator's benchmark imports it too."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def git_commit() -> str:
    """HEAD's short hash, `-dirty` when tracked files differ from it (the figure is then not of HEAD)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return os.environ.get("BENCH_COMMIT", "unknown (not a git checkout)")
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    torch = sys.modules.get("torch")  # a GPU only where the benchmark itself uses torch
    if torch is not None and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}; {cores} CPU cores ({cpu})"
    return f"CPU only: {cores} cores ({cpu})"


def run_record(argv: list[str] | None = None) -> dict[str, Any]:
    """Date, commit, machine, load and the command: what a figure in RESULTS.md is quoted with."""
    argv = sys.argv if argv is None else argv
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "machine": machine(), "load_average_1min": load_average(),
            **({"torch": sys.modules["torch"].__version__} if "torch" in sys.modules else {}),
            "command": " ".join(shlex.quote(part) for part in ["python", *argv])}


