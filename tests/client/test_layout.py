"""Who may talk to the Kubernetes API: the operator and the client, nobody else; `dreambooth train`
in a pod never imports the Kubernetes client; `kubectl dreambooth` is a plugin by kubectl's rules."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from tests.repo_files import repo_files

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMPORTS_KUBERNETES = re.compile(r"^\s*(import kubernetes|from kubernetes[ .])", re.M)


def kubernetes_importers() -> list[str]:
    """The top-level folders of the product whose modules import the Kubernetes client."""
    return sorted({path.relative_to(REPO).parts[0] for path in repo_files(suffix=".py")
                   if len(path.relative_to(REPO).parts) > 1 and path.relative_to(REPO).parts[0] not in ("tests", "benchmarks", "examples")
                   and IMPORTS_KUBERNETES.search(path.read_text(errors="replace"))})


def test_only_the_operator_and_the_client_import_the_kubernetes_client() -> None:
    assert kubernetes_importers() == ["client", "operator"]


def test_the_check_reads_the_source_not_a_demo_beds_pod_filesystems() -> None:
    """`make demo` leaves pods' root filesystems under .testbed/ (a Python install each): not ours."""
    pod_root = REPO / ".testbed" / f"layout-check-{uuid.uuid4().hex[:8]}"
    module = pod_root / "pods" / "p" / "rootfs" / "usr" / "lib" / "python3" / "site-packages" / "a.py"
    module.parent.mkdir(parents=True)
    try:
        module.write_text("import kubernetes\n")
        assert kubernetes_importers() == ["client", "operator"]
    finally:
        shutil.rmtree(pod_root)


BLOCKER = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("kubernetes", "kopf", "dreambooth_client", "dreambooth_operator"):
            raise ImportError(f"dreambooth train imported {name}")
sys.meta_path.insert(0, Refuse())
sys.argv = ["dreambooth", "train", sys.argv[1]]
from dreambooth_cli.main import main
main()
"""


def test_dreambooth_train_never_imports_the_kubernetes_client(tmp_path: Path) -> None:
    """The whole trainer is imported (the run stops at its first data check: an empty photo folder)."""
    config = yaml.safe_load((REPO / "examples" / "train-tiny.yaml").read_text())
    (tmp_path / "photos").mkdir()
    config["data"]["instance_uri"] = str(tmp_path / "photos")
    config["output"]["uri"] = str(tmp_path / "out")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-c", BLOCKER, str(tmp_path / "train.yaml")], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert "imported" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2 and "holds no images" in result.stderr, result.stderr[-2000:]


def test_the_kubectl_plugin_is_an_executable_named_by_kubectls_convention() -> None:
    plugin = BIN / "kubectl-dreambooth"
    assert plugin.is_file() and plugin.stat().st_mode & 0o111
    result = subprocess.run([str(plugin), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage: kubectl dreambooth [OPTIONS] COMMAND" in result.stdout
    assert "submit" in result.stdout and "jobs" in result.stdout
