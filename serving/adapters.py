"""LoRA adapters on one shared base model: fetched on first use, the recently used kept on the device.

Files: an adapter's weights are copied from object storage once per URI into a local cache
(`AdapterFiles`), off the generation thread. Device: `ResidentAdapters` loads each adapter into
the pipeline under a name of its own (diffusers' `load_lora_weights`, so every layout the
trainer exports loads, text-encoder LoRA included) and keeps it until it is the least recently
used one and the resident set would exceed `max_resident` adapters or `max_bytes`.

Adapters are keyed by the URI of their weights, so a name re-pointed at new weights draws the new
ones. A batch may hold rows of several adapters, and each row gets the base weights plus ITS OWN
adapter's update and nothing of the others'. In a Linear LoRA layer (what the trainer trains)
the base layer runs on the whole batch, then each distinct adapter of the batch adds its update
to its own rows (gathered by index, weights used in place: nothing is copied per row, so memory
does not grow with rows times adapter size); a batch of one adapter takes the plain path, no
indexing at all. Other LoRA layers take peft's own per-row path (`adapter_names`, a loop over
the batch's adapters). Rows of the base model are named `BASE` and get no update; every call of
the pipeline outside `routing(...)` runs the base model alone. Each adapter's `lora_B` bias, when
it has one, comes with its update.
"""
from __future__ import annotations

import functools
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

import torch

from .batcher import BASE

log = logging.getLogger("dreambooth.serve")
# Marks a LoRA layer that already carries the row-routing hook.
ROUTED = "_dreambooth_routes_rows"


class AdapterError(RuntimeError):
    """An adapter cannot be fetched or loaded. The message names the model and why, and is what a
    client reads; `detail` (files, URIs, the library's error) goes to the log only."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


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
        self.known: dict[str, Path] = {}  # uri -> its local file, once found or fetched

    def cached(self, uri: str) -> Path | None:
        """The local file of `uri` when it was found or fetched before (no I/O)."""
        return self.known.get(uri)

    def local_file(self, uri: str, model: str = "") -> Path:
        """The weights file of `uri` on local disk (downloaded when missing); AdapterError naming
        `model`. Blocking."""
        from dreambooth_trainer.export import fetch_lora_file
        from dreambooth_trainer.storage import StorageError, is_s3

        if uri in self.known:
            return self.known[uri]
        if not is_s3(uri):
            path = fetch_lora_file(uri, self.folder)
            if not path.is_file():
                raise AdapterError(f"adapter {model or 'weights'}: its weights file is missing", f"{uri}: no file {path}")
            self.known[uri] = path
            return path
        target = self.folder / hashlib.sha256(uri.encode()).hexdigest()[:24]
        with self.guard:
            lock = self.locks.setdefault(uri, threading.Lock())
        with lock:
            found = list(target.glob("*.safetensors")) if target.is_dir() else []
            if found:
                self.known[uri] = found[0]
                return found[0]
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.folder))
            try:
                fetched = fetch_lora_file(uri, staging)
                staging.rename(target)  # whole or not at all: a crash never leaves half a file behind
            except StorageError as error:
                raise AdapterError(f"adapter {model or 'weights'}: its weights cannot be fetched (StorageError)", f"{uri}: {error}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.known[uri] = target / fetched.name
            return self.known[uri]


def lora_layers(pipeline: Any) -> Iterator[Any]:
    """Every peft LoRA layer in the pipeline's models (UNet/transformer and text encoders)."""
    from peft.tuners.lora import LoraLayer

    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            yield from (module for module in component.modules() if isinstance(module, LoraLayer))


def internal_name(model: str) -> str:
    """peft keeps adapters in ModuleDicts, whose keys may not hold dots: a stable safe key."""
    return "adapter_" + hashlib.sha256(model.encode()).hexdigest()[:16]


