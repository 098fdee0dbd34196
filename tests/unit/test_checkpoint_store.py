"""Checkpoint bookkeeping on a real local folder: manifest last, latest, pruning."""
from pathlib import Path

import pytest
import torch

from dreambooth_trainer.checkpoint import (
    LATEST, ObjectStoreCheckpointIO, checkpoint_key, complete_checkpoints, find_resume_checkpoint,
)
from dreambooth_trainer.storage import LocalStorage, StorageError


def fake_checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"unet.w": torch.full((2, 2), float(step))}, "optimizer_states": [{"x": step}]}


def test_save_then_load_round_trips_and_moves_latest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=2)
    io.save_checkpoint(fake_checkpoint(3), checkpoint_key(3))
    assert storage.read_text(LATEST) == "checkpoints/step-00000003"
    loaded = io.load_checkpoint(find_resume_checkpoint(storage))
    assert loaded["global_step"] == 3 and loaded["optimizer_states"] == [{"x": 3}]
    assert torch.equal(loaded["state_dict"]["unet.w"], torch.full((2, 2), 3.0))


def test_only_the_last_k_complete_checkpoints_are_kept(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=2)
    for step in (1, 2, 3, 4):
        io.save_checkpoint(fake_checkpoint(step), checkpoint_key(step))
    assert complete_checkpoints(storage) == [checkpoint_key(3), checkpoint_key(4)]


def test_a_half_written_checkpoint_is_never_taken(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=3)
    io.save_checkpoint(fake_checkpoint(2), checkpoint_key(2))
    # A writer died after uploading weights of step 4 but before its manifest and the pointer.
    storage.write_bytes(checkpoint_key(4) + "/model.safetensors", b"partial")
    assert find_resume_checkpoint(storage) == checkpoint_key(2)
    # Even a pointer moved by hand to the partial one is not trusted.
    storage.write_text(LATEST, checkpoint_key(4))
    assert find_resume_checkpoint(storage) == checkpoint_key(2)
    with pytest.raises(StorageError, match="has no manifest"):
        io.load_checkpoint(checkpoint_key(4))


def test_a_corrupted_object_fails_its_manifest_check(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=1)
    io.save_checkpoint(fake_checkpoint(5), checkpoint_key(5))
    storage.write_bytes(checkpoint_key(5) + "/trainer_state.pt", b"garbage")
    with pytest.raises(StorageError, match="does not match its manifest"):
        io.load_checkpoint(checkpoint_key(5))
