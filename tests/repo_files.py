"""The repository's own files, as git sees them: tests that read the source walk these, never the
working tree, where a demo's test bed keeps pod root filesystems (.testbed/, tens of thousands of
files) and the venv keeps its packages."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_files(*folders: str, suffix: str = "") -> list[Path]:
    """Files under `folders` (all of the repository without any) that git tracks, plus new ones it
    does not ignore (an uncommitted module is checked too); those deleted in the working tree left out."""
    result = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *folders],
                            capture_output=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"git ls-files failed in {REPO} (the tests read the source through git): {result.stderr.decode().strip()}")
    paths = sorted({REPO / name for name in result.stdout.decode().split("\0") if name and name.endswith(suffix)})
    return [path for path in paths if path.is_file()]
