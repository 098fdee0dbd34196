"""Checkpoints in object storage: every rank writes its share in the background; manifest LAST.

checkpoints/step-00000006/tensors-0.safetensors  rank 0's share of every tensor of the state
checkpoints/step-00000006/tensors-1.safetensors  rank 1's share (weights, optimizer moments, EMA ...)
checkpoints/step-00000006/state.pt               the rest: loops (step, data position), LR scheduler,
                                                 optimizer hyper-parameters; tensors replaced by names
checkpoints/step-00000006/rank-0.pt, rank-1.pt   what differs between ranks (RNG states)
checkpoints/step-00000006/shard-0.json, ...      each rank's record of its files, written after them
checkpoints/step-00000006/manifest.json          every file's size and sha256 and the world size:
                                                 written by rank 0 after every shard record
latest                                           "checkpoints/step-00000006", moved after the manifest

A gang run by the operator has an execution attempt (env DREAMBOOTH_ATTEMPT, the gang number):
its checkpoints are `checkpoints/step-00000006-a3/...`, so two attempts never write the same
objects, and `latest` is moved by a conditional write (If-Match the version read, or
If-None-Match: * when absent) that records the attempt in the object's metadata: a writer of an
older attempt (a zombie rank on a partitioned node) is refused and never replaces a newer
attempt's `latest` (`FencedOut`).

Under training.strategy=fsdp no rank holds the whole state, so the tensors are written with
torch.distributed.checkpoint instead ("layout": "dcp" in the manifest), one shard file per rank:
checkpoints/step-00000006/dcp/__0_0.distcp, __1_0.distcp ...   each rank's shards of the denoiser's
                                                 weights and optimizer moments
checkpoints/step-00000006/dcp/.metadata          the index of every shard (rank 0)
and state.pt holds the rest as a plain dict. rank-N.pt, shard-N.json, the manifest and `latest`
are as above, so the same commit rules hold.

The step loop pays only for copying its tensors into reused (pinned, on a GPU) host buffers;
serialising, hashing (one pass, while writing) and uploading run on a background thread, one
checkpoint in flight. A checkpoint without a manifest (a writer died half-way) is never loaded,
and `latest` never points at one. After a new checkpoint is complete, all but the newest
`keep_last` are deleted, except the best one by the fidelity scores (`protected`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors.torch import load_file

from .errors import UserInputError
from .storage import PreconditionFailed, Storage, StorageError, join_key

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT = 2
LAYOUT_TENSORS = "tensors"  # replicated state (DDP), split across ranks by bytes
LAYOUT_DCP = "dcp"  # sharded state (FSDP), torch.distributed.checkpoint files under dcp/
DCP_FOLDER = "dcp"
DCP_METADATA = ".metadata"
STEP_RE = re.compile(r"step-(\d+)(?:-a(\d+))?$")
# A conditional move of `latest` that keeps losing to other writers gives up after this many reads.
LATEST_ATTEMPTS = 8
# The key of a checkpoint dict whose value differs between ranks (RNG states): stored per rank.
RANK_LOCAL = "rank_local"
TENSOR_REF = "__tensor__"
SHARD_WAIT_SECONDS = 1800.0
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class FencedOut(StorageError):
    """A newer execution attempt owns `latest`: this writer is a zombie and must stop."""


def checkpoint_key(step: int, attempt: int | None = None) -> str:
    suffix = "" if attempt is None else f"-a{attempt}"
    return f"{CHECKPOINTS}/step-{step:08d}{suffix}"


def step_of(key: str) -> int:
    match = STEP_RE.search(key.rstrip("/"))
    if not match:
        raise ValueError(f"{key!r} is not a checkpoint key")
    return int(match.group(1))


def attempt_of(key: str) -> int:
    """The attempt that wrote a checkpoint (-1 for keys without one)."""
    match = STEP_RE.search(key.rstrip("/"))
    return int(match.group(2)) if match and match.group(2) is not None else -1


def age_order(key: str) -> tuple[int, int]:
    """Oldest first: a newer attempt's checkpoints are newer than any of an older attempt's."""
    return attempt_of(key), step_of(key)


def move_latest(storage: Storage, key: str, attempt: int | None) -> None:
    """Point `latest` at `key`; with an attempt, only if no newer attempt has moved it (FencedOut)."""
    if attempt is None:
        storage.write_text(LATEST, key)
        return
    for _ in range(LATEST_ATTEMPTS):
        current = storage.version(LATEST)
        if current is not None and current.attempt is not None and current.attempt > attempt:
            raise FencedOut(f"{storage.describe(LATEST)} belongs to attempt {current.attempt}; attempt {attempt} "
                            f"(this process) is superseded and does not replace it with {key}")
        try:
            storage.write_if(LATEST, key.encode(), current, attempt)
            return
        except PreconditionFailed:
            continue  # another writer moved it since it was read: read it again
    raise StorageError(f"{storage.describe(LATEST)} kept changing while {key} was being committed")


def tensors_name(rank: int) -> str:
    return f"tensors-{rank}.safetensors"


def rank_local_name(rank: int) -> str:
    return f"rank-{rank}.pt"


def shard_record_name(rank: int) -> str:
    return f"shard-{rank}.json"


def checkpoint_of(object_key: str) -> str:
    """checkpoints/step-00000006/dcp/__0_0.distcp -> checkpoints/step-00000006."""
    return "/".join(object_key.split("/")[:2])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def complete_checkpoints(storage: Storage) -> list[str]:
    """Checkpoint keys that have a manifest, oldest first."""
    keys = {key.rsplit("/", 1)[0] for key in storage.list(CHECKPOINTS) if key.endswith("/" + MANIFEST)}
    return sorted(keys, key=age_order)


def find_resume_checkpoint(storage: Storage) -> str | None:
    """The checkpoint to resume from: `latest` if complete, else the newest complete one."""
    complete = complete_checkpoints(storage)
    if storage.exists(LATEST):
        pointed = storage.read_text(LATEST).strip()
        if pointed in complete:
            return pointed
        log.warning("latest points at an incomplete checkpoint; using the newest complete one", extra={"latest": pointed})
    return complete[-1] if complete else None


# -- the state as tensors + a skeleton ------------------------------------------------------------

def child_path(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


def split_tensors(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` with every tensor replaced by {TENSOR_REF: name}; the tensors go into `tensors`."""
    if torch.is_tensor(value):
        tensors[path] = value.detach()
        return {TENSOR_REF: path}
    if isinstance(value, dict):
        return {key: split_tensors(item, child_path(path, key), tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [split_tensors(item, child_path(path, index), tensors) for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of split_tensors."""
    if isinstance(value, dict):
        if set(value) == {TENSOR_REF}:
            return tensors[value[TENSOR_REF]]
        return {key: join_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [join_tensors(item, tensors) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def assign_shards(tensors: dict[str, torch.Tensor], world: int) -> list[list[str]]:
    """Tensor names per rank, balanced by bytes (largest first to the lightest rank); the same on
    every rank, because every rank holds the same replicated state."""
    shards: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(tensors, key=lambda n: (-tensor_bytes(tensors[n]), n)):
        lightest = loads.index(min(loads))
        shards[lightest].append(name)
        loads[lightest] += tensor_bytes(tensors[name])
    return [sorted(names) for names in shards]


@dataclass(frozen=True)
class WrittenFile:
    size: int
    sha256: str


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> WrittenFile:
    """Write tensors (host memory) in the safetensors layout, hashing the bytes as they are written."""
    header: dict[str, Any] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        size = tensor_bytes(tensor)
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    digest = hashlib.sha256()
    total = 0
    with open(path, "wb") as handle:
        for chunk in (struct.pack("<Q", len(encoded)), encoded):
            handle.write(chunk)
            digest.update(chunk)
            total += len(chunk)
        for name in names:
            data = tensors[name].reshape(-1).view(torch.uint8).numpy()
            handle.write(memoryview(data))
            digest.update(memoryview(data))
            total += data.nbytes
    return WrittenFile(total, digest.hexdigest())


def write_torch(path: Path, value: Any) -> WrittenFile:
    torch.save(value, path)
    return WrittenFile(path.stat().st_size, sha256_file(path))


def moved_file(source: Path) -> Callable[[Path], WrittenFile]:
    """A writer that moves an already written file into place."""
    def move(path: Path) -> WrittenFile:
        shutil.move(source, path)
        return WrittenFile(path.stat().st_size, sha256_file(path))

    return move


# What a checkpoint writes: file name -> a function writing it to a path; or a function giving that.
Writers = dict[str, Callable[[Path], WrittenFile]] | Callable[[], dict[str, Callable[[Path], WrittenFile]]]


class HostBuffers:
    """Host copies of the checkpoint's tensors, allocated once and reused (pinned on a GPU machine)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        copies: dict[str, torch.Tensor] = {}
        device_copy = False
        for name, tensor in tensors.items():
            buffer = self.buffers.get(name)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
                self.buffers[name] = buffer
            buffer.copy_(tensor, non_blocking=tensor.is_cuda)
            device_copy = device_copy or tensor.is_cuda
            copies[name] = buffer
        if device_copy:
            torch.cuda.synchronize()  # the one wait a checkpoint costs the step loop
        return copies


class ObjectStoreCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO: called on EVERY rank (see EveryRankSavesDDPStrategy); each rank writes
    its share of the tensors, rank 0 the rest, in the background; rank 0 commits with the manifest."""

    def __init__(self, storage: Storage, keep_last: int, rank: int = 0, world: int = 1, attempt: int | None = None,
                 protected: Callable[[], set[int]] | None = None):
        self.storage = storage
        self.keep_last = keep_last
        self.protected = protected or set  # steps pruning keeps whatever their age (the best checkpoint)
        self.rank, self.world = rank, world
        self.attempt = attempt
        self.host = HostBuffers()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.in_flight: Future | None = None
        self.saved: list[str] = []
        # Set before a save: what must be durable before that checkpoint commits (rank 0's
        # metrics of the steps it covers); taken by the save.
        self.commit_after: Callable[[], object] | None = None

    # -- save ---------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str, storage_options: Any | None = None) -> None:
        self.wait()  # one checkpoint in flight: its buffers are about to be reused
        checkpoint = dict(checkpoint)
        rank_local = checkpoint.pop(RANK_LOCAL, {})
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(checkpoint, "", tensors)
        mine = assign_shards(tensors, self.world)[self.rank]
        copies = self.host.copy({name: tensors[name] for name in mine})
        writers = {tensors_name(self.rank): lambda p: write_safetensors(p, copies),
                   rank_local_name(self.rank): lambda p: write_torch(p, rank_local)}
        if self.rank == 0:
            writers[STATE] = lambda p: write_torch(p, skeleton)
        self._submit(path, checkpoint.get("global_step"), writers, LAYOUT_TENSORS)

    def save_sharded(self, key: str, sharded: dict[str, Any], rest: dict[str, Any], group: Any = None) -> None:
        """FSDP, on every rank: this rank's shards of `sharded` (weights, optimizer state) are copied
        to host memory here, then written with torch.distributed.checkpoint to a local folder, uploaded
        with the rest (rank 0) and committed in the background. `group` (its own gloo group) carries
        the writers' collectives beside the step loop's."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        rest = dict(rest)
        rank_local = rest.pop(RANK_LOCAL, {})
        folder = Path(tempfile.mkdtemp(prefix="checkpoint-dcp-"))
        saving = dcp.async_save(sharded, storage_writer=dcp.FileSystemWriter(str(folder)), process_group=group)

        def writers() -> dict[str, Callable[[Path], WrittenFile]]:
            getattr(saving, "upload_completion", saving).result()
            files = {f"{DCP_FOLDER}/{file.name}": moved_file(file) for file in sorted(folder.iterdir())}
            files[rank_local_name(self.rank)] = lambda p: write_torch(p, rank_local)
            if self.rank == 0:
                files[STATE] = lambda p: write_torch(p, rest)
            return files

        self._submit(key, rest.get("global_step"), writers, LAYOUT_DCP, cleanup=folder)

    def _submit(self, key: str, step: int | None, writers: Writers, layout: str, cleanup: Path | None = None) -> None:
        commit_after, self.commit_after = self.commit_after, None
        self.in_flight = self.executor.submit(self._write, key, step, writers, layout, commit_after, cleanup)

    def _write(self, key: str, step: int | None, writers: Writers, layout: str,
               commit_after: Callable[[], object] | None = None, cleanup: Path | None = None) -> None:
        started = time.monotonic()
        try:
            if callable(writers):  # known once the files they move are written
                writers = writers()
            files: dict[str, dict[str, Any]] = {}
            with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
                for name, write in writers.items():
                    path = Path(folder, name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    written = write(path)
                    self.storage.upload_file(join_key(key, name), path)
                    files[name] = {"size": written.size, "sha256": written.sha256}
            record = {"rank": self.rank, "world": self.world, "files": files}
            self.storage.write_text(join_key(key, shard_record_name(self.rank)), json.dumps(record))
            if self.rank == 0:
                if commit_after is not None:
                    commit_after()
                self._commit(key, step, layout)
            log.info("checkpoint written", extra={"checkpoint": self.storage.describe(key), "rank": self.rank,
                                                  "seconds": round(time.monotonic() - started, 2)})
        except Exception:
            log.exception("checkpoint write failed; the checkpoint stays incomplete and is never loaded",
                          extra={"checkpoint": self.storage.describe(key)})
            raise
        finally:
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)

    def _commit(self, key: str, step: int | None, layout: str = LAYOUT_TENSORS) -> None:
        """Rank 0: once every rank's record is there, write the manifest, then move `latest`."""
        deadline = time.monotonic() + SHARD_WAIT_SECONDS
        records: list[dict[str, Any]] = []
        for rank in range(self.world):
            name = join_key(key, shard_record_name(rank))
            while not self.storage.exists(name):
                if time.monotonic() > deadline:
                    raise StorageError(f"rank {rank} never finished its share of {self.storage.describe(key)}")
                time.sleep(0.2)
            records.append(json.loads(self.storage.read_text(name)))
        files = {name: meta for record in records for name, meta in record["files"].items()}
        manifest = {"format": FORMAT, "layout": layout, "step": step, "world": self.world, "files": files, "written_at": time.time(),
                    "attempt": self.attempt}
        self.storage.write_text(join_key(key, MANIFEST), json.dumps(manifest, indent=1))
        move_latest(self.storage, key, self.attempt)
        self.saved.append(key)
        self.prune()

    def wait(self) -> None:
        """Block until the checkpoint in flight is written (SIGTERM and the end of a run call this)."""
        if self.in_flight is not None:
            future, self.in_flight = self.in_flight, None
            future.result()

    def teardown(self) -> None:
        self.wait()

    # -- load ---------------------------------------------------------------------------------
    def load_checkpoint(self, path: str, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_state(self.storage, path, self.rank, self.world)

    def load_sharded(self, key: str, sharded: dict[str, Any]) -> dict[str, Any]:
        """FSDP, on every rank: fill `sharded` (this rank's shards) in place from a checkpoint,
        fetching only the shard files this rank reads; returns the rest of the checkpoint dict."""
        import torch.distributed.checkpoint as dcp

        manifest = checked_manifest(self.storage, key, LAYOUT_DCP)
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
            def fetch(name: str) -> None:
                object_name = f"{DCP_FOLDER}/{name}"
                if not Path(folder, object_name).exists():
                    fetch_checked(self.storage, key, object_name, manifest["files"][object_name], Path(folder))

            dcp.load(sharded, storage_reader=fetching_reader(Path(folder, DCP_FOLDER), fetch))
            state = torch.load(fetch_checked(self.storage, key, STATE, manifest["files"][STATE], Path(folder)), weights_only=False)
            state.update(rank_local_state(self.storage, key, manifest, self.rank, self.world, Path(folder)))
        return state

    def remove_checkpoint(self, path: str) -> None:
        self.storage.delete_prefix(path)

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and the protected ones; drop older ones
        and stale partial ones."""
        complete = complete_checkpoints(self.storage)
        newest = age_order(complete[-1]) if complete else (-1, 0)
        protected = self.protected()
        for key in complete[: -self.keep_last]:
            if step_of(key) not in protected:
                self.remove_checkpoint(key)
        partial = {checkpoint_of(k) for k in self.storage.list(CHECKPOINTS)} - set(complete)
        for key in partial:
            if STEP_RE.search(key) and age_order(key) < newest:
                self.remove_checkpoint(key)


def read_manifest(storage: Storage, key: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(join_key(key, MANIFEST)))
    except StorageError:
        raise StorageError(f"checkpoint {storage.describe(key)} has no manifest (incomplete); not loading it") from None


def fetch_checked(storage: Storage, key: str, name: str, meta: dict[str, Any], folder: Path) -> Path:
    local = Path(folder, name)
    storage.download_file(join_key(key, name), local)
    if local.stat().st_size != meta["size"] or sha256_file(local) != meta["sha256"]:
        raise StorageError(f"checkpoint object {storage.describe(join_key(key, name))} does not match its manifest")
    return local


def load_checkpoint_tensors(storage: Storage, key: str) -> dict[str, torch.Tensor]:
    """Every tensor of a complete checkpoint, checked against its manifest."""
    manifest = read_manifest(storage, key)
    tensors: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
        for rank in range(manifest["world"]):
            name = tensors_name(rank)
            tensors.update(load_file(str(fetch_checked(storage, key, name, manifest["files"][name], Path(folder)))))
    return tensors


def checked_manifest(storage: Storage, key: str, layout: str) -> dict[str, Any]:
    """The manifest of a complete checkpoint this trainer can read with the strategy it runs."""
    manifest = read_manifest(storage, key)
    if manifest.get("format") != FORMAT:
        raise StorageError(f"checkpoint {storage.describe(key)} has format {manifest.get('format')}, this trainer reads {FORMAT}")
    written = manifest.get("layout", LAYOUT_TENSORS)
    if written != layout:
        strategy = {LAYOUT_DCP: "fsdp", LAYOUT_TENSORS: "ddp"}
        raise UserInputError(f"checkpoint {storage.describe(key)} was written with training.strategy={strategy[written]}; "
                             f"resume it with that strategy, or set checkpointing.resume=false or a new output.uri")
    return manifest


def rank_local_state(storage: Storage, key: str, manifest: dict[str, Any], rank: int, world: int, folder: Path) -> dict[str, Any]:
    """{RANK_LOCAL: this rank's RNG states} when the checkpoint was written by this world size, else {}."""
    written_by = manifest["world"]
    if written_by != world:
        log.warning(
            "checkpoint written by another world size: weights, optimizer state and step carry over; the data order, "
            "noise and RNG from here on follow the new world size, so the curve will not match an uninterrupted run",
            extra={"checkpoint": storage.describe(key), "written_by_world": written_by, "world": world},
        )
        return {}
    local = rank_local_name(rank)
    if local not in manifest["files"]:
        return {}
    return {RANK_LOCAL: torch.load(fetch_checked(storage, key, local, manifest["files"][local], folder), weights_only=False)}


def load_checkpoint_state(storage: Storage, key: str, rank: int, world: int) -> dict[str, Any]:
    """The checkpoint dict Lightning saved, for this rank (DDP layout)."""
    manifest = checked_manifest(storage, key, LAYOUT_TENSORS)
    tensors = load_checkpoint_tensors(storage, key)
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
        skeleton = torch.load(fetch_checked(storage, key, STATE, manifest["files"][STATE], Path(folder)), weights_only=False)
        state = join_tensors(skeleton, tensors)
        state.update(rank_local_state(storage, key, manifest, rank, world, Path(folder)))
    return state


def fetching_reader(path: Path, fetch: Callable[[str], None]) -> Any:
    """A torch.distributed.checkpoint reader of `path` that first fetches (from the object store)
    the metadata and then only the shard files this rank's load plan reads."""
    from torch.distributed.checkpoint import FileSystemReader

    class FetchingReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            fetch(DCP_METADATA)
            return super().read_metadata(*args, **kwargs)

        def read_data(self, plan: Any, planner: Any) -> Any:
            for name in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
                fetch(name)
            return super().read_data(plan, planner)

    path.mkdir(parents=True, exist_ok=True)
    return FetchingReader(str(path))
