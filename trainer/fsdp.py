"""training.strategy=fsdp: the denoiser sharded across the gang with FSDP2 (`fully_shard`).

Each block of the denoiser (the classes in its `_no_split_modules`, or `training.fsdp.block_classes`)
becomes one FSDP unit, then the denoiser itself: parameters, gradients and optimizer state live
1/world on each rank; a block's weights are gathered just for its forward and backward. The VAE
and text encoders stay whole on every rank (frozen; they never enter FSDP).

Checkpoints are sharded (torch.distributed.checkpoint, one file per rank) and committed through
the object-store checkpoint IO; the export gathers the full denoiser on rank 0.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import UserInputError

log = logging.getLogger("dreambooth.fsdp")


def denoiser_of(module: torch.nn.Module) -> torch.nn.Module:
    """What trains: the module's `denoiser` (a family's UNet or transformer), else its `unet`."""
    denoiser = getattr(module, "denoiser", None)
    return denoiser if isinstance(denoiser, torch.nn.Module) else module.unet


def block_class_names(denoiser: torch.nn.Module, configured: list[str]) -> set[str]:
    """The class names sharded one by one: configured, else the model's `_no_split_modules`."""
    names = set(configured or getattr(denoiser, "_no_split_modules", None) or [])
    if not names:
        raise UserInputError(f"training.fsdp.block_classes: {type(denoiser).__name__} names no blocks (_no_split_modules); "
                             "list the block classes to shard")
    present = {type(m).__name__ for m in denoiser.modules()}
    missing = sorted(set(configured) - present)
    if missing:
        raise UserInputError(f"training.fsdp.block_classes: {', '.join(missing)} not in {type(denoiser).__name__} "
                             f"(its classes include {', '.join(sorted(present)[:12])})")
    return names


def shard_denoiser(denoiser: torch.nn.Module, mesh: Any, block_classes: set[str], reshard_after_forward: bool) -> int:
    """fully_shard every block (innermost first), then the denoiser; returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in denoiser.modules() if m is not denoiser and type(m).__name__ in block_classes]
    for block in reversed(blocks):  # children before the blocks that hold them
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(denoiser, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return len(blocks) + 1


def unsharded_class(module: torch.nn.Module) -> type:
    """The model class fully_shard swapped out (it makes `FSDP<Name>(FSDPModule, <Name>)`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def gathered_copy(denoiser: torch.nn.Module, rank: int) -> torch.nn.Module | None:
    """Collective: the whole denoiser as a plain module on rank 0 (None elsewhere), LoRA adapters included."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(denoiser, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    # Built on the meta device, so the gathered tensors are assigned, not copied into a second model.
    plain = empty_like_model(denoiser, torch.device("meta"))
    plain.load_state_dict(full, strict=True, assign=True)
    if any(buffer.is_meta for buffer in plain.buffers()):  # a buffer no state dict holds: build it for real
        plain = empty_like_model(denoiser, torch.device("cpu"))
        plain.load_state_dict(full, strict=True)
    return plain


def empty_like_model(denoiser: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A new, unsharded model of the denoiser's class and config, with the same LoRA adapters."""
    with device:
        plain = unsharded_class(denoiser).from_config(denoiser.config)
        for name, config in (getattr(denoiser, "peft_config", None) or {}).items():
            plain.add_adapter(config, adapter_name=name)
    return plain


@contextmanager
def moved_while(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """`module` on `device` inside the block, back where it was after (class images under FSDP
    are drawn with the whole denoiser, before it is sharded)."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


def fsdp_strategy(cfg: Any, world: int, backend: str) -> Any:
    """Lightning's FSDP2 strategy (ModelParallelStrategy) that shards the denoiser itself and keeps
    checkpoints in the object store."""
    from pytorch_lightning.strategies import ModelParallelStrategy
    from pytorch_lightning.trainer.states import TrainerFn
    from lightning_fabric.utilities.init import _materialize_distributed_module
    from lightning_fabric.utilities.optimizer import _optimizers_to_device

    fsdp = cfg.training.fsdp

    class DenoiserFsdpStrategy(ModelParallelStrategy):
        def setup(self, trainer: Any) -> None:
            # ModelParallelStrategy.setup, with the sharding done here instead of in a configure_model hook.
            self.accelerator.setup(trainer)
            denoiser = denoiser_of(self.lightning_module)  # on the host: fully_shard moves each unit to the GPU
            units = shard_denoiser(denoiser, self.device_mesh["data_parallel"], block_class_names(denoiser, fsdp.block_classes),
                                   fsdp.reshard_after_forward)
            log.info("denoiser sharded", extra={"units": units, "world": self.world_size, "model": type(denoiser).__name__})
            self.checkpoint_group = torch.distributed.new_group(backend="gloo")  # every rank, at the same point
            _materialize_distributed_module(self.model, self.root_device)
            self.model = self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.barrier()
            if trainer.state.fn == TrainerFn.FITTING:
                self.setup_optimizers(trainer)
            self.setup_precision_plugin()
            if trainer.state.fn == TrainerFn.FITTING:
                _optimizers_to_device(self.optimizers, self.root_device)

        def lightning_module_state_dict(self) -> dict[str, Any]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # The module's own state_dict() picks what trains; the shards stay where they are (the
            # write to local disk happens before the step loop goes on).
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False))

        def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = getattr(optimizer, "_optimizer", optimizer)
            return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=False))

        def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            rest = dict(checkpoint)
            sharded = {"state_dict": rest.pop("state_dict"),
                       **{f"optimizer_{i}": state for i, state in enumerate(rest.pop("optimizer_states", []))}}
            self.checkpoint_io.save_sharded(str(filepath), sharded, rest, self.checkpoint_group)

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=False)
            sharded = {"state_dict": get_model_state_dict(self.model, options=options),
                       **{f"optimizer_{i}": get_optimizer_state_dict(self.model, o, options=options) for i, o in enumerate(self.optimizers)}}
            rest = self.checkpoint_io.load_sharded(str(checkpoint_path), sharded)
            # strict=False: the module's state_dict() holds only what trains (the VAE comes from the base model).
            set_model_state_dict(self.model, sharded["state_dict"], options=StateDictOptions(strict=False))
            for i, optimizer in enumerate(self.optimizers):
                set_optimizer_state_dict(self.model, optimizer, sharded[f"optimizer_{i}"], options=options)
            return rest

    return DenoiserFsdpStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True,
                                process_group_backend=backend)