class ResidentAdapters:
    """The adapters loaded into one pipeline, by the URI of their weights, least recently used
    first out. `labels` names each for messages (the model name).

    Every method runs on the generation thread (the one that runs batches): loading and
    deleting adapters changes the model's modules."""

    def __init__(self, pipeline: Any, limits: AdapterLimits,
                 on_change: Callable[[int, int], None] = lambda count, size: None,
                 on_load: Callable[[], None] = lambda: None, on_evict: Callable[[], None] = lambda: None):
        self.pipeline = pipeline
        self.limits = limits
        self.sizes: OrderedDict[str, int] = OrderedDict()  # adapter key -> bytes on the device
        self.labels: dict[str, str] = {}  # adapter key -> the model name it was asked for by
        self.rows: list[str] | None = None  # peft adapter name per request of the running batch
        self.groups: dict[int, list[tuple[str, torch.Tensor | None]]] = {}  # rows -> (adapter, its rows)
        self.on_change, self.on_load, self.on_evict = on_change, on_load, on_evict

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def label(self, key: str) -> str:
        return self.labels.get(key, key)

    def ensure(self, keys: Iterable[str], weights_file: Callable[[str], Path]) -> None:
        """Make `keys` resident (loading what is missing), then trim the rest; the first failure raises."""
        failed = self.ensure_each(keys, weights_file)
        if failed:
            raise next(iter(failed.values()))

    def ensure_each(self, keys: Iterable[str], weights_file: Callable[[str], Path]) -> dict[str, AdapterError]:
        """Make `keys` resident; the adapters that cannot be loaded, with why (the others load)."""
        wanted = [key for key in dict.fromkeys(keys) if key != BASE]
        if len(wanted) > self.limits.max_resident:
            error = AdapterError(f"a batch needs {len(wanted)} adapters; at most {self.limits.max_resident} fit on the device")
            return {key: error for key in wanted}
        failed: dict[str, AdapterError] = {}
        for key in wanted:
            if key in self.sizes:
                self.sizes.move_to_end(key)
                continue
            try:
                self.load(key, weights_file(key))
            except AdapterError as error:
                failed[key] = error
                continue
            self.trim(keep=set(wanted))
            if key not in self.sizes:
                failed[key] = AdapterError(f"adapter {self.label(key)} takes more than the {self.limits.max_bytes} bytes allowed for adapters")
        return failed

    def load(self, key: str, path: Path) -> None:
        name, model = internal_name(key), self.label(key)
        foreign = other_family(path, self.pipeline)
        if foreign:
            raise AdapterError(f"adapter {model} {foreign}", f"adapter {model} ({path}) {foreign}")
        try:
            self.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except Exception as error:  # a broken or foreign file must fail its requests, not the server
            self.drop_layers(name)
            raise AdapterError(f"adapter {model} cannot be loaded ({type(error).__name__})",
                               f"adapter {model} ({path}) cannot be loaded: {type(error).__name__}: {error}") from None
        layers = [layer for layer in lora_layers(self.pipeline) if name in layer.lora_A]
        if not layers:
            self.drop_layers(name)
            raise AdapterError(f"adapter {model} holds no LoRA weights for this model", f"adapter {model} ({path}) holds no LoRA weights for this model")
        if any(layer.use_dora.get(name, False) for layer in layers):
            self.drop_layers(name)
            raise AdapterError(f"adapter {model} is a DoRA adapter; only plain LoRA can be served per request")
        size = sum(p.numel() * p.element_size() for layer in layers
                   for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()))
        self.sizes[key] = size
        self.hook_new_layers()
        self.on_load()
        self.on_change(len(self.sizes), self.bytes)
        log.info("adapter loaded", extra={"model": model, "uri": key, "bytes": size, "resident": len(self.sizes)})

    def trim(self, keep: set[str]) -> None:
        """Evict the least recently used adapters not in `keep` until the limits hold."""
        for key in list(self.sizes):
            over = len(self.sizes) > self.limits.max_resident or self.bytes > self.limits.max_bytes
            if not over:
                return
            if key not in keep or self.sizes[key] > self.limits.max_bytes:
                self.evict(key)

    def evict(self, key: str) -> None:
        if self.sizes.pop(key, None) is None:
            return
        self.drop_layers(internal_name(key))
        self.on_evict()
        self.on_change(len(self.sizes), self.bytes)
        log.info("adapter evicted", extra={"model": self.label(key), "uri": key, "resident": len(self.sizes)})

    def drop_layers(self, name: str) -> None:
        if any(name in layer.lora_A for layer in lora_layers(self.pipeline)):
            self.pipeline.delete_adapters(name)

    def hook_new_layers(self) -> None:
        for layer in lora_layers(self.pipeline):
            if getattr(layer, ROUTED, False):
                continue
            if gathers(layer):
                layer.forward = functools.partial(self.gathered_forward, layer)
            else:
                layer.register_forward_pre_hook(self.route_rows, with_kwargs=True)
            setattr(layer, ROUTED, True)

    def copies(self, rows: int) -> int:
        """How many stacked copies of the requests a batch of `rows` rows holds: k×N rows are k
        copies of the N requests (classifier-free guidance stacks [uncond; cond])."""
        requests = 1 if self.rows is None else len(self.rows)
        copies, rest = divmod(rows, requests)
        if rest:
            raise RuntimeError(f"a batch of {rows} rows does not stack {requests} requests")
        return copies

    def route_rows(self, _module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook of a LoRA layer peft runs itself: one adapter name per row."""
        x = args[0] if args else next(iter(kwargs.values()))
        rows = [BASE] if self.rows is None else self.rows
        return args, {**kwargs, "adapter_names": rows * self.copies(x.shape[0])}

    def row_groups(self, rows: int, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """Each adapter of the batch and the indices of its rows among `rows` (None: every row),
        worked out once per batch: every layer and denoising step reuses them."""
        if rows not in self.groups:
            names = self.rows * self.copies(rows)
            adapters = [name for name in dict.fromkeys(names) if name != BASE]
            if len(adapters) == 1 and BASE not in names:
                self.groups[rows] = [(adapters[0], None)]
            else:
                self.groups[rows] = [(name, torch.tensor([i for i, row in enumerate(names) if row == name], device=device))
                                     for name in adapters]
        return self.groups[rows]

    def gathered_forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A Linear LoRA layer: the base layer on the whole batch, then each adapter's
        scale·B(A(x)) (with B's bias, if any) on its own rows, its weights used where they are."""
        result = layer.base_layer(x, *args, **kwargs)
        if self.rows is None:
            return result
        for name, index in self.row_groups(x.shape[0], x.device):
            if name not in layer.lora_A:
                continue
            down, up = layer.lora_A[name], layer.lora_B[name]
            rows = x if index is None else x.index_select(0, index)
            update = (up(down(rows.to(down.weight.dtype))) * layer.scaling[name]).to(result.dtype)
            result = result + update if index is None else result.index_add(0, index, update)
        return result

    def batch_copy_bytes(self) -> int:
        """Bytes held for the running batch beyond the adapters' own weights (row indices only)."""
        return sum(index.numel() * index.element_size() for groups in self.groups.values() for _, index in groups if index is not None)

    @contextmanager
    def routing(self, keys: list[str]) -> Iterator[None]:
        """Within this block, request i of every pipeline call runs with adapter keys[i]."""
        self.rows = [internal_name(key) if key != BASE else BASE for key in keys]
        self.groups = {}
        try:
            yield
        finally:
            self.rows, self.groups = None, {}


# Where a LoRA file's keys go (diffusers layout, and kohya's for SD/SDXL and Flux).
UNET_PREFIXES = ("unet.", "lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "lora_unet_input_blocks",
                 "lora_unet_output_blocks", "lora_unet_middle_block")
TRANSFORMER_PREFIXES = ("transformer.", "lora_unet_double_blocks", "lora_unet_single_blocks", "lora_transformer_")


def other_family(path: Path, pipeline: Any) -> str | None:
    """Why a LoRA file cannot be for this pipeline's family (UNet keys on a transformer model or
    the reverse), or None: a mismatch named clearly instead of peft's missing-module errors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    except Exception:  # not readable here: load_lora_weights reports it
        return None
    served = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
    trained = "unet" if any(k.startswith(UNET_PREFIXES) for k in keys) else \
        "transformer" if any(k.startswith(TRANSFORMER_PREFIXES) for k in keys) else None
    if trained is None or trained == served:
        return None
    kinds = {"unet": "a UNet model (SD, SDXL)", "transformer": "a transformer model (SD3, Flux)"}
    return (f"was trained for {kinds[trained]}; this server's base model is a {type(pipeline).__name__}: "
            "serve it from a server of its own base model")


def gathers(layer: Any) -> bool:
    """A peft Linear LoRA layer: its rows' updates are gathered per adapter (gathered_forward)."""
    from peft.tuners.lora.layer import Linear

    return isinstance(layer, Linear)
