"""training.strategy: the choice of Lightning strategy, the combinations FSDP refuses, and the
sharded checkpoint layout's bookkeeping (no processes started here; tests/trainer/test_fsdp.py
runs two ranks for real)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dreambooth_trainer.checkpoint import (
    LATEST, MANIFEST, ObjectStoreCheckpointIO, checkpoint_key, find_resume_checkpoint, load_checkpoint_state,
)
from dreambooth_trainer.config import FSDP_CONFLICTS, ConfigError, config_from_dict
from dreambooth_trainer.errors import UserInputError
from dreambooth_trainer.storage import LocalStorage
from dreambooth_trainer.train import Placement, check_strategy, training_strategy

from .test_config import minimal

CONFLICTING_VALUES = {"training.ema": True, "training.compile": True, "training.train_text_encoder": True,
                      "training.optimizer": "adamw_8bit", "training.mixed_precision": "fp16", "training.channels_last": True}


def fsdp(**training: object) -> dict:
    return minimal(training={"strategy": "fsdp", **training})


def gang(world: int) -> Placement:
    return Placement(accelerator="cpu", devices=1, num_nodes=world, rank=0, world=world, backend="gloo")


def test_ddp_is_the_default_and_fsdp_is_chosen_by_name() -> None:
    assert config_from_dict(minimal()).training.strategy == "ddp"
    cfg = config_from_dict(fsdp(lora={"enabled": True}, gradient_checkpointing=True))  # LoRA shards as well
    assert cfg.training.strategy == "fsdp" and cfg.training.fsdp.block_classes == []
    with pytest.raises(ConfigError, match=r"training\.strategy"):
        config_from_dict(minimal(training={"strategy": "deepspeed"}))


def test_every_refused_combination_is_listed() -> None:
    assert sorted(field for field, _, _ in FSDP_CONFLICTS) == sorted(CONFLICTING_VALUES)


@pytest.mark.parametrize("field", sorted(CONFLICTING_VALUES))
def test_fsdp_refuses_what_it_cannot_shard_naming_the_field(field: str) -> None:
    name = field.split(".")[1]
    with pytest.raises(ConfigError, match=re.escape(field) + r"=.*training\.strategy=fsdp"):
        config_from_dict(fsdp(**{name: CONFLICTING_VALUES[field]}))
    config_from_dict(minimal(training={name: CONFLICTING_VALUES[field]}))  # fine under ddp


def test_fsdp_refuses_periodic_validation_but_keeps_the_final_one() -> None:
    with pytest.raises(ConfigError, match=r"validation\.every_n_steps.*training\.strategy=fsdp"):
        config_from_dict({**fsdp(), "validation": {"every_n_steps": 5}})
    assert config_from_dict({**fsdp(), "validation": {"every_n_steps": 0, "prompts": ["a photo of sks dog"]}})


def test_the_strategy_follows_the_config_and_the_gang() -> None:
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

    ddp, sharded = config_from_dict(minimal()), config_from_dict(fsdp())
    assert training_strategy(ddp, gang(1), 0) == "auto"
    assert isinstance(training_strategy(ddp, gang(2), 2**20), DDPStrategy)
    chosen = training_strategy(sharded, gang(2), 2**20)
    assert isinstance(chosen, ModelParallelStrategy) and not isinstance(chosen, DDPStrategy)
    check_strategy(sharded, gang(2))
    with pytest.raises(UserInputError, match=r"training\.strategy=fsdp .* one"):
        check_strategy(sharded, gang(1))


def test_blocks_come_from_the_model_or_the_config() -> None:
    from diffusers import UNet2DConditionModel

    from dreambooth_trainer.fsdp import block_class_names, denoiser_of

    unet = UNet2DConditionModel(sample_size=4, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=8, attention_head_dim=4)
    assert block_class_names(unet, []) == set(unet._no_split_modules)
    assert block_class_names(unet, ["ResnetBlock2D"]) == {"ResnetBlock2D"}
    with pytest.raises(UserInputError, match=r"training\.fsdp\.block_classes: FluxTransformerBlock not in UNet2DConditionModel"):
        block_class_names(unet, ["FluxTransformerBlock"])
    holder = torch.nn.Module()
    holder.unet = unet
    assert denoiser_of(holder) is unet
    holder.denoiser = torch.nn.Linear(1, 1)  # a family module names its denoiser
    assert denoiser_of(holder) is holder.denoiser


def sharded_checkpoint(storage: LocalStorage, step: int, complete: bool = True) -> str:
    """The objects an FSDP checkpoint of two ranks leaves, its manifest only when complete."""
    key = checkpoint_key(step)
    names = ("dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "state.pt", "shard-0.json", "shard-1.json")
    for name in names if complete else names[:2]:  # the shard files are uploaded first
        storage.write_text(f"{key}/{name}", "x")
    if complete:
        storage.write_text(f"{key}/{MANIFEST}", json.dumps({"format": 2, "layout": "dcp", "step": step, "world": 2, "files": {}}))
    return key


def test_a_sharded_checkpoint_without_manifest_is_never_resumed_and_is_pruned_whole(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    sharded_checkpoint(storage, 2)
    sharded_checkpoint(storage, 3, complete=False)  # a rank died before the commit
    storage.write_text(LATEST, checkpoint_key(3))
    assert find_resume_checkpoint(storage) == checkpoint_key(2)
    sharded_checkpoint(storage, 4)
    ObjectStoreCheckpointIO(storage, keep_last=1).prune()
    assert sorted({key.split("/")[1] for key in storage.list("checkpoints")}) == ["step-00000004"]


def test_a_checkpoint_resumes_only_under_the_strategy_that_wrote_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = sharded_checkpoint(storage, 2)
    with pytest.raises(UserInputError, match=r"written with training\.strategy=fsdp"):
        load_checkpoint_state(storage, key, 0, 2)
    ddp_written = ObjectStoreCheckpointIO(storage, keep_last=5)
    ddp_written.save_checkpoint({"global_step": 3, "state_dict": {"unet.w": torch.ones(2)}}, checkpoint_key(3))
    ddp_written.wait()
    with pytest.raises(UserInputError, match=r"written with training\.strategy=ddp"):
        ObjectStoreCheckpointIO(storage, keep_last=5).load_sharded(checkpoint_key(3), {})


def test_the_operator_refuses_fsdp_jobs_it_cannot_run_naming_the_field() -> None:
    from dreambooth_api.v1alpha1.spec import parse_spec

    from .test_operator_spec import spec_with

    one_rank = {"training.strategy": "fsdp", "resources.nodes": 1, "resources.gpusPerNode": 1}
    with pytest.raises(ConfigError, match=r"spec\.training\.strategy fsdp .*resources\.nodes"):
        parse_spec(spec_with(**one_rank))
    with pytest.raises(ConfigError, match=r"training\.ema=True cannot be used with training\.strategy=fsdp"):
        parse_spec(spec_with(**{**one_rank, "resources.gpusPerNode": 8, "training.ema": True}))
    spec = parse_spec(spec_with(**{**one_rank, "resources.gpusPerNode": 8, "training.fsdp": {"blockClasses": ["FluxTransformerBlock"]}}))
    assert (spec.training.strategy, spec.training.fsdp.block_classes) == ("fsdp", ["FluxTransformerBlock"])
