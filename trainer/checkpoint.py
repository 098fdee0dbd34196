"""Checkpoints in object storage: object by object, manifest LAST, then the `latest` pointer.

checkpoints/step-00000006/model.safetensors   weights of what trains
checkpoints/step-00000006/trainer_state.pt    optimizer, LR scheduler, loops (step, data position), RNG, EMA
checkpoints/step-00000006/manifest.json       sizes + sha256 of the above; written after them
latest                                        "checkpoints/step-00000006", moved after the manifest

A checkpoint without a manifest (a writer died half-way) is never loaded, and `latest` never
points at one. After a new checkpoint is complete, all but the newest `keep_last` are deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .storage import Storage, StorageError, join_key

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
STEP_RE = re.compile(r"step-(\d+)$")


def checkpoint_key(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:08d}"


def step_of(key: str) -> int:
    match = STEP_RE.search(key.rstrip("/"))
    if not match:
        raise ValueError(f"{key!r} is not a checkpoint key")
    return int(match.group(1))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def complete_checkpoints(storage: Storage) -> list[str]:
    """Checkpoint keys that have a manifest, oldest first."""
    keys = {key.rsplit("/", 1)[0] for key in storage.list(CHECKPOINTS) if key.endswith("/" + MANIFEST)}
    return sorted(keys, key=step_of)


def find_resume_checkpoint(storage: Storage) -> str | None:
    """The checkpoint to resume from: `latest` if complete, else the newest complete one."""
    complete = complete_checkpoints(storage)
    if storage.exists(LATEST):
        pointed = storage.read_text(LATEST).strip()
        if pointed in complete:
            return pointed
        log.warning("latest points at an incomplete checkpoint; using the newest complete one", extra={"latest": pointed})
    return complete[-1] if complete else None


class ObjectStoreCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO writing to a Storage (local folder or s3://) with a manifest."""

    def __init__(self, storage: Storage, keep_last: int):
        self.storage = storage
        self.keep_last = keep_last
        self.last_saved: str | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str, storage_options: Any | None = None) -> None:
        started = time.monotonic()
        key = path
        weights = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in checkpoint["state_dict"].items()}
        rest = {name: value for name, value in checkpoint.items() if name != "state_dict"}
        files: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as folder:
            weights_path, state_path = Path(folder, WEIGHTS), Path(folder, STATE)
            save_file(weights, str(weights_path))
            torch.save(rest, state_path)
            for name, local in ((WEIGHTS, weights_path), (STATE, state_path)):
                files[name] = {"size": local.stat().st_size, "sha256": sha256_file(local)}
                self.storage.upload_file(join_key(key, name), local)
        manifest = {"format": 1, "step": checkpoint.get("global_step"), "files": files, "written_at": time.time()}
        self.storage.write_text(join_key(key, MANIFEST), json.dumps(manifest, indent=1))
        self.storage.write_text(LATEST, key)
        self.last_saved = key
        self.prune()
        log.info("checkpoint saved", extra={"checkpoint": self.storage.describe(key), "seconds": round(time.monotonic() - started, 2)})

    def load_checkpoint(self, path: str, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        key = path
        try:
            manifest = json.loads(self.storage.read_text(join_key(key, MANIFEST)))
        except StorageError:
            raise StorageError(f"checkpoint {self.storage.describe(key)} has no manifest (incomplete); not loading it") from None
        with tempfile.TemporaryDirectory() as folder:
            for name, meta in manifest["files"].items():
                local = Path(folder, name)
                self.storage.download_file(join_key(key, name), local)
                if local.stat().st_size != meta["size"] or sha256_file(local) != meta["sha256"]:
                    raise StorageError(f"checkpoint object {self.storage.describe(join_key(key, name))} does not match its manifest")
            state = torch.load(Path(folder, STATE), map_location=map_location or "cpu", weights_only=False)
            state["state_dict"] = load_safetensors(Path(folder, WEIGHTS).read_bytes())
        return state

    def remove_checkpoint(self, path: str) -> None:
        self.storage.delete_prefix(path)

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and stale partial ones."""
        complete = complete_checkpoints(self.storage)
        newest = step_of(complete[-1]) if complete else 0
        for key in complete[: -self.keep_last]:
            self.remove_checkpoint(key)
        partial = {k.rsplit("/", 1)[0] for k in self.storage.list(CHECKPOINTS)} - set(complete)
        for key in partial:
            if STEP_RE.search(key) and step_of(key) < newest:
                self.remove_checkpoint(key)

