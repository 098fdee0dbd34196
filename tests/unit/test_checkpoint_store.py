"""Checkpoint bookkeeping on a real local folder: shards, manifest last, latest, pruning, background writes."""
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_trainer.checkpoint import (
    LATEST, MANIFEST, RANK_LOCAL, STATE, ObjectStoreCheckpointIO, assign_shards, checkpoint_key, complete_checkpoints,
    find_resume_checkpoint, join_tensors, load_checkpoint_tensors, split_tensors, tensors_name, write_safetensors,
)
from dreambooth_trainer.storage import LocalStorage, StorageError


def fake_checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"unet.w": torch.full((2, 2), float(step)), "unet.b": torch.arange(3.0)},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(4) * step}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 0}}}},
            RANK_LOCAL: {"rng": {"torch": torch.tensor([step, 0], dtype=torch.uint8)}}}


def saved(io: ObjectStoreCheckpointIO, step: int) -> None:
    io.save_checkpoint(fake_checkpoint(step), checkpoint_key(step))
    io.wait()


def test_save_then_load_round_trips_and_moves_latest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=2)
    saved(io, 3)
    assert storage.read_text(LATEST) == "checkpoints/step-00000003"
    loaded = io.load_checkpoint(find_resume_checkpoint(storage))
    assert loaded["global_step"] == 3 and loaded["loops"] == fake_checkpoint(3)["loops"]
    assert torch.equal(loaded["state_dict"]["unet.w"], torch.full((2, 2), 3.0))
    state = loaded["optimizer_states"][0]["state"][0]
    assert torch.equal(state["exp_avg"], torch.ones(4) * 3) and state["step"].shape == ()
    assert torch.equal(loaded[RANK_LOCAL]["rng"]["torch"], torch.tensor([3, 0], dtype=torch.uint8))


def test_split_and_join_are_inverse_and_the_skeleton_holds_no_tensor() -> None:
    checkpoint = fake_checkpoint(7)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_tensors(checkpoint, "", tensors)
    assert "state_dict/unet.w" in tensors and "optimizer_states/0/state/0/exp_avg" in tensors
    assert "tensor(" not in repr(skeleton), "the skeleton holds references, not tensors"
    joined = join_tensors(skeleton, tensors)
    assert joined["optimizer_states"][0]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(joined["state_dict"]["unet.b"], torch.arange(3.0))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_tensor_goes_to_exactly_one_rank_and_bytes_are_balanced(world: int) -> None:
    tensors = {f"t{i}": torch.zeros(100 * (i % 7 + 1)) for i in range(40)}
    shards = assign_shards(tensors, world)
    assert sorted(name for shard in shards for name in shard) == sorted(tensors)
    loads = [sum(tensors[n].numel() * 4 for n in shard) for shard in shards]
    assert max(loads) - min(loads) <= 700 * 4, "no rank carries more than one largest tensor extra"
    assert shards == assign_shards(dict(reversed(list(tensors.items()))), world), "the same on every rank"


def test_the_streaming_writer_is_read_by_safetensors_and_hashes_what_it_wrote(tmp_path: Path) -> None:
    import hashlib

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
               "scalar": torch.tensor(2.5)}
    written = write_safetensors(tmp_path / "x.safetensors", tensors)
    data = (tmp_path / "x.safetensors").read_bytes()
    assert written.size == len(data) and written.sha256 == hashlib.sha256(data).hexdigest()
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_two_ranks_write_their_shares_and_rank_0_commits_after_both(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    rank1 = ObjectStoreCheckpointIO(storage, keep_last=2, rank=1, world=2)
    rank0 = ObjectStoreCheckpointIO(storage, keep_last=2, rank=0, world=2)
    rank0.save_checkpoint(fake_checkpoint(4), checkpoint_key(4))
    # Rank 0 has written its share but waits for rank 1's: no manifest, no latest yet.
    deadline = threading.Event()
    deadline.wait(1.0)
    assert not storage.exists(checkpoint_key(4) + "/" + MANIFEST) and not storage.exists(LATEST)
    rank1.save_checkpoint(fake_checkpoint(4), checkpoint_key(4))
    rank1.wait()
    rank0.wait()
    manifest = json.loads(storage.read_text(checkpoint_key(4) + "/" + MANIFEST))
    assert manifest["world"] == 2 and {tensors_name(0), tensors_name(1), STATE} <= set(manifest["files"])
    shares = [set(load_file(str(tmp_path / checkpoint_key(4) / tensors_name(r)))) for r in (0, 1)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert set(load_checkpoint_tensors(storage, checkpoint_key(4))) == shares[0] | shares[1]
    loaded = rank1.load_checkpoint(checkpoint_key(4))
    assert torch.equal(loaded["state_dict"]["unet.w"], torch.full((2, 2), 4.0))


def test_a_checkpoint_from_another_world_size_loads_without_rank_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = LocalStorage(tmp_path)
    saved(ObjectStoreCheckpointIO(storage, keep_last=2), 6)
    loaded = ObjectStoreCheckpointIO(storage, keep_last=2, rank=1, world=2).load_checkpoint(checkpoint_key(6))
    assert torch.equal(loaded["state_dict"]["unet.w"], torch.full((2, 2), 6.0)) and RANK_LOCAL not in loaded
    assert "another world size" in caplog.text


def test_the_step_loop_does_not_wait_for_the_write_and_reused_buffers_keep_the_saved_values(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    gate = threading.Event()
    original = storage.upload_file

    def slow_upload(key: str, path: Path) -> None:
        gate.wait(10)
        original(key, path)

    storage.upload_file = slow_upload  # type: ignore[method-assign]
    io = ObjectStoreCheckpointIO(storage, keep_last=3)
    live = fake_checkpoint(1)
    io.save_checkpoint(live, checkpoint_key(1))  # returns while the upload is held
    assert not storage.exists(LATEST)
    live["state_dict"]["unet.w"].fill_(99.0)  # training goes on mutating the live tensors
    gate.set()
    io.wait()
    loaded = io.load_checkpoint(checkpoint_key(1))
    assert torch.equal(loaded["state_dict"]["unet.w"], torch.full((2, 2), 1.0)), "the checkpoint holds the state at save time"


def test_only_the_last_k_complete_checkpoints_are_kept(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=2)
    for step in (1, 2, 3, 4):
        saved(io, step)
    assert complete_checkpoints(storage) == [checkpoint_key(3), checkpoint_key(4)]


def test_a_half_written_checkpoint_is_never_taken(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=3)
    saved(io, 2)
    # A writer died after uploading its tensors of step 4 but before the manifest and the pointer.
    storage.write_bytes(checkpoint_key(4) + "/" + tensors_name(0), b"partial")
    assert find_resume_checkpoint(storage) == checkpoint_key(2)
    # Even a pointer moved by hand to the partial one is not trusted.
    storage.write_text(LATEST, checkpoint_key(4))
    assert find_resume_checkpoint(storage) == checkpoint_key(2)
    with pytest.raises(StorageError, match="has no manifest"):
        io.load_checkpoint(checkpoint_key(4))


@pytest.mark.parametrize("name", [tensors_name(0), STATE, "rank-0.pt"])
def test_a_corrupted_object_fails_its_manifest_check(tmp_path: Path, name: str) -> None:
    storage = LocalStorage(tmp_path)
    io = ObjectStoreCheckpointIO(storage, keep_last=1)
    saved(io, 5)
    storage.write_bytes(checkpoint_key(5) + "/" + name, b"garbage")
    with pytest.raises(StorageError, match="does not match its manifest"):
        io.load_checkpoint(checkpoint_key(5))
