"""The images `make images` built (images/build.py, buildah): what they are made of, looked at in
the machine's containers/storage. Their sizes are printed (docs/images.md keeps the figures)."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.testbed.images import REPO, RECORD

pytestmark = pytest.mark.testbed
APP_VERSION = yaml.safe_load((REPO / "charts" / "dreambooth-operator" / "Chart.yaml").read_text())["appVersion"]


def inspect(ref: str) -> dict[str, Any]:
    return json.loads(subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True, text=True,
                                     check=True).stdout)


def layer_sizes(ref: str) -> list[int]:
    return [layer["size"] for layer in json.loads(inspect(ref)["Manifest"])["layers"]]


@contextmanager
def mounted(ref: str) -> Iterator[Path]:
    """The image's files (a throwaway buildah container, removed afterwards)."""
    container = subprocess.run(["buildah", "from", "--pull=never", ref], capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield Path(subprocess.run(["buildah", "mount", container], capture_output=True, text=True, check=True).stdout.strip())
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The built images as buildah knows them (these tests look inside them; none runs on a node)."""
    from tests.testbed.images import built_images

    return built_images()


def test_sizes_are_recorded_and_printed(images: dict[str, str]) -> None:
    recorded = json.loads(RECORD.read_text())["images"]
    for name in ("operator", "trainer", "inference"):
        entry = recorded[name]
        assert entry["ref"] == images[name] and entry["size_bytes"] > 0
        print(f"\n[images] {entry['ref']}: {entry['size_bytes'] / 1e9:.2f} GB")
    assert recorded["operator"]["size_bytes"] < recorded["trainer"]["size_bytes"] / 5, "the operator image holds no torch"


@pytest.mark.parametrize("name", ["operator", "trainer", "inference"])
def test_non_root_user_and_oci_labels(images: dict[str, str], name: str) -> None:
    config = inspect(images[name])["OCIv1"]["config"]
    assert config["User"] == "1000:1000"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == APP_VERSION
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == head
    assert labels["org.opencontainers.image.source"]


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_the_project_is_a_small_last_layer_over_the_dependencies(images: dict[str, str], name: str) -> None:
    """A code change rebuilds megabytes: the dependencies (torch & co) sit in a layer below."""
    sizes = layer_sizes(images[name])
    assert sizes[-1] < 20 * 2**20, f"{name}: the project's layer is {sizes[-1] / 2**20:.1f} MiB"
    assert max(sizes[:-1]) > 10 * sizes[-1], f"{name}: layers {sizes}"


def test_the_inference_image_is_the_trainer_image_plus_metadata(images: dict[str, str]) -> None:
    trainer = json.loads(inspect(images["trainer"])["Manifest"])["layers"]
    inference = json.loads(inspect(images["inference"])["Manifest"])["layers"]
    assert [layer["digest"] for layer in inference] == [layer["digest"] for layer in trainer]
    assert inspect(images["inference"])["OCIv1"]["config"]["Entrypoint"] == ["dreambooth", "serve"]


def test_the_trainer_ships_cuda_once_with_nccl(images: dict[str, str]) -> None:
    """torch's wheels bring the CUDA libraries (cuBLAS, cuDNN, NCCL); nothing else does."""
    with mounted(images["trainer"]) as root:
        cublas = sorted(p for p in root.rglob("libcublas.so*") if not p.is_symlink())
        nccl = sorted(root.rglob("libnccl.so*"))
        assert cublas and {p.parent for p in cublas} == {cublas[0].parent}, f"cuBLAS in several places: {cublas}"
        assert "/opt/venv/" in str(cublas[0]) and not (root / "usr" / "local" / "cuda").exists()
        assert nccl and all("/opt/venv/" in str(p) for p in nccl)


def test_the_base_keeps_nothing_of_this_machine(images: dict[str, str]) -> None:
    """The base made with mmdebstrap holds no apt source and no apt option of the machine that made it."""
    with mounted(images["operator"]) as root:
        apt = root / "etc" / "apt"
        assert not (apt / "sources.list").exists() and not list((apt / "sources.list.d").iterdir())
        assert not (apt / "apt.conf.d" / "99mmdebstrap").exists()
        assert not list((root / "mnt").iterdir()), "the machine's uv cache was mounted there during the build only"


def test_the_trainer_leaves_out_what_nothing_runs(images: dict[str, str]) -> None:
    """No static archive, no debug info (and no static symbol table in torch's libraries; their
    dynamic symbols stay), and no trace of the binutils used to strip them."""
    with mounted(images["trainer"]) as root:
        venv = root / "opt" / "venv"
        assert not [p for p in venv.rglob("*.a") if p.is_file()]
        for library in (*venv.rglob("libtriton.so"), *venv.rglob("libtorch_cuda.so"), *venv.rglob("libtorch_cpu.so")):
            sections = subprocess.run(["readelf", "-S", "-W", str(library)], capture_output=True, text=True, check=True).stdout
            assert ".debug_info" not in sections and ".dynsym" in sections, library
            assert "libtorch" not in library.name or ".symtab" not in sections, library
        assert not (root / "usr" / "bin" / "strip").exists()
        assert not list((root / "var" / "lib" / "apt" / "lists").glob("*Packages*")), "no package index of the machine's mirror"


SMOKE = """
import torch, torch.distributed, triton
from triton.backends import backends
x = torch.randn(64, 64, requires_grad=True)
(x @ x).tanh().sum().backward()
assert x.grad.shape == (64, 64)
assert torch.distributed.is_nccl_available() and "nvidia" in backends
print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "cuda", torch.version.cuda, flush=True)
"""


def test_torch_runs_in_the_slimmed_trainer_image(images: dict[str, str]) -> None:
    """After the strip: torch (its CUDA libraries load on a CPU-only node too), NCCL and triton."""
    container = subprocess.run(["buildah", "from", "--pull=never", images["trainer"]], capture_output=True, text=True,
                               check=True).stdout.strip()
    try:
        result = subprocess.run(["buildah", "run", "--isolation", "chroot", container, "python", "-c", SMOKE],
                                capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nccl (2," in result.stdout and "cuda 13" in result.stdout, result.stdout
