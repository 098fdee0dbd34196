"""The chart ships the same CRD as crds/ (Helm installs the chart's copy; `make` regenerates crds/)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOP = REPO / "crds"
CHART = REPO / "charts" / "dreambooth-operator" / "crds"


def test_chart_crds_are_a_copy_of_the_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in TOP.glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in CHART.glob("*.yaml")}
    assert top, "crds/ holds no CRD"
    assert chart.keys() == top.keys(), f"chart crds/ has {sorted(chart)}, crds/ has {sorted(top)}"
    stale = [name for name in top if chart[name] != top[name]]
    assert not stale, f"charts/dreambooth-operator/crds differs from crds/ for {stale}: cp crds/*.yaml charts/dreambooth-operator/crds/"
