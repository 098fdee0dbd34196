"""Which checkpoint is the best: `validation.fidelity.select` over the scores of each checkpoint.

The rule names one score (DINO, CLIP-I, CLIP-T: higher is better; pixel: lower is better) and an
optional CLIP-T floor: a checkpoint that copies the photos scores high on DINO and CLIP-I but
ignores the prompt ("a sks dog in the jungle" drawn without the jungle), so its CLIP-T falls.
Step 0 (the base model, before training) is scored but is never a checkpoint.

The ledger holds every scored step for rank 0: the validation callback adds to it, the checkpoint
writer reads it (pruning keeps the best), the progress record and fidelity.json report it.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import UserInputError

SCORE_FIGURES = {
    "dino": "fidelity/dino",
    "clip-i": "fidelity/clip_i",
    "clip-t": "fidelity/clip_t",
    "pixel": "fidelity/instance_distance",
}
LOWER_IS_BETTER = frozenset({"pixel"})
CLIP_T = SCORE_FIGURES["clip-t"]
# metrics.jsonl figure -> status.fidelity key (camelCase in the CRD)
STATUS_KEYS = {
    "fidelity/dino": "dino",
    "fidelity/clip_i": "clipI",
    "fidelity/clip_t": "clipT",
    "fidelity/instance_distance": "pixel",
    "fidelity/prior_similarity": "priorSimilarity",
    "fidelity/prior_diversity": "priorDiversity",
}


@dataclass(frozen=True)
class Rule:
    score: str  # dino | clip-i | clip-t | pixel
    min_clip_t: float | None = None

    @property
    def figure(self) -> str:
        return SCORE_FIGURES[self.score]

    def text(self) -> str:
        direction = "lowest" if self.score in LOWER_IS_BETTER else "highest"
        floor = f", CLIP-T >= {self.min_clip_t:g}" if self.min_clip_t is not None else ""
        return f"{direction} {self.score}{floor}"

    def eligible(self, figures: dict[str, Any]) -> bool:
        return self.min_clip_t is None or (figures.get(CLIP_T) is not None and figures[CLIP_T] >= self.min_clip_t)

    def key(self, figures: dict[str, Any]) -> float:
        value = float(figures[self.figure])
        return -value if self.score in LOWER_IS_BETTER else value


def resolve_rule(select: Any, has_dino: bool, has_clip: bool) -> Rule:
    """`validation.fidelity.select` with `auto` made concrete; a score without its backbone is refused by name."""
    score = select.score
    if score == "auto":
        score = "dino" if has_dino else "clip-i" if has_clip else "pixel"
    needs = {"dino": ("dino", has_dino), "clip-i": ("clip", has_clip), "clip-t": ("clip", has_clip)}
    if score in needs and not needs[score][1]:
        raise UserInputError(f"validation.fidelity.select.score {score} needs validation.fidelity.models.{needs[score][0]}")
    if select.min_clip_t is not None and not has_clip:
        raise UserInputError("validation.fidelity.select.min_clip_t needs validation.fidelity.models.clip (CLIP-T is a CLIP score)")
    return Rule(score, select.min_clip_t)


@dataclass(frozen=True)
class Choice:
    step: int
    figures: dict[str, Any]
    floor_met: bool = True


def best_checkpoint(rows: Iterable[dict[str, Any]], rule: Rule, candidates: set[int] | None = None) -> Choice | None:
    """The best scored checkpoint among `candidates` (all scored steps after 0 when None). When none
    meets the CLIP-T floor, the one closest to it (highest CLIP-T), marked floor_met=False."""
    scored = [row for row in rows if row["step"] > 0 and row.get(rule.figure) is not None
              and (candidates is None or row["step"] in candidates)]
    if not scored:
        return None
    eligible = [row for row in scored if rule.eligible(row)]
    if eligible:
        # Ties go to the earlier step: it is the one less likely overfitted.
        row = max(eligible, key=lambda r: (rule.key(r), -r["step"]))
        return Choice(row["step"], row, True)
    row = max(scored, key=lambda r: (r.get(CLIP_T) if r.get(CLIP_T) is not None else float("-inf"), -r["step"]))
    return Choice(row["step"], row, False)


def status_scores(step: int, figures: dict[str, Any]) -> dict[str, Any]:
    """A step's figures as status.fidelity.latest/best (camelCase keys, rounded)."""
    scores: dict[str, Any] = {"step": step}
    scores.update({key: round(float(figures[name]), 4) for name, key in STATUS_KEYS.items() if figures.get(name) is not None})
    return scores


class FidelityLedger:
    """Every scored step of this run (and of earlier runs it resumes), shared by rank 0's threads."""

    def __init__(self, rule: Rule | None, checkpoint_every: int, max_steps: int, backbones: dict[str, Any] | None = None,
                 rows: Iterable[dict[str, Any]] = ()):
        self.rule = rule
        self.checkpoint_every, self.max_steps = checkpoint_every, max_steps
        self.backbones = backbones or {}
        # Set at the end of the run: the checkpoints still stored and where the exports are.
        self.kept: set[int] | None = None
        self.exports: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._rows: dict[int, dict[str, Any]] = {}
        self.load(rows)

    def load(self, lines: Iterable[dict[str, Any]]) -> None:
        """Scores from metrics.jsonl lines (an earlier run's, on resume)."""
        for line in lines:
            self.add(line["step"], {k: v for k, v in line.items() if k.startswith("fidelity/") and isinstance(v, (int, float))})

    def add(self, step: int, figures: dict[str, Any]) -> None:
        if not figures:
            return
        with self._lock:
            self._rows.setdefault(step, {"step": step}).update(figures)

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(self._rows[step]) for step in sorted(self._rows)]

    def is_checkpoint_step(self, step: int) -> bool:
        return step > 0 and (step % self.checkpoint_every == 0 or step == self.max_steps)

    def best(self, candidates: set[int] | None = None) -> Choice | None:
        """The best checkpoint (scheduled checkpoint steps; or `candidates`, e.g. those still stored)."""
        if self.rule is None:
            return None
        rows = [row for row in self.rows() if self.is_checkpoint_step(row["step"])]
        return best_checkpoint(rows, self.rule, candidates)

    def protected_steps(self) -> set[int]:
        """What checkpoint pruning must keep: the best so far."""
        choice = self.best()
        return {choice.step} if choice else set()

    def summary(self) -> dict[str, Any] | None:
        """The latest and the best scores, the rule and the backbones (progress.json, then status.fidelity)."""
        rows = self.rows()
        if not rows:
            return None
        latest = rows[-1]
        summary: dict[str, Any] = {"latest": status_scores(latest["step"], latest),
                                   "backbones": {kind: f"{b['name']}@{b['revision']} (scale {b['scale']:g})" for kind, b in self.backbones.items()}}
        if self.rule is not None:
            summary["select"] = self.rule.text()
            choice = self.best()
            if choice is not None:
                summary["best"] = status_scores(choice.step, choice.figures)
                summary["best"]["floorMet"] = choice.floor_met
                value = choice.figures[self.rule.figure]
                summary["summary"] = f"{self.rule.score} {value:.3f} @{choice.step}" + ("" if choice.floor_met else " (below floor)")
        return summary
