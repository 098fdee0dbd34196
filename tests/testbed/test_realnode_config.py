"""real-0's configuration builders (pure: no test bed needed)."""
from __future__ import annotations

import hashlib
import ipaddress
import tomllib
from pathlib import Path

from tests.testbed import node_images
from tests.testbed.realnode import (DNS_SERVICE_IP, NODE_NAME, NodeAddresses, capacity_policy, cni_config,
                                    containerd_config, corefile, dns_service, kube_proxy_config, kubelet_config)

ADDRESSES = NodeAddresses(123)


def test_addresses_of_a_prefix_do_not_overlap_and_pods_are_routed_through_the_node():
    link = ipaddress.ip_network(f"{ADDRESSES.host_ip}/30", strict=False)
    pods = ipaddress.ip_network(ADDRESSES.pod_cidr)
    assert ipaddress.ip_address(ADDRESSES.node_ip) in link and not link.overlaps(pods)
    assert ipaddress.ip_address(ADDRESSES.pod_gateway) in pods
    assert not pods.overlaps(ipaddress.ip_network(NodeAddresses(124).pod_cidr))
    assert ipaddress.ip_address(DNS_SERVICE_IP) not in pods


def test_containerd_config_is_toml_with_its_own_paths_and_what_this_vm_needs(tmp_path: Path):
    text = containerd_config(tmp_path / "root", tmp_path / "state", tmp_path / "c.sock", tmp_path / "runc",
                             tmp_path / "cni", "localhost/dreambooth-testbed/pause:abc")
    config = tomllib.loads(text)
    assert (config["root"], config["state"], config["grpc"]["address"]) == (
        str(tmp_path / "root"), str(tmp_path / "state"), str(tmp_path / "c.sock"))
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == "localhost/dreambooth-testbed/pause:abc"
    assert cri["containerd"]["runtimes"]["runc"]["options"] == {"Root": str(tmp_path / "runc"), "SystemdCgroup": False}
    assert cri["cni"]["conf_dir"] == str(tmp_path / "cni")


def test_cni_network_is_the_node_pod_range_on_a_bridge():
    plugins = cni_config(ADDRESSES)["plugins"]
    bridge = next(p for p in plugins if p["type"] == "bridge")
    assert bridge["ipam"]["ranges"] == [[{"subnet": ADDRESSES.pod_cidr, "gateway": ADDRESSES.pod_gateway}]]
    assert bridge["isGateway"] and bridge["hairpinMode"]


def test_kubelet_config_has_the_settings_this_vm_needs(tmp_path: Path):
    config = kubelet_config(ADDRESSES, tmp_path / "c.sock", tmp_path / "logs")
    assert config["failCgroupV1"] is False and config["cgroupsPerQOS"] is False
    assert config["enforceNodeAllocatable"] == [] and config["cgroupDriver"] == "cgroupfs"
    assert config["address"] == ADDRESSES.node_ip and config["clusterDNS"] == [DNS_SERVICE_IP]
    assert config["containerRuntimeEndpoint"] == f"unix://{tmp_path / 'c.sock'}"
    assert config["evictionHard"] == {} and config["podLogsDir"] == str(tmp_path / "logs")


def test_kube_proxy_and_coredns_use_the_node_kubeconfig(tmp_path: Path):
    proxy = kube_proxy_config(ADDRESSES, tmp_path / "kubeconfig")
    assert proxy["clientConnection"]["kubeconfig"] == str(tmp_path / "kubeconfig")
    assert proxy["hostnameOverride"] == NODE_NAME and proxy["clusterCIDR"] == ADDRESSES.pod_cidr
    assert f"kubeconfig {tmp_path / 'kubeconfig'}" in corefile(tmp_path / "kubeconfig")


def test_kube_dns_service_points_at_the_node():
    service, endpoints = dns_service(ADDRESSES)
    assert service["spec"]["clusterIP"] == DNS_SERVICE_IP and "selector" not in service["spec"]
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"
    assert endpoints["endpoints"][0]["addresses"] == [ADDRESSES.node_ip]


def test_capacity_policy_sets_cpu_and_optional_gpus_of_real_0_only():
    policy, binding = capacity_policy("32", gpus=2)
    expression = policy["spec"]["mutations"][0]["applyConfiguration"]["expression"]
    assert '"cpu": "32"' in expression and '"nvidia.com/gpu": "2"' in expression
    assert f"'{NODE_NAME}'" in policy["spec"]["matchConditions"][0]["expression"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert "nvidia.com/gpu" not in capacity_policy("32")[0]["spec"]["mutations"][0]["applyConfiguration"]["expression"]


def test_local_refs_are_qualified_as_buildah_names_them():
    assert node_images.qualified("dreambooth/trainer:0.1.0-abc") == "localhost/dreambooth/trainer:0.1.0-abc"
    assert node_images.qualified("localhost/x/y:1") == "localhost/x/y:1"
    assert node_images.qualified("registry.example:5000/x:1") == "registry.example:5000/x:1"
    assert node_images.repository("localhost/dreambooth/trainer:0.1.0-abc") == "localhost/dreambooth/trainer"


def test_chain_ids_follow_the_oci_definition():
    layers = tuple(node_images.Layer(f"sha256:{c * 64}", 1, f"sha256:{c * 64}") for c in "ab")
    image = node_images.LocalImage("x", "sha256:0", layers)
    second = "sha256:" + hashlib.sha256(f"sha256:{'a' * 64} sha256:{'b' * 64}".encode()).hexdigest()
    assert image.chain_ids() == [f"sha256:{'a' * 64}", second]
