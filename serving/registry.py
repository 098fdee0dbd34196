"""The adapter registry: the subjects a shared server draws, by model name.

The operator keeps one per shared server in a ConfigMap (`<server>-registry`, key
`registry.json`) and mounts it into the server's pods; the server re-reads the file when it
changes (the kubelet rewrites a mounted ConfigMap in place) and when a request names a model it
does not know yet. The same file works on a laptop (`dreambooth serve --registry FILE`).

    {"server": "sd15", "baseModel": "tiny",
     "adapters": {"rex": {"uri": "s3://bucket/jobs/team-a/rex/<uid>/final/lora",
                          "job": "rex", "uid": "<uid>", "registered": "2026-01-01T00:00:00Z"}}}

This module imports only pydantic and the standard library: the slim operator image uses it too.
"""
from __future__ import annotations

import calendar
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

REGISTRY_KEY = "registry.json"
# Model names a registry may hold: what a DreamboothJob may be called, and a little more.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class AdapterEntry(BaseModel):
    """One registered adapter: where its LoRA weights are, and which job put it there."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    uri: str = Field(min_length=1, description="final/lora folder or a .safetensors file (local or s3://).")
    job: str | None = Field(None, description="The DreamboothJob that trained it.")
    uid: str | None = Field(None, description="That job's uid (a re-created job with the same name is another adapter).")
    registered: str | None = Field(None, description="When it was registered (RFC 3339).")


class RegistryDocument(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    server: str = ""
    base_model: str = Field("", alias="baseModel")
    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)


class RegistryError(ValueError):
    """The registry file is not valid (names the file and the field)."""


def parse_registry(text: str, where: str = "registry") -> RegistryDocument:
    try:
        return RegistryDocument.model_validate_json(text or "{}")
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "document"
        raise RegistryError(f"{where}: {field}: {first['msg']}") from None


def registry_json(document: RegistryDocument) -> str:
    """Stable text (sorted keys): an unchanged registry never looks changed."""
    return json.dumps(document.model_dump(by_alias=True, exclude_none=True), sort_keys=True, indent=1) + "\n"


def registered_seconds(entry: AdapterEntry) -> int:
    """`created` for /v1/models: the registration time, 0 when unknown."""
    if not entry.registered:
        return 0
    try:
        return calendar.timegm(time.strptime(entry.registered, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class RegistryChange:
    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    changed: frozenset[str] = frozenset()  # names now pointing at other weights


class RegistryFile:
    """A registry file read again whenever its content changes (cheap to call often)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.digest = ""
        self.document = RegistryDocument()
        self.error: str | None = None

    def refresh(self) -> RegistryChange:
        """Re-read when the content changed; a missing or broken file keeps the last good one."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as error:
            self.error = f"registry {self.path}: {error.strerror or error}"
            return RegistryChange()
        digest = hashlib.sha256(text.encode()).hexdigest()
        with self.lock:
            if digest == self.digest:
                return RegistryChange()
            try:
                document = parse_registry(text, str(self.path))
            except RegistryError as error:
                self.error = str(error)
                return RegistryChange()
            before, after = self.document.adapters, document.adapters
            self.document, self.digest, self.error = document, digest, None
        changed = {name for name in set(before) & set(after) if before[name].uri != after[name].uri}
        return RegistryChange(frozenset(set(after) - set(before)), frozenset(set(before) - set(after)), frozenset(changed))

    def adapters(self) -> dict[str, AdapterEntry]:
        with self.lock:
            return dict(self.document.adapters)
