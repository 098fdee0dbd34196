"""benchmarks/measure.py's rounds: warm-up until both sides are steady, then ABBA order; each round's
ratio, the spread and the median; on a CPU the same ratio per CPU-second of the process (what other
engineers' jobs on a shared machine stretch least), only for rounds where both sides have one."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import measure  # noqa: E402


def scripted(side: str, calls: list[str], results: list[dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """A side returning its results in turn and noting each call; an "error" entry raises."""
    remaining: Iterator[dict[str, Any]] = iter(results)

    def run() -> dict[str, Any]:
        calls.append(side)
        result = next(remaining)
        if "error" in result:
            raise RuntimeError(result["error"])
        return result
    return run


def run(key: str, ours: list[float | None], baseline: list[float | None], warmups: int, rounds: int, **extra: list[Any]) -> tuple[dict[str, Any], list[str]]:
    """run_pair on scripted sides: `ours`/`baseline` hold each call's `key` value (None: the side fails);
    `extra` adds per-call fields (`ours_<field>=[...]`, `baseline_<field>=[...]`; None leaves it out)."""
    def results(side: str, values: list[float | None]) -> list[dict[str, Any]]:
        rows = [{key: value} if value is not None else {"error": "boom"} for value in values]
        for name, per_call in extra.items():
            if name.startswith(side + "_"):
                for row, value in zip(rows, per_call):
                    if value is not None:
                        row[name[len(side) + 1:]] = value
        return rows

    calls: list[str] = []
    pair = measure.Pair("f", scripted("ours", calls, results("ours", ours)), scripted("baseline", calls, results("baseline", baseline)), key=key)
    return measure.run_pair(pair, rounds, warmups), calls


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "emit", lambda record: None)


def test_warm_up_stops_once_both_sides_moved_less_than_the_tolerance_then_rounds_alternate_abba() -> None:
    # warm-up: round 0 (10, 5), round 1 (20, 8): moved; round 2 (21, 8.4): steady -> 3 warm-ups.
    summary, calls = run("images_per_s", ours=[10, 20, 21, 30, 30, 30, 30], baseline=[5, 8, 8.4, 10, 15, 20, 30],
                         warmups=5, rounds=4)
    assert summary["warmup_rounds"] == 3
    assert calls == ["ours", "baseline", "baseline", "ours", "ours", "baseline",  # warm-up, alternating too
                     "ours", "baseline", "baseline", "ours", "ours", "baseline", "baseline", "ours"]
    assert summary["per_round"] == [3.0, 2.0, 1.5, 1.0] and summary["spread"] == [1.0, 3.0]
    assert summary["value"] == 1.75 and summary["rounds"] == 4
    assert summary["ours_median"] == 30 and summary["baseline_median"] == 17.5


def test_warm_up_ends_at_its_limit_when_a_side_keeps_drifting() -> None:
    summary, calls = run("images_per_s", ours=[10, 10, 10, 10], baseline=[1, 2, 4, 4], warmups=3, rounds=1)
    assert summary["warmup_rounds"] == 3 and len(calls) == 8 and summary["per_round"] == [2.5]


def test_lower_is_better_inverts_the_ratio() -> None:
    calls: list[str] = []
    pair = measure.Pair("job", scripted("ours", calls, [{"seconds": 2.0}] * 2), scripted("baseline", calls, [{"seconds": 3.0}] * 2),
                        key="seconds", lower_is_better=True)
    summary = measure.run_pair(pair, 1, 1)
    assert summary["per_round"] == [1.5]


def test_a_failing_run_costs_its_round_not_the_figure() -> None:
    summary, _ = run("images_per_s", ours=[1, 2, None, 2], baseline=[1, 1, 1, 1], warmups=1, rounds=3)
    assert summary["per_round"] == [2.0, 2.0] and summary["rounds"] == 2


def test_the_per_cpu_second_ratio_is_the_median_of_rounds_where_both_sides_have_one() -> None:
    summary, _ = run("images_per_s", ours=[10, 10, 10, 10], baseline=[10, 10, 10, 10], warmups=1, rounds=3,
                     ours_images_per_cpu_s=[1, 30, 30, 40], baseline_images_per_cpu_s=[1, 20, None, 20])
    assert summary["per_round"] == [1.0, 1.0, 1.0]
    assert summary["per_cpu_second_per_round"] == [1.5, 2.0] and summary["per_cpu_second_value"] == 1.75


def test_no_per_cpu_second_figure_without_cpu_seconds() -> None:
    summary, _ = run("images_per_s", ours=[1, 1], baseline=[1, 1], warmups=1, rounds=1)
    assert "per_cpu_second_value" not in summary


def test_per_cpu_second_is_images_over_the_process_cpu_seconds_on_a_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure.torch.cuda, "is_available", lambda: False)
    assert measure.per_cpu_second(60, 1.5) == {"images_per_cpu_s": 40.0}
    assert measure.per_cpu_second(60, 0.0) == {}
    monkeypatch.setattr(measure.torch.cuda, "is_available", lambda: True)
    assert measure.per_cpu_second(60, 1.5) == {}


def test_the_human_line_names_the_spread_and_the_per_cpu_second_figure(capsys: pytest.CaptureFixture[str]) -> None:
    measure.say_summary({"figure": "f", "value": 1.25, "spread": [0.9, 1.5], "per_cpu_second_value": 1.1})
    measure.say_summary({"figure": "g", "value": None, "spread": None})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "f: 1.250  (rounds 0.900-1.500; per CPU-second 1.100)"
    assert lines[1].startswith("g: n/a")
