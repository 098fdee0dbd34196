"""The OCI runtime config local-0 gives runc, built from a pod's container and its image (pure:
no runc, no images needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.testbed import oci

IMAGE = oci.ImageConfig(id="f" * 64, entrypoint=("dreambooth",), cmd=("--help",),
                        env=("PATH=/opt/venv/bin:/usr/bin:/bin", "HOME=/tmp", "LANG=C.UTF-8"),
                        working_dir="/tmp", user="1000:1000")
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def plan(container: dict, pod_spec: dict | None = None, mounts: list[oci.Mount] | None = None,
         netns: str | None = "/run/netns/tb1-abc", image: oci.ImageConfig = IMAGE) -> oci.ContainerPlan:
    pod_spec = pod_spec or {}
    return oci.ContainerPlan(
        container={"name": "main", **container}, pod_spec=pod_spec, image=image, env={"POD": "x", "HOME": "/home/pod"},
        mounts=mounts or [], rootfs="/b/rootfs", hostname="rex-0", netns=netns,
        identity=oci.resolve_identity({"name": "main", **container}, pod_spec, image, "/nonexistent"),
        cgroup="/tb1-abc-main-0")


@pytest.mark.parametrize(("container", "argv"), [
    ({}, ["dreambooth", "--help"]),
    ({"args": ["train", "/etc/c.yaml"]}, ["dreambooth", "train", "/etc/c.yaml"]),
    ({"command": ["python", "-c", "1"]}, ["python", "-c", "1"]),
    ({"command": ["kopf"], "args": ["run", "-m", "x"]}, ["kopf", "run", "-m", "x"]),
    ({"args": []}, ["dreambooth"]),
])
def test_command_replaces_the_entrypoint_and_args_replace_cmd(container: dict, argv: list[str]) -> None:
    assert oci.process_args({"name": "main", **container}, IMAGE) == argv


def test_no_command_anywhere_is_a_config_error() -> None:
    with pytest.raises(oci.ContainerConfigError, match="no command"):
        oci.process_args({"name": "main"}, oci.ImageConfig(id="x"))


def test_restricted_container_spec() -> None:
    spec = oci.runtime_spec(plan({"securityContext": RESTRICTED, "resources": {"limits": {"memory": "2Gi"}}},
                                 {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000}}))
    process = spec["process"]
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [2000]}
    assert process["noNewPrivileges"] is True
    assert all(process["capabilities"][kind] == [] for kind in ("bounding", "effective", "permitted", "inheritable", "ambient"))
    assert spec["root"] == {"path": "/b/rootfs", "readonly": True}
    assert {"type": "network", "path": "/run/netns/tb1-abc"} in spec["linux"]["namespaces"]
    assert spec["linux"]["resources"]["memory"] == {"limit": 2 * 2**30}
    assert spec["hostname"] == "rex-0" and process["cwd"] == "/tmp"
    env = dict(item.split("=", 1) for item in process["env"])
    assert env["PATH"] == "/opt/venv/bin:/usr/bin:/bin", "the image's PATH stays"
    assert env["HOME"] == "/home/pod" and env["POD"] == "x", "the pod's env wins over the image's"


def test_defaults_keep_a_writable_root_and_the_default_capabilities() -> None:
    spec = oci.runtime_spec(plan({"workingDir": "/work"}, netns=None))
    assert spec["root"]["readonly"] is False
    assert spec["process"]["noNewPrivileges"] is False, "allowPrivilegeEscalation defaults to true"
    assert spec["process"]["capabilities"]["bounding"] == list(oci.DEFAULT_CAPABILITIES)
    assert not any(ns["type"] == "network" for ns in spec["linux"]["namespaces"]), "hostNetwork: the node's namespace"
    assert spec["process"]["cwd"] == "/work"
    assert "memory" not in spec["linux"]["resources"]


def test_capabilities_added_after_drop_all() -> None:
    assert oci.capabilities({"securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}) == ["CAP_NET_BIND_SERVICE"]
    kept = oci.capabilities({"securityContext": {"capabilities": {"drop": ["NET_RAW", "CAP_MKNOD"]}}})
    assert "CAP_NET_RAW" not in kept and "CAP_MKNOD" not in kept and "CAP_CHOWN" in kept


def test_volumes_are_binds_and_memory_volumes_sized_tmpfs() -> None:
    mounts = [oci.Mount("/etc/dreambooth", "/pods/u/volumes/config", read_only=True),
              oci.Mount("/dev/shm", size=256 * 2**20), oci.Mount("/tmp", "/pods/u/volumes/scratch")]
    spec = oci.runtime_spec(plan({}, mounts=mounts))
    by_target = {m["destination"]: m for m in spec["mounts"]}
    assert by_target["/etc/dreambooth"]["options"] == ["rbind", "rprivate", "ro"]
    assert by_target["/tmp"]["source"] == "/pods/u/volumes/scratch" and "rw" in by_target["/tmp"]["options"]
    shm = [m for m in spec["mounts"] if m["destination"] == "/dev/shm"]
    assert len(shm) == 1 and shm[0]["type"] == "tmpfs" and f"size={256 * 2**20}" in shm[0]["options"]


def test_image_user_and_run_as_non_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1234:4321::/app:/bin/sh\n")
    named = oci.ImageConfig(id="x", cmd=("run",), user="app")
    assert oci.resolve_identity({"name": "c"}, {}, named, str(tmp_path)) == oci.Identity(1234, 4321)
    assert oci.resolve_identity({"name": "c", "securityContext": {"runAsUser": 7}}, {"securityContext": {"runAsUser": 5}},
                                named, str(tmp_path)).uid == 7, "the container's securityContext wins over the pod's"
    root_image = oci.ImageConfig(id="x", cmd=("run",))
    with pytest.raises(oci.ContainerConfigError, match="runAsNonRoot and image will run as root"):
        oci.resolve_identity({"name": "c"}, {"securityContext": {"runAsNonRoot": True}}, root_image, str(tmp_path))


@pytest.mark.parametrize(("quantity", "size"), [("256Mi", 256 * 2**20), ("2Gi", 2 * 2**30), ("1G", 10**9), ("1048576", 2**20)])
def test_quantities(quantity: str, size: int) -> None:
    assert oci.quantity_bytes(quantity) == size
