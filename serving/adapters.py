"""LoRA adapters on one shared base model: fetched on first use, the recently used kept on the device.

Files: an adapter's weights are copied from object storage once per URI into a local cache
(`AdapterFiles`), off the generation thread. Device: `ResidentAdapters` loads each adapter into
the pipeline under a name of its own (diffusers' `load_lora_weights`, so every layout the
trainer exports loads, text-encoder LoRA included) and keeps it until it is the least recently
used one and the resident set would exceed `max_resident` adapters or `max_bytes`.

A batch may hold rows of several adapters, and each row gets the base weights plus ITS OWN
adapter's update and nothing of the others'. In a Linear LoRA layer (what the trainer trains)
the base layer runs on the whole batch and one gathered update follows: each row's A and B are
picked from the batch's adapters stacked once per batch, and two batched matmuls (`bmm`) apply
them row by row, so the cost does not grow with the number of adapters in the batch. Other LoRA
layers take peft's own per-row path (`adapter_names`, a loop over the batch's adapters). Rows of
the base model are named `BASE` and get no update; every call of the pipeline outside
`routing(...)` runs the base model alone.
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
from .family import denoiser

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
        self.known: dict[str, Path] = {}  # uri -> its local file, once found or fetched

    def cached(self, uri: str) -> Path | None:
        """The local file of `uri` when it was found or fetched before (no I/O)."""
        return self.known.get(uri)

    def local_file(self, uri: str) -> Path:
        """The weights file of `uri` on local disk (downloaded when missing). Blocking."""
        from dreambooth_trainer.export import fetch_lora_file
        from dreambooth_trainer.storage import StorageError, is_s3

        if uri in self.known:
            return self.known[uri]
        if not is_s3(uri):
            path = fetch_lora_file(uri, self.folder)
            if not path.is_file():
                raise AdapterError(f"adapter weights {uri}: no file {path}")
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
                raise AdapterError(f"adapter weights {uri}: {error}") from None
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
    """The adapters loaded into one pipeline, least recently used first out.

    Every method runs on the generation thread (the one that runs batches): loading and
    deleting adapters changes the model's modules."""

    def __init__(self, pipeline: Any, limits: AdapterLimits,
                 on_change: Callable[[int, int], None] = lambda count, size: None,
                 on_load: Callable[[], None] = lambda: None, on_evict: Callable[[], None] = lambda: None):
        self.pipeline = pipeline
        self.limits = limits
        self.sizes: OrderedDict[str, int] = OrderedDict()  # model name -> bytes on the device
        self.rows: list[str] | None = None  # peft adapter name per request of the running batch
        self.row_slots: torch.Tensor | None = None  # per request: its adapter's slot in the batch (0: none)
        self.gathered: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}
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
        foreign = other_family(path, self.pipeline)
        if foreign:
            raise AdapterError(f"adapter {model} ({path.name}) {foreign}")
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

    def gathered_forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A Linear LoRA layer: the base layer on the whole batch, then scale·B(A(x)) with each
        row's own A and B (two batched matmuls, however many adapters the batch holds)."""
        result = layer.base_layer(x, *args, **kwargs)
        weights = None if self.rows is None else self.row_weights(layer, x.shape[0])
        if weights is None:
            return result
        down, up = weights
        update = torch.bmm(torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), down), up)
        return result + update.reshape(result.shape)

    def row_weights(self, layer: Any, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's A (transposed) and scaled B (transposed) for this layer, gathered once per
        batch and layer: every denoising step of the batch reuses them."""
        key = (id(layer), rows)
        if key not in self.gathered:
            stacks = batch_stacks(layer, list(dict.fromkeys(self.rows)))
            if stacks is None:
                self.gathered[key] = None
            else:
                index = self.row_slots.repeat(self.copies(rows))
                self.gathered[key] = (stacks[0][index].transpose(1, 2), stacks[1][index].transpose(1, 2))
        return self.gathered[key]

    @contextmanager
    def routing(self, models: list[str]) -> Iterator[None]:
        """Within this block, request i of every pipeline call runs with adapter models[i]."""
        self.rows = [internal_name(model) if model != BASE else BASE for model in models]
        slots = {name: index for index, name in enumerate(dict.fromkeys(self.rows), start=1)}
        device = next(denoiser(self.pipeline).parameters()).device
        self.row_slots = torch.tensor([0 if name == BASE else slots[name] for name in self.rows], device=device)
        self.gathered = {}
        try:
            yield
        finally:
            self.rows, self.row_slots, self.gathered = None, None, {}


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
    """A peft Linear LoRA layer: its per-row update is one gathered pair of batched matmuls."""
    from peft.tuners.lora.layer import Linear

    return isinstance(layer, Linear)


def batch_stacks(layer: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) for slot 0 (no update) and each of the batch's adapters, in the order of `names`
    (BASE keeps its slot and stays zero); B holds the scale; ranks padded with zeros (exact)."""
    present = [name for name in names if name != BASE and name in layer.lora_A]
    if not present:
        return None
    downs = {name: layer.lora_A[name].weight for name in present}
    ups = {name: layer.lora_B[name].weight for name in present}
    rank = max(down.shape[0] for down in downs.values())
    if any(down.shape[0] != rank for down in downs.values()):
        downs = {name: torch.nn.functional.pad(down, (0, 0, 0, rank - down.shape[0])) for name, down in downs.items()}
        ups = {name: torch.nn.functional.pad(up, (0, rank - up.shape[1])) for name, up in ups.items()}
    zero_down, zero_up = zeros_like_cached(downs[present[0]]), zeros_like_cached(ups[present[0]])
    down = torch.stack([zero_down, *(downs.get(name, zero_down) for name in names)])
    up = torch.stack([zero_up, *(ups.get(name, zero_up) for name in names)])
    scales = [1.0] + [layer.scaling[name] if name in downs else 0.0 for name in names]
    if any(scale != 1.0 for scale in scales[1:] if scale):
        up = up * torch.tensor(scales, dtype=up.dtype, device=up.device).view(-1, 1, 1)
    return down, up


@functools.lru_cache(maxsize=256)
def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def zeros_like_cached(tensor: torch.Tensor) -> torch.Tensor:
    """A zero tensor of this shape (shared, never written to): slot 0 of every batch."""
    return _zeros(tuple(tensor.shape), tensor.dtype, tensor.device)
