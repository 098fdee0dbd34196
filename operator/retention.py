"""What is deleted with a DreamboothJob (spec.retention), decided purely.

A job whose retention deletes anything carries the finalizer `dreambooth.dev/data-retention`
from its first reconcile; `kubectl delete dbj` then waits while the operator deletes the job's
output prefix (outputs: Delete) and the subject photos under data.instanceUri (subjectPhotos:
Delete). The finalizer never holds a deletion for long: after RELEASE_AFTER_SECONDS of failed
tries (storage down, the credentials Secret deleted with the namespace) the operator posts a
Warning Event naming what was left and lets the job go. Retain (the default) keeps everything
and puts no finalizer on the job.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dreambooth_api.v1alpha1.spec import RetentionSpec

FINALIZER = "dreambooth.dev/data-retention"
# How long a deletion may wait for the data to go before the job is let go with a Warning.
RELEASE_AFTER_SECONDS = 300.0
RETRY_SECONDS = 10.0
# The subject's training inputs under data.instanceUri: the photos and their caption files.
SUBJECT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".txt")


def deletes_anything(retention: RetentionSpec) -> bool:
    return retention.outputs == "Delete" or retention.subject_photos == "Delete"


def finalizers_wanted(finalizers: list[str], retention: RetentionSpec) -> list[str] | None:
    """The job's finalizers as retention wants them, or None when they are right already."""
    present = FINALIZER in finalizers
    if deletes_anything(retention) == present:
        return None
    return [*finalizers, FINALIZER] if not present else [f for f in finalizers if f != FINALIZER]


@dataclass(frozen=True)
class Release:
    """What to do with a job being deleted that still carries the finalizer."""

    prefixes: tuple[tuple[str, str], ...]  # (what, s3:// URI) to delete now
    let_go: bool  # remove the finalizer
    warning: str = ""  # a Warning Event to post (data left behind)
    retry_in: float | None = None


def release(status: dict[str, Any], spec_retention: RetentionSpec | None, instance_uri: str | None,
            deleting_since: datetime, now: datetime, last_error: str = "") -> Release:
    """The data still to delete for a job being deleted, or letting it go (bounded)."""
    output = status.get("outputUri")
    if spec_retention is None:
        return Release((), True, "spec.retention could not be read: nothing was deleted with the job" if output else "")
    prefixes: list[tuple[str, str]] = []
    if spec_retention.outputs == "Delete" and output:
        prefixes.append(("outputs", output))
    if spec_retention.subject_photos == "Delete" and instance_uri:
        prefixes.append(("subject photos", instance_uri))
    if not prefixes:
        return Release((), True)
    if last_error and now - deleting_since > timedelta(seconds=RELEASE_AFTER_SECONDS):
        left = ", ".join(f"{what} at {uri}" for what, uri in prefixes)
        return Release((), True, f"spec.retention: {left} not deleted after {RELEASE_AFTER_SECONDS:.0f} s of tries "
                                 f"({last_error}); the job is let go: delete them by hand")
    return Release(tuple(prefixes), False, retry_in=RETRY_SECONDS)
