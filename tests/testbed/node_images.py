"""Images for real-0's containerd: imported once per content hash, only the layers it lacks.

The images are built with buildah into this machine's containers/storage (`make images`); real-0's
containerd keeps its own content and snapshots in a slot kept across test-bed restarts
(tests/testbed/realnode.py). An image's refs are unique per content (`...:<version>-<image id>`,
the pause image `...:<source hash>`), so a ref containerd already lists is already imported.

A new ref costs only its new layers: buildah exports it into an OCI layout where every layer whose
snapshot containerd already holds is a sparse placeholder of the right size (buildah skips blobs
that exist), and the archive streamed to `ctr images import` carries only the real ones (zstd at
its fastest level: an OCI layout always gets compressed layers). After
the import unpacked them, the layer blobs are dropped from containerd's content store (the
snapshots are what containers run from), so each slot holds one unpacked copy of each layer.

Images are named `localhost/<repository>:<tag>`, the name buildah gives local images, so pods'
`image:` fields, containerd and buildah agree without any registry.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.testbed.realnode import RealNode

HERE = Path(__file__).resolve().parent
PAUSE_REPOSITORY = "localhost/dreambooth-testbed/pause"


def qualified(ref: str) -> str:
    """`dreambooth/trainer:x` -> `localhost/dreambooth/trainer:x` (a ref with a host part stays)."""
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"localhost/{ref}"


def pause_key() -> str:
    """The pause binary's cache key, as build.sh computes it (its go.mod and main.go)."""
    source = (HERE / "pause" / "go.mod").read_bytes() + (HERE / "pause" / "main.go").read_bytes()
    return hashlib.sha256(source).hexdigest()[:12]


def _buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args[:3])} failed: {result.stderr.strip()[-2000:]}")
    return result


def ensure_pause_image(cache: Path) -> str:
    """The sandbox image: the static pause binary alone, made once per source (no registry)."""
    ref = f"{PAUSE_REPOSITORY}:{pause_key()}"
    if _buildah("inspect", "--type", "image", ref, check=False).returncode == 0:
        return ref
    binary = cache / "bin" / f"pause-{pause_key()}"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: run `bash tests/testbed/build.sh` (make test does)")
    container = _buildah("from", "scratch").stdout.strip()
    try:
        _buildah("copy", "--chmod", "0755", container, str(binary), "/pause")
        _buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535",
                 "--label", "org.opencontainers.image.description=test-bed pod sandbox", container)
        _buildah("commit", "--quiet", container, ref)
    finally:
        _buildah("rm", container, check=False)
    return ref


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class LocalImage:
    """An image in containers/storage: its manifest's layers and its config digest (the image ID)."""
    ref: str
    image_id: str
    layers: tuple[Layer, ...]

    def chain_ids(self) -> list[str]:
        """containerd's snapshot names for the layers (OCI chain IDs)."""
        chain: list[str] = []
        for layer in self.layers:
            if not chain:
                chain.append(layer.diff_id)
            else:
                chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {layer.diff_id}".encode()).hexdigest())
        return chain


def local_image(ref: str) -> LocalImage:
    info = json.loads(_buildah("inspect", "--type", "image", ref).stdout)
    manifest = json.loads(info["Manifest"])
    diff_ids = info["OCIv1"]["rootfs"]["diff_ids"]
    layers = tuple(Layer(entry["digest"], int(entry["size"]), diff_id)
                   for entry, diff_id in zip(manifest["layers"], diff_ids, strict=True))
    return LocalImage(ref, "sha256:" + info["FromImageID"], layers)


@dataclass(frozen=True)
class Imported:
    ref: str
    new_layers: int
    new_bytes: int
    seconds: float


def _placeholder(layout: Path, layer: Layer) -> Path:
    algorithm, hexdigest = layer.digest.split(":", 1)
    path = layout / "blobs" / algorithm / hexdigest
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as blob:
        blob.truncate(layer.size)  # sparse: no disk used
    return path


def _stream_layout(layout: Path, skip: set[Path], ctr_argv: list[str]) -> None:
    """The OCI layout as a tar streamed to `ctr images import -`, without the `skip` blobs."""
    process = subprocess.Popen(ctr_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    try:
        with tarfile.open(fileobj=process.stdin, mode="w|") as archive:
            for path in sorted(layout.rglob("*")):
                if path.is_file() and path not in skip:
                    archive.add(path, arcname=str(path.relative_to(layout)), recursive=False)
    except BaseException:
        process.kill()
        process.wait()
        raise
    _, err = process.communicate(timeout=1800)  # closes ctr's stdin: the end of the archive
    if process.returncode != 0:
        raise RuntimeError(f"ctr images import failed ({process.returncode}): {err.decode(errors='replace')[-2000:]}")


def _layer_digests(layout: Path) -> list[str]:
    """The layer digests of the one manifest in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    algorithm, hexdigest = index["manifests"][0]["digest"].split(":", 1)
    manifest = json.loads((layout / "blobs" / algorithm / hexdigest).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


def import_image(node: "RealNode", ref: str, present: set[str]) -> Imported:
    """Import one image into the node's containerd, sending only the layers it has no snapshot of."""
    start = time.monotonic()
    image = local_image(ref)
    chain = image.chain_ids()
    snapshots = set(node.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.split())
    with tempfile.TemporaryDirectory(prefix="real-0-import-", dir=node.containerd_root.parent) as tmp:
        layout = Path(tmp) / "layout"
        skip = {_placeholder(layout, layer) for layer, chain_id in zip(image.layers, chain) if chain_id in snapshots}
        new = [layer for layer, chain_id in zip(image.layers, chain) if chain_id not in snapshots]
        # An OCI layout always gets compressed layers: zstd at its fastest level costs least CPU.
        _buildah("push", "--quiet", "--compression-format", "zstd", "--compression-level", "1", "--format", "oci",
                 ref, f"oci:{layout}:{ref}")
        sent = set(_layer_digests(layout)) - {layer.digest for layer in image.layers if layer not in new}
        _stream_layout(layout, skip, ["ctr", "--address", str(node.socket), "--namespace", "k8s.io",
                                      "images", "import", "--snapshotter", "overlayfs", "-"])
    for digest in sent:  # unpacked now: the snapshot is what runs
        node.ctr("content", "rm", digest, check=False)
    present.add(ref)
    return Imported(ref, len(new), sum(layer.size for layer in new), time.monotonic() - start)


def repository(ref: str) -> str:
    return ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref


def load_images(node: "RealNode", refs: list[str], keep: frozenset[str] = frozenset()) -> list[Imported]:
    """Every ref present in the node's containerd (imported where missing); older tags of the same
    repositories are removed from the slot (their snapshots go with them unless still shared),
    except those in `keep` (refs this test bed handed out before: its pods may still start them)."""
    wanted = [qualified(ref) for ref in refs]
    present = set(node.ctr("images", "ls", "-q").stdout.split())
    done = [import_image(node, ref, present) for ref in wanted if ref not in present]
    stale = [ref for ref in present if repository(ref) in {repository(w) for w in wanted} and ref not in wanted and ref not in keep]
    if stale and os.environ.get("TESTBED_KEEP_OLD_IMAGES") != "1":
        node.ctr("images", "rm", "--sync", *stale, check=False)
    return done
