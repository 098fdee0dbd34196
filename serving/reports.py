"""The training report beside a served model, for the web page's link (issue 22).

The trainer writes report.html into final/ and into each exports/<choice>/ folder, beside the
weights a server loads: a dedicated server's --model is such a folder, a shared server's adapter
is its lora/ subfolder (or a .safetensors file in it). Nothing is cached: a report is small and
read only when someone clicks.
"""
from __future__ import annotations

from pathlib import Path

REPORT = "report.html"
# The report is one self-contained page (images inline, no script): the browser is told so.
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def report_folders(uri: str) -> list[str]:
    """Where report.html may be for weights at `uri`, nearest first."""
    trimmed = uri.rstrip("/")
    parent = trimmed.rsplit("/", 1)[0] if "/" in trimmed else ""
    if trimmed.endswith(".safetensors"):
        return [parent] + ([parent.rsplit("/", 1)[0]] if parent.endswith("/lora") else [])
    if trimmed.endswith("/lora") and parent:
        return [trimmed, parent]
    return [trimmed]


def is_stored_model(uri: str) -> bool:
    """True for s3:// URIs and local paths that exist (a built-in tiny model or a hub name has no report)."""
    return uri.startswith("s3://") or Path(uri.removeprefix("file://")).exists()


def read_report(uri: str) -> bytes | None:
    """report.html beside the weights at `uri`, or None when there is none (or it cannot be read)."""
    from dreambooth_trainer.storage import StorageError, open_storage

    if not is_stored_model(uri):
        return None
    for folder in report_folders(uri):
        try:
            storage = open_storage(folder)
            if storage.exists(REPORT):
                return storage.read_bytes(REPORT)
        except (StorageError, OSError):
            continue
    return None
