"""Execution attempts fence checkpoint writes, against a real MinIO (conditional PutObject) and the
local twin: a zombie rank of gang N that writes after gang N+1 started never replaces N+1's
`latest`."""
from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth_trainer.checkpoint import (
    LATEST, MANIFEST, FencedOut, ObjectStoreCheckpointIO, checkpoint_key, complete_checkpoints, find_resume_checkpoint,
)
from dreambooth_trainer.storage import LocalStorage, PreconditionFailed, open_storage
from tests.unit.test_checkpoint_store import fake_checkpoint


@pytest.fixture(params=["s3", "local"])
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/jobs/ns/rex/uid")


def test_conditional_writes_refuse_a_stale_writer(storage) -> None:
    assert storage.version("latest") is None
    storage.write_if("latest", b"a", None, attempt=3)
    first = storage.version("latest")
    assert first is not None and first.attempt == 3
    with pytest.raises(PreconditionFailed):
        storage.write_if("latest", b"b", None, attempt=4)  # If-None-Match: * on an existing object
    storage.write_if("latest", b"c", first, attempt=4)  # If-Match the version read
    with pytest.raises(PreconditionFailed):
        storage.write_if("latest", b"d", first, attempt=5)  # that version is gone
    assert storage.read_text("latest") == "c" and storage.version("latest").attempt == 4


def test_a_zombie_of_an_older_gang_never_replaces_the_newer_gangs_latest(storage) -> None:
    gang0 = ObjectStoreCheckpointIO(storage, keep_last=3, attempt=0)
    gang0.save_checkpoint(fake_checkpoint(4), checkpoint_key(4, 0))
    gang0.wait()
    assert storage.read_text(LATEST) == "checkpoints/step-00000004-a0"
    # Gang 1 resumes from step 4 and checkpoints step 6, while gang 0's rank on a partitioned node
    # trains on and writes step 8 afterwards.
    gang1 = ObjectStoreCheckpointIO(storage, keep_last=3, attempt=1)
    gang1.save_checkpoint(fake_checkpoint(6), checkpoint_key(6, 1))
    gang1.wait()
    zombie = gang0
    zombie.save_checkpoint(fake_checkpoint(8), checkpoint_key(8, 0))
    with pytest.raises(FencedOut, match="attempt 1"):
        zombie.wait()
    assert storage.read_text(LATEST) == "checkpoints/step-00000006-a1", "gang 1's latest stands"
    assert find_resume_checkpoint(storage) == "checkpoints/step-00000006-a1"
    assert storage.exists(checkpoint_key(6, 1) + "/" + MANIFEST), "gang 1's checkpoint is untouched (its own keys)"
    # The zombie's orphan is the oldest of all (older attempt), whatever its step: pruned first.
    assert complete_checkpoints(storage)[0] == "checkpoints/step-00000004-a0"
    assert complete_checkpoints(storage)[-1] == "checkpoints/step-00000006-a1"
    gang1.save_checkpoint(fake_checkpoint(7), checkpoint_key(7, 1))
    gang1.wait()
    assert storage.read_text(LATEST) == "checkpoints/step-00000007-a1"


def test_runs_outside_a_cluster_keep_the_plain_layout(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    plain = ObjectStoreCheckpointIO(storage, keep_last=2)
    plain.save_checkpoint(fake_checkpoint(3), checkpoint_key(3))
    plain.wait()
    assert storage.read_text(LATEST) == "checkpoints/step-00000003"
    # A gang of a fenced run resumes from it and moves `latest` over it.
    fenced = ObjectStoreCheckpointIO(storage, keep_last=2, attempt=0)
    fenced.save_checkpoint(fake_checkpoint(5), checkpoint_key(5, 0))
    fenced.wait()
    assert storage.read_text(LATEST) == "checkpoints/step-00000005-a0"
