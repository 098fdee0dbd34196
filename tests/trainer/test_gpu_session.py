"""benchmarks/gpu_session.sh works before any GPU sees it: its dry run (tiny shapes, CPU) runs every
part to exit 0 and files every figure as a JSON line; a failing part fails the script, whatever pipe
its output goes through."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
PARTS = ["prepare", "bench-trainer", "family-sdxl", "family-flux", "bench-serve", "many-subjects", "gpu-tests"]
FIGURES = ["trainer_speedup", "trainer_speedup_tuned", "trainer_speedup_same_work", "mfu_1+1", "sdxl_lora_speedup",
           "flux_lora_speedup", "serve_speedup", "serve_speedup_vs_one_at_a_time"]


def run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env={**os.environ, "OUT": str(out), **env},
                          capture_output=True, text=True, timeout=1500)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(1600)
def test_the_dry_run_runs_every_part_and_files_every_figure_as_it_goes(tmp_path: Path) -> None:
    result = run_script(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    parts = jsonl(tmp_path / "parts.jsonl")
    assert [p["part"] for p in parts] == PARTS
    assert all(p["exit"] == 0 and p["seconds"] <= p["budget_s"] for p in parts), parts
    figures = jsonl(tmp_path / "figures.jsonl")
    values = {line["figure"]: line["value"] for line in figures if "figure" in line}
    missing = [name for name in FIGURES if not isinstance(values.get(name), float)]
    assert not missing, f"figures without a value: {missing}; {values}"
    spreads = {line["figure"]: line for line in figures if line.get("figure", "").endswith("speedup")}
    assert all(len(line["per_round"]) == line["rounds"] and line["spread"][0] <= line["value"] <= line["spread"][1]
               for line in spreads.values()), spreads
    records = [line["record"] for line in figures if "record" in line]
    assert {line["part"] for line in figures if "record" in line} >= {"bench-trainer", "family-sdxl", "family-flux", "bench-serve"}
    assert all(set(record) >= {"date", "commit", "machine", "load_average_1min", "command"} for record in records)
    flops = [line for line in figures if isinstance(line.get("flops"), str) and line["part"] == "bench-trainer"]
    assert {line["side"] for line in flops} == {"ours", "baseline"}
    assert len({line["denoiser_tflop"] for line in flops}) == 1, "both sides' UNet FLOPs are counted on the same shapes"
    assert (tmp_path / "tests.xml").exists() and "[gpu-session]" in (tmp_path / "console.log").read_text()


def test_a_failing_part_is_recorded_and_fails_the_script(tmp_path: Path) -> None:
    """Every Python part exits 3 at start-up (a sitecustomize): the parts' pipes must not hide it."""
    failing = tmp_path / "site"
    failing.mkdir()
    (failing / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    result = run_script(tmp_path / "out", "--dry-run", GPU_SESSION_PARTS="prepare,bench-serve", PYTHONPATH=str(failing))
    assert result.returncode == 1, result.stdout[-2000:]
    parts = {p["part"]: p for p in jsonl(tmp_path / "out" / "parts.jsonl")}
    assert parts["prepare"]["exit"] == 3 and parts["bench-serve"]["exit"] == 3
    assert parts["bench-trainer"] == {"part": "bench-trainer", "skipped": "not in GPU_SESSION_PARTS"}
