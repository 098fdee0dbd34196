"""LoRA adapters on one shared base model: fetched on first use, the recently used kept on the device.

Files: an adapter's weights are copied from object storage once per URI into a local cache
(`AdapterFiles`), off the generation thread. Device: `ResidentAdapters` loads each adapter into
the pipeline under a name of its own (diffusers' `load_lora_weights`, so every layout the
trainer exports loads, text-encoder LoRA included) and keeps it until it is the least recently
used one and the resident set would exceed `max_resident` adapters or `max_bytes`.

A batch may hold rows of several adapters: a forward pre-hook on every LoRA layer hands peft
one adapter name per row (`adapter_names`), so each row gets the base weights plus ITS OWN
adapter's update and nothing of the others'. Rows of the base model are named `BASE`. Every
call of the pipeline outside `routing(...)` runs the base model alone.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batcher import BASE

log = logging.getLogger("dreambooth.serve")
# Marks a LoRA layer that already carries the row-routing hook.
ROUTED = "_dreambooth_routes_rows"


class AdapterError(RuntimeError):
    """An adapter cannot be fetched or loaded; the message names it and why."""


@dataclass(frozen=True)
class AdapterLimits:
    """How many adapters stay on the device, and how many bytes of weights they may take."""

    max_resident: int = 32
    max_bytes: int = 2 * 1024**3


def adapter_cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_CACHE") or Path.home() / ".cache" / "dreambooth"
    return Path(root) / "adapters"


class AdapterFiles:
    """Local copies of adapter weight files, one download per URI however many callers ask."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or adapter_cache_dir()
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def local_file(self, uri: str) -> Path:
        """The weights file of `uri` on local disk (downloaded when missing). Blocking."""
        from dreambooth_trainer.export import fetch_lora_file
        from dreambooth_trainer.storage import StorageError, is_s3

        if not is_s3(uri):
            path = fetch_lora_file(uri, self.folder)
            if not path.is_file():
                raise AdapterError(f"adapter weights {uri}: no file {path}")
            return path
        target = self.folder / hashlib.sha256(uri.encode()).hexdigest()[:24]
        with self.guard:
            lock = self.locks.setdefault(uri, threading.Lock())
        with lock:
            found = list(target.glob("*.safetensors")) if target.is_dir() else []
            if found:
                return found[0]
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.folder))
            try:
                fetched = fetch_lora_file(uri, staging)
                staging.rename(target)  # whole or not at all: a crash never leaves half a file behind
            except StorageError as error:
                raise AdapterError(f"adapter weights {uri}: {error}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return target / fetched.name


def lora_layers(pipeline: Any) -> Iterator[Any]:
    """Every peft LoRA layer in the pipeline's models (UNet/transformer and text encoders)."""
    import torch
    from peft.tuners.lora import LoraLayer

    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            yield from (module for module in component.modules() if isinstance(module, LoraLayer))


def internal_name(model: str) -> str:
    """peft keeps adapters in ModuleDicts, whose keys may not hold dots: a stable safe key."""
    return "adapter_" + hashlib.sha256(model.encode()).hexdigest()[:16]


class ResidentAdapters:
    """The adapters loaded into one pipeline, least recently used first out.

    Every method runs on the generation thread (the one that runs batches): loading and
    deleting adapters changes the model's modules."""

    def __init__(self, pipeline: Any, limits: AdapterLimits,
                 on_change: Callable[[int, int], None] = lambda count, size: None,
                 on_load: Callable[[], None] = lambda: None, on_evict: Callable[[], None] = lambda: None):
        self.pipeline = pipeline
        self.limits = limits
        self.sizes: OrderedDict[str, int] = OrderedDict()  # model name -> bytes on the device
        self.rows: list[str] | None = None
        self.on_change, self.on_load, self.on_evict = on_change, on_load, on_evict

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def ensure(self, models: Iterable[str], weights_file: Callable[[str], Path]) -> None:
        """Make `models` resident (loading what is missing), then trim the rest to the limits."""
        wanted = [model for model in dict.fromkeys(models) if model != BASE]
        if len(wanted) > self.limits.max_resident:
            raise AdapterError(f"a batch needs {len(wanted)} adapters; at most {self.limits.max_resident} fit on the device")
        for model in wanted:
            if model in self.sizes:
                self.sizes.move_to_end(model)
                continue
            self.load(model, weights_file(model))
            self.trim(keep=set(wanted))
            if model not in self.sizes:
                raise AdapterError(f"adapter {model} takes more than the {self.limits.max_bytes} bytes allowed for adapters")

    def load(self, model: str, path: Path) -> None:
        name = internal_name(model)
        try:
            self.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except Exception as error:  # a broken or foreign file must fail its requests, not the server
            self.drop_layers(name)
            raise AdapterError(f"adapter {model} ({path.name}) cannot be loaded: {type(error).__name__}: {error}") from None
        layers = [layer for layer in lora_layers(self.pipeline) if name in layer.lora_A]
        if not layers:
            self.drop_layers(name)
            raise AdapterError(f"adapter {model} ({path.name}) holds no LoRA weights for this model")
        if any(layer.use_dora.get(name, False) for layer in layers):
            self.drop_layers(name)
            raise AdapterError(f"adapter {model} is a DoRA adapter; only plain LoRA can be served per request")
        size = sum(p.numel() * p.element_size() for layer in layers
                   for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()))
        self.sizes[model] = size
        self.hook_new_layers()
        self.on_load()
        self.on_change(len(self.sizes), self.bytes)
        log.info("adapter loaded", extra={"model": model, "bytes": size, "resident": len(self.sizes)})

    def trim(self, keep: set[str]) -> None:
        """Evict the least recently used adapters not in `keep` until the limits hold."""
        for model in list(self.sizes):
            over = len(self.sizes) > self.limits.max_resident or self.bytes > self.limits.max_bytes
            if not over:
                return
            if model not in keep or self.sizes[model] > self.limits.max_bytes:
                self.evict(model)

    def evict(self, model: str) -> None:
        if self.sizes.pop(model, None) is None:
            return
        self.drop_layers(internal_name(model))
        self.on_evict()
        self.on_change(len(self.sizes), self.bytes)
        log.info("adapter evicted", extra={"model": model, "resident": len(self.sizes)})

    def drop_layers(self, name: str) -> None:
        if any(name in layer.lora_A for layer in lora_layers(self.pipeline)):
            self.pipeline.delete_adapters(name)

    def hook_new_layers(self) -> None:
        for layer in lora_layers(self.pipeline):
            if not getattr(layer, ROUTED, False):
                layer.register_forward_pre_hook(self.route_rows, with_kwargs=True)
                setattr(layer, ROUTED, True)

    def route_rows(self, _module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook: one adapter name per row. A batch of k×N rows is k stacked copies of the N
        requests (classifier-free guidance stacks [uncond; cond]), so the names repeat k times."""
        rows = [BASE] if self.rows is None else self.rows
        x = args[0] if args else next(iter(kwargs.values()))
        copies, rest = divmod(x.shape[0], len(rows))
        if rest:
            raise RuntimeError(f"a batch of {x.shape[0]} rows does not stack {len(rows)} requests")
        return args, {**kwargs, "adapter_names": rows * copies}

    @contextmanager
    def routing(self, models: list[str]) -> Iterator[None]:
        """Within this block, request i of every pipeline call runs with adapter models[i]."""
        self.rows = [internal_name(model) if model != BASE else BASE for model in models]
        try:
            yield
        finally:
            self.rows = None
