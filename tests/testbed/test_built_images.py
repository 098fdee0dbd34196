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
