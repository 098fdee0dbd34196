"""A finished run's checkpoint exported for serving after the fact: `dreambooth export` (issue 22).

`serving.checkpoint` may change after a job succeeded. `best` and a step the job named at its start
were exported by training itself; any other kept step is exported here, by a one-pod Job the
operator runs with the trainer image and the job's own config: from the stored checkpoint (the EMA
average when the run keeps one), laid out as final/ under exports/step-N/, with the run's report
beside it. Idempotent: an export already complete is left as it is.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from .errors import UserInputError

log = logging.getLogger("dreambooth.export")


def chosen_step(checkpoint: str, document: dict[str, Any]) -> int:
    """The step `checkpoint` (best | step-N) stands for in this run; final has its own export."""
    from dreambooth_api.v1alpha1.spec import served_step

    if checkpoint == "final":
        raise UserInputError("serving.checkpoint final: final/ is written by training itself (nothing to export)")
    step = served_step(checkpoint)
    if step is not None:
        return step
    best = (document.get("best") or {}).get("step")
    if best is None:
        raise UserInputError("serving.checkpoint best: this run scored no checkpoint (fidelity.json names no best)")
    return int(best)


def export_for_serving(cfg: Any, checkpoint: str) -> str:
    """Export `checkpoint` of the finished run in cfg.output.uri; returns the export's URI."""
    from dreambooth_api.v1alpha1.spec import served_export_prefix

    from .callbacks import FIDELITY
    from .checkpoint import age_order, complete_checkpoints, step_of
    from .export import export_checkpoint, is_exported
    from .report import REPORT
    from .storage import open_storage

    output = open_storage(cfg.output.uri)
    prefix = served_export_prefix(checkpoint)
    if is_exported(output, prefix):
        log.info("already exported", extra={"export": output.describe(prefix)})
        return output.describe(prefix)
    document = json.loads(output.read_text(FIDELITY)) if output.exists(FIDELITY) else {}
    step = chosen_step(checkpoint, document)
    stored = {step_of(key): key for key in sorted(complete_checkpoints(output), key=age_order)}
    if step not in stored:
        kept = ", ".join(f"step-{s}" for s in sorted(stored)) or "none"
        raise UserInputError(f"serving.checkpoint {checkpoint}: checkpoints/step-{step:08d} is no longer stored "
                             f"(checkpointing.keepLast={cfg.checkpointing.keep_last} pruned it; kept: {kept})")
    uri = export_checkpoint(cfg, output, stored[step], (prefix,))
    if output.exists(REPORT):
        output.write_text(f"{prefix}/{REPORT}", output.read_text(REPORT))
    if document:
        document.setdefault("exports", {})[checkpoint] = prefix
        output.write_text(FIDELITY, json.dumps(document, indent=1))
    log.info("exported", extra={"export": uri, "step": step, "checkpoint": checkpoint})
    return uri
