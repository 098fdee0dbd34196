"""The Helm chart on the test bed: lint, the values schema, a server-side dry run of every variant,
install, `helm test`, least privilege measured with `kubectl auth can-i`, a DreamboothJob taken
through its lifecycle by the operator the chart runs (in its pod on real-0, with the chart's
ServiceAccount token: in-cluster config, RBAC enforced), and an uninstall that leaves only the CRD.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_operator import permissions
from tests.e2e.conftest import BUCKET, condition, get_job, gpu_spec, trainer_pods
from tests.testbed.cluster import REAL_NODE, binaries, pinned_versions

pytestmark = pytest.mark.testbed

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dreambooth-operator"
CI_VALUES = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
KUBE_VERSION = pinned_versions()["KUBERNETES_VERSION"]
RELEASE = "dbop"
FULLNAME = f"{RELEASE}-dreambooth-operator"
CRD = "dreamboothjobs.dreambooth.dev"
SECRET = "dreambooth-s3"


class Helm:
    """The test bed's helm with its own config/cache dirs (nothing of the user's is touched)."""

    def __init__(self, binary: Path, home: Path, kubeconfig: Path | None = None) -> None:
        self.binary = binary
        self.env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
                        HELM_DATA_HOME=str(home / "data"))
        self.kubeconfig = kubeconfig

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        base = [str(self.binary)] + (["--kubeconfig", str(self.kubeconfig)] if self.kubeconfig else [])
        result = subprocess.run([*base, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture(scope="module")
def offline_helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm for lint/template: needs the test-bed binaries (make testbed-binaries), not the cluster."""
    binary = binaries()["helm"]
    if not binary.exists():
        pytest.skip(f"{binary} is missing: run `make testbed-binaries`")
    return Helm(binary, tmp_path_factory.mktemp("helm-offline"))


@pytest.fixture(scope="module")
def helm(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(testbed.bin_dir / "helm", tmp_path_factory.mktemp("helm"), testbed.kubeconfig)


def values_args(variant: str) -> list[str]:
    return ["-f", str(CI_VALUES[variant])]


def operator_image_args(ref: str) -> list[str]:
    """The chart's operator image set to this checkout's build (real-0 runs it on containerd)."""
    repository, _, tag = ref.rpartition(":")
    return ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}"]


# --- without a cluster ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", CI_VALUES)
def test_helm_lint(offline_helm: Helm, variant: str) -> None:
    result = offline_helm.run("lint", str(CHART), "--strict", *values_args(variant))
    assert "0 chart(s) failed" in result.stdout


BAD_SETS = {
    "two replicas without leader election": ["--set", "leaderElection.enabled=false", "--set", "replicaCount=2"],
    "misspelt key": ["--set", "replica=1"],
    "namespace not a DNS label": ["--set", "rbac.namespaces={Team_A}"],
    "pull policy": ["--set", "image.pullPolicy=Sometimes"],
    "privilege escalation": ["--set", "securityContext.allowPrivilegeEscalation=true"],
    "root user": ["--set", "podSecurityContext.runAsUser=0"],
    "metrics port": ["--set", "metrics.port=70000"],
    "endpoint with scheme": ["--set", "defaults.storage.endpoint=http://minio:9000"],
}


@pytest.mark.parametrize("sets", BAD_SETS.values(), ids=BAD_SETS.keys())
def test_the_schema_refuses_bad_values(offline_helm: Helm, sets: list[str]) -> None:
    result = offline_helm.run("template", "r", str(CHART), "--kube-version", KUBE_VERSION, *sets, check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr, result.stderr


def render(helm: Helm, variant: str, namespace: str, *extra: str) -> list[dict[str, Any]]:
    out = helm.run("template", RELEASE, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION,
                   "--include-crds", *values_args(variant), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# --- against the test bed -------------------------------------------------------------------


def test_default_image_tags_follow_the_charts_app_version(offline_helm: Helm) -> None:
    """The operator image and the defaults it hands to jobs are tagged with the chart's appVersion,
    the version the release workflow (.github/workflows/images.yaml) pushes."""
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    rendered = [doc for doc in yaml.safe_load_all(offline_helm.run("template", "rel", str(CHART), "--kube-version", KUBE_VERSION).stdout) if doc]
    deployment = next(doc for doc in rendered if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == f"dreambooth/operator:{app_version}"
    assert env["DREAMBOOTH_TRAINER_IMAGE"] == f"dreambooth/trainer:{app_version}"
    assert env["DREAMBOOTH_INFERENCE_IMAGE"] == f"dreambooth/inference:{app_version}"


@pytest.mark.parametrize("variant", CI_VALUES)
def test_rendered_manifests_pass_a_server_side_dry_run(testbed: Any, offline_helm: Helm, variant: str) -> None:
    namespace = f"dry-{variant}"
    docs = render(offline_helm, variant, namespace)
    # The peering objects need their CRDs established first (a dry run creates no CRD).
    testbed.kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "kopf.dev_peerings.yaml"))
    testbed.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
    for ns in {namespace} | {d["metadata"]["namespace"] for d in docs if d["metadata"].get("namespace")}:
        testbed.kubectl("create", "namespace", ns, check=False)
    # The test bed has no prometheus-operator CRDs: the ServiceMonitor is checked for shape here only.
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert bool(monitors) == (variant == "monitoring")
    for monitor in monitors:
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": [d for d in docs if d["kind"] != "ServiceMonitor"]})
    result = testbed.kubectl("apply", "--dry-run=server", "-f", "-", input=body, check=False)
    assert result.returncode == 0, result.stderr
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD}" in result.stdout


@dataclass
class Release:
    namespace: str
    install_seconds: float
    install_output: str

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{FULLNAME}"


@pytest.fixture(scope="module")
def release(testbed: Any, helm: Helm, operator_image: str) -> Iterator[Release]:
    """The chart installed with its defaults (cluster-wide); its operator pods run on real-0."""
    namespace = f"dbop-{uuid.uuid4().hex[:5]}"
    testbed.kubectl("create", "namespace", namespace)
    started = time.monotonic()
    # Storage defaults for every job (the test bed's MinIO), so jobs may leave `storage` out.
    installed = helm.run("install", RELEASE, str(CHART), "-n", namespace, *operator_image_args(operator_image),
                         "--set", f"defaults.storage.endpoint={testbed.minio.endpoint}",
                         "--set", f"defaults.storage.bucket={BUCKET}", "--set", f"defaults.storage.credentialsSecret={SECRET}",
                         "--set", "defaults.trainerImage.tag=chart-default",
                         "--wait", "--timeout", "180s", timeout=240)
    yield Release(namespace, time.monotonic() - started, installed.stdout)
    helm.run("uninstall", RELEASE, "-n", namespace, "--wait", check=False)
    testbed.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def operator_pods(testbed: Any, namespace: str, release_name: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={release_name},app.kubernetes.io/component=operator"
    return [p for p in testbed.items("pods", namespace, selector) if not p["metadata"].get("deletionTimestamp")]


LEADING, STANDING_BY = "leading: this replica acts", "standing by"


def leads(testbed: Any, pod: dict[str, Any]) -> bool:
    """The replica's own word (runtime log): its last leadership line says it acts."""
    log = testbed.pod_log(pod["metadata"]["name"], pod["metadata"]["namespace"], "operator")
    return log.rfind(LEADING) > log.rfind(STANDING_BY)


def leader_pod(testbed: Any, namespace: str, release_name: str, timeout: float = 120) -> dict[str, Any]:
    """The one active replica (leader election); fails if two act at once."""
    def one() -> dict[str, Any] | None:
        active = [p for p in operator_pods(testbed, namespace, release_name) if leads(testbed, p)]
        assert len(active) <= 1, f"two replicas act at once: {[p['metadata']['name'] for p in active]}"
        return active[0] if active else None

    try:
        return testbed.wait_for(f"the active replica of {release_name}", one, timeout=timeout)
    except TimeoutError as error:
        raise TimeoutError(f"{error}\n{leadership_report(testbed, namespace, release_name)}") from None


def leadership_report(testbed: Any, namespace: str, release_name: str) -> str:
    """What a failed leader wait needs to be understood: the peering records and each replica's own lines."""
    lines = []
    for kind, name in (("clusterkopfpeering", f"{release_name}-dreambooth-operator"),
                       ("kopfpeering", f"{release_name}-dreambooth-operator")):
        found = testbed.get(kind, name, namespace if kind == "kopfpeering" else None)
        if found:
            lines.append(f"{kind}/{name} status: {json.dumps(found.get('status'))} (now {time.time():.0f})")
    for pod in operator_pods(testbed, namespace, release_name):
        name = pod["metadata"]["name"]
        log = testbed.pod_log(name, namespace, "operator").splitlines()
        said = [line for line in log if any(word in line for word in ("leading", "standing by", "peering", "--- "))]
        lines.append(f"{name} ({pod['status'].get('phase')}, restarts "
                     f"{[c.get('restartCount') for c in pod['status'].get('containerStatuses', [])]}): "
                     + " | ".join(said[-8:] + log[-3:]))
    return "\n".join(lines)


def test_install_creates_the_operator_deployment(testbed: Any, release: Release, operator_image: str) -> None:
    deployment = testbed.get("deployment", FULLNAME, release.namespace)
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployment["status"].get("availableReplicas") == 2
    pods = operator_pods(testbed, release.namespace, RELEASE)
    assert len(pods) == 2
    pod = pods[0]
    assert pod["spec"]["serviceAccountName"] == FULLNAME
    assert pod["spec"]["nodeName"] == REAL_NODE, "no GPU asked: the operator lands off the GPU pool"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["kopf", "run"] and "--all-namespaces" in container["args"]
    assert f"--peering={FULLNAME}" in container["args"] and testbed.get("clusterkopfpeering", FULLNAME) is not None
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["spec"]["securityContext"]["runAsNonRoot"]
    assert container["resources"]["requests"]
    status = pod["status"]["containerStatuses"][0]
    assert container["image"] == operator_image and status["containerID"].startswith("containerd://"), \
        "real-0 runs the chart's operator from this checkout's image, on containerd"
    assert testbed.get("crd", CRD) is not None
    notes = release.install_output.split("NOTES:", 1)[-1]
    assert f"helm test {RELEASE} -n {release.namespace}" in notes and "kubectl -n <your-namespace> apply -f examples/job.yaml" in notes
    assert "dreambooth submit ./photos --token sks --class dog -n <your-namespace>" in notes
    assert f"ConfigMap {release.namespace}/dreambooth-defaults; users who may not list ConfigMaps" in notes
    print(f"\n[chart] helm install --wait took {release.install_seconds:.1f} s")


def test_helm_test_passes(helm: Helm, release: Release) -> None:
    result = helm.run("test", RELEASE, "-n", release.namespace, "--timeout", "120s", timeout=180)
    assert "Succeeded" in result.stdout, result.stdout


def can_i(testbed: Any, who: str, verb: str, resource: str, namespace: str | None, subresource: str | None = None) -> bool:
    """The API server's RBAC answer (a SubjectAccessReview: no discovery, so it also works for
    resources whose CRD is not installed, e.g. Kueue's workloads). `resource` may name one object
    (`configmaps/NAME`); `who` is signed in (system:authenticated), as every real caller is."""
    kind, _, name = resource.partition("/")
    plural, _, group = kind.partition(".")
    attributes = {"verb": verb, "resource": plural, "group": group, **({"namespace": namespace} if namespace else {}),
                  **({"subresource": subresource} if subresource else {}), **({"name": name} if name else {})}
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": who, "groups": ["system:authenticated"], "resourceAttributes": attributes}}
    result = testbed.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review))
    return bool(json.loads(result.stdout)["status"].get("allowed"))


# What dreambooth_operator.kube and kopf call (dreambooth_operator.permissions), as (verb, resource, subresource).
def _needs(perms: tuple[Any, ...]) -> list[tuple[str, str, str | None]]:
    needs = []
    for p in perms:
        resource, _, sub = p.resource.partition("/")
        for verb in p.verbs:
            needs.append((verb, f"{resource}.{p.group}" if p.group else resource, sub or None))
    return needs


OPERATOR_NEEDS = _needs(permissions.NAMESPACED)
OPERATOR_NEEDS_CLUSTER = _needs(permissions.CLUSTER)
OPERATOR_MUST_NOT = [
    ("create", "secrets", None), ("list", "secrets", None), ("update", "secrets", None), ("delete", "secrets", None),
    ("create", "dreamboothjobs.dreambooth.dev", None), ("update", "dreamboothjobs.dreambooth.dev", None),
    ("create", "pods", None), ("update", "pods", None), ("create", "pods", "exec"),
    ("patch", "deployments.apps", None), ("create", "serviceaccounts", "token"),
    ("create", "roles.rbac.authorization.k8s.io", None), ("create", "rolebindings.rbac.authorization.k8s.io", None),
    ("delete", "kopfpeerings.kopf.dev", None), ("list", "rayjobs.ray.io", None), ("create", "servicemonitors.monitoring.coreos.com", None),
    ("update", "jobs.batch", None), ("patch", "configmaps", None), ("patch", "networkpolicies.networking.k8s.io", None),
    ("get", "workloads.kueue.x-k8s.io", None),
    ("patch", "workloads.kueue.x-k8s.io", None),
]
OPERATOR_MUST_NOT_CLUSTER = [
    ("delete", "nodes", None), ("list", "nodes", None), ("patch", "nodes", None), ("list", "namespaces", None),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None), ("bind", "clusterroles.rbac.authorization.k8s.io", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None), ("update", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("impersonate", "users", None), ("delete", "clusterkopfpeerings.kopf.dev", None),
]


def test_operator_rbac_is_exactly_what_it_uses_cluster_wide(testbed: Any, release: Release) -> None:
    who = release.service_account
    wrong: list[str] = []
    for namespace in ("default", release.namespace):
        for verb, resource, sub in OPERATOR_NEEDS:
            if not can_i(testbed, who, verb, resource, namespace, sub):
                wrong.append(f"cannot {verb} {resource}{'/' + sub if sub else ''} in {namespace}")
        for verb, resource, sub in OPERATOR_MUST_NOT:
            if can_i(testbed, who, verb, resource, namespace, sub):
                wrong.append(f"CAN {verb} {resource}{'/' + sub if sub else ''} in {namespace}")
    for verb, resource, sub in OPERATOR_NEEDS_CLUSTER:
        if not can_i(testbed, who, verb, resource, None, sub):
            wrong.append(f"cannot {verb} {resource} cluster-wide")
    for verb, resource, sub in OPERATOR_MUST_NOT_CLUSTER:
        if can_i(testbed, who, verb, resource, None, sub):
            wrong.append(f"CAN {verb} {resource} cluster-wide")
    assert not wrong, "\n".join(wrong)


def test_users_manage_dreamboothjobs_with_the_built_in_roles(testbed: Any, release: Release, namespace: str) -> None:
    for user, role in (("alice", "edit"), ("bob", "view")):
        testbed.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}", f"--user={user}", "-n", namespace)
    # The controller-manager aggregates the chart's roles into view/edit/admin.
    testbed.wait_for("edit aggregates DreamboothJobs",
                     lambda: can_i(testbed, "alice", "create", "dreamboothjobs.dreambooth.dev", namespace), timeout=30)
    assert can_i(testbed, "alice", "delete", "dreamboothjobs.dreambooth.dev", namespace)
    assert not can_i(testbed, "alice", "patch", "dreamboothjobs.dreambooth.dev", namespace, "status"), "status is the operator's"
    assert can_i(testbed, "bob", "list", "dreamboothjobs.dreambooth.dev", namespace)
    assert can_i(testbed, "bob", "get", "dreamboothjobs.dreambooth.dev", namespace, "status")
    assert not can_i(testbed, "bob", "create", "dreamboothjobs.dreambooth.dev", namespace)
    assert not can_i(testbed, "carol", "list", "dreamboothjobs.dreambooth.dev", namespace), "no role, no access"


def test_the_defaults_are_published_for_clients_as_the_operator_gets_them(testbed: Any, release: Release) -> None:
    """ConfigMap dreambooth-defaults (what `dreambooth submit` reads) holds the operator's DREAMBOOTH_*
    env, and every signed-in user may read that one object and nothing else there."""
    published = testbed.get("configmap", "dreambooth-defaults", release.namespace)
    assert published["metadata"]["labels"]["dreambooth.dev/installation-defaults"] == "true"
    pods = operator_pods(testbed, release.namespace, RELEASE)  # the replicas share one template
    env = {e["name"]: e.get("value", "") for e in pods[0]["spec"]["containers"][0]["env"] if e["name"] in published["data"]}
    assert env == {key: value for key, value in published["data"].items() if key in env}
    assert set(published["data"]) - set(env) == {"DREAMBOOTH_STORAGE_CLIENT_ENDPOINT"}, "client-only keys"
    assert published["data"]["DREAMBOOTH_STORAGE_ENDPOINT"] == testbed.minio.endpoint
    assert can_i(testbed, "carol", "get", "configmaps/dreambooth-defaults", release.namespace)
    assert not can_i(testbed, "carol", "get", "configmaps/other", release.namespace)
    assert not can_i(testbed, "carol", "list", "configmaps", release.namespace)
    assert not can_i(testbed, "carol", "get", "configmaps/dreambooth-defaults", "default")


def phase_of(testbed: Any, namespace: str, name: str) -> str | None:
    return (get_job(testbed, namespace, name).get("status") or {}).get("phase")


def wait_phase_in(testbed: Any, namespace: str, name: str, phases: set[str], timeout: float = 90) -> str:
    try:
        return testbed.wait_for(f"{name} in {sorted(phases)}",
                                lambda: (phase_of(testbed, namespace, name) in phases) and phase_of(testbed, namespace, name),
                                timeout=timeout, interval=0.5)
    except TimeoutError:
        status = get_job(testbed, namespace, name).get("status") or {}
        raise TimeoutError(f"{name} never reached {sorted(phases)}; status: {json.dumps(status, indent=1)}") from None


def take_a_job_through_its_lifecycle(testbed: Any, namespace: str, subject: str, first_timeout: float = 90,
                                     operator_env: dict[str, str] | None = None) -> None:
    """Suspended at creation, resumed, trained on two 8-GPU KWOK nodes, served, then deleted by its
    own ttlSecondsAfterFinished. Whoever runs the operator does every step. With `operator_env`
    (the chart's DREAMBOOTH_* defaults), the job leaves storage and images to the installation."""
    testbed.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": namespace},
                   "stringData": {"AWS_ACCESS_KEY_ID": testbed.minio.access_key,
                                  "AWS_SECRET_ACCESS_KEY": testbed.minio.secret_key}})
    spec = gpu_spec(testbed, subject, runPolicy={"suspend": True, "ttlSecondsAfterFinished": 30},
                    serving={"replicas": 1, "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"}})
    assert spec["storage"]["bucket"] == BUCKET
    if operator_env:
        del spec["storage"]
    testbed.apply({"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob",
                   "metadata": {"name": "rex", "namespace": namespace}, "spec": spec})

    wait_phase_in(testbed, namespace, "rex", {"Suspended"}, timeout=first_timeout)
    job = get_job(testbed, namespace, "rex")
    assert condition(job, "Accepted")["status"] == "True", "the Secret and the photos were read with the chart's RBAC"
    assert not trainer_pods(testbed, namespace, "rex")

    testbed.kubectl("patch", "dbj", "rex", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    if wait_phase_in(testbed, namespace, "rex", {"Running", "Succeeded"}) == "Running":
        pods = trainer_pods(testbed, namespace, "rex", 0)
        assert len(pods) == 2 and all(p["spec"]["nodeName"].startswith("gpu-") for p in pods)
        if operator_env:
            container = pods[0]["spec"]["containers"][0]
            env = {e["name"]: e for e in container["env"]}
            assert container["image"] == operator_env["DREAMBOOTH_TRAINER_IMAGE"] == "dreambooth/trainer:chart-default"
            assert env["AWS_ENDPOINT_URL"]["value"] == f"http://{operator_env['DREAMBOOTH_STORAGE_ENDPOINT']}"
            assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == operator_env["DREAMBOOTH_STORAGE_CREDENTIALS_SECRET"]
        for pod in pods:  # play the trainer: both ranks finish
            if pod["status"].get("phase") == "Running":
                testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Succeeded")
    wait_phase_in(testbed, namespace, "rex", {"Succeeded"})
    done = get_job(testbed, namespace, "rex")
    assert done["status"]["endpoint"] == f"http://rex-serve.{namespace}.svc:8080"
    testbed.wait_for("ServingReady", lambda: (condition(get_job(testbed, namespace, "rex"), "ServingReady") or {}).get("status") == "True",
                     timeout=25)

    events = json.loads(testbed.kubectl("get", "events", "-n", namespace, "--field-selector",
                                        "involvedObject.name=rex,involvedObject.kind=DreamboothJob", "-o", "json").stdout)["items"]
    assert events, "the operator posts an Event on every transition"

    # ttlSecondsAfterFinished: the operator deletes the job itself. (kopf then removes its finalizer
    # once the job's timer has stopped, which can take up to a minute: the deletion request is what
    # the operator's RBAC must allow.)
    def deletion_requested() -> bool:
        job = testbed.get("dreamboothjob", "rex", namespace)
        return job is None or bool(job["metadata"].get("deletionTimestamp"))

    testbed.wait_for("rex deleted after its TTL", deletion_requested, timeout=60)


def assert_handled_without_denials(testbed: Any, pod: dict[str, Any], job_namespace: str, allowed: tuple[str, ...] = ()) -> None:
    log = testbed.pod_log(pod["metadata"]["name"], pod["metadata"]["namespace"], "operator")
    assert job_namespace in log, "the chart's operator pod (not another operator) handled the job"
    denied = [line for line in log.splitlines()
              if ("Forbidden" in line or " 403" in line or "Not enough permissions" in line)
              and not any(text in line for text in allowed)]
    assert not denied, "\n".join(denied[:5])


def test_the_charts_operator_takes_a_job_through_its_lifecycle(
    testbed: Any, release: Release, namespace: str, subject: str
) -> None:
    """The cluster-wide operator pod, with the chart's ServiceAccount token and nothing else; the job
    names no storage and no images: the chart's defaults fill them in."""
    pod = leader_pod(testbed, release.namespace, RELEASE)
    operator_env = {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}
    take_a_job_through_its_lifecycle(testbed, namespace, subject, operator_env=operator_env)
    assert_handled_without_denials(testbed, pod, namespace)


def test_a_namespaced_install_grants_nothing_outside_its_namespaces_and_suffices(
    testbed: Any, helm: Helm, release: Release, namespace: str, subject: str, operator_image: str
) -> None:
    """rbac.namespaces: one Role per listed namespace, no cluster-wide grant at all; its operator
    (kopf without CRD or namespace listing) still runs a job through its lifecycle."""
    home = f"dbns-{uuid.uuid4().hex[:5]}"
    testbed.kubectl("create", "namespace", home)
    # One operator at a time: the cluster-wide release would also serve this namespace.
    testbed.kubectl("scale", "deployment", FULLNAME, "-n", release.namespace, "--replicas=0")
    testbed.wait_for("the cluster-wide operator stopped", lambda: not operator_pods(testbed, release.namespace, RELEASE), timeout=60)
    try:
        helm.run("install", "dbns", str(CHART), "-n", home, *operator_image_args(operator_image),
                 "--set", f"rbac.namespaces={{{namespace}}}",
                 "--set", "rbac.aggregateToDefaultRoles=false", "--wait", "--timeout", "120s", timeout=180)
        deployment = testbed.get("deployment", "dbns-dreambooth-operator", home)
        assert f"--namespace={namespace}" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        who = f"system:serviceaccount:{home}:dbns-dreambooth-operator"
        wrong = [f"cannot {v} {r} in {namespace}" for v, r, s in OPERATOR_NEEDS if not can_i(testbed, who, v, r, namespace, s)]
        wrong += [f"CAN {v} {r} in {release.namespace}" for v, r, s in OPERATOR_NEEDS if can_i(testbed, who, v, r, release.namespace, s)]
        wrong += [f"CAN {v} {r} in {namespace}" for v, r, s in OPERATOR_MUST_NOT if can_i(testbed, who, v, r, namespace, s)]
        wrong += [f"CAN {v} {r} cluster-wide" for v, r, s in OPERATOR_MUST_NOT_CLUSTER if can_i(testbed, who, v, r, None, s)]
        wrong += [f"CAN {v} {r} cluster-wide" for v, r, s in OPERATOR_NEEDS_CLUSTER if can_i(testbed, who, v, r, None, s)]
        if not can_i(testbed, who, "patch", "kopfpeerings.kopf.dev", namespace):
            wrong.append(f"cannot patch kopfpeerings in {namespace} (leader election)")
        assert not wrong, "\n".join(wrong)
        cluster_scoped = testbed.kubectl("get", "clusterrolebindings,clusterroles", "-l", "app.kubernetes.io/instance=dbns", "-o", "name").stdout
        assert not cluster_scoped.strip(), cluster_scoped

        # Until the operator reads DREAMBOOTH_OPERATOR_SCANNING, kopf retries the forbidden namespace
        # and CRD listings for about a minute before it falls back to the listed namespaces.
        take_a_job_through_its_lifecycle(testbed, namespace, subject, first_timeout=180)
        pod = leader_pod(testbed, home, "dbns")
        # kopf says once that it cannot list namespaces/CRDs and falls back to the listed namespaces.
        assert_handled_without_denials(testbed, pod, namespace, allowed=("namespaces", "resources", "customresourcedefinitions"))
    finally:
        helm.run("uninstall", "dbns", "-n", home, "--wait", check=False)
        testbed.kubectl("delete", "namespace", home, "--wait=false", check=False)
        testbed.kubectl("scale", "deployment", FULLNAME, "-n", release.namespace, "--replicas=2", check=False)


def _kopf_pid(pod_name: str) -> int:
    """The operator process of a pod on real-0, as the host sees it (the chart sets POD_ID to the pod's name)."""
    needle = f"POD_ID={pod_name}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0") \
                    and b"kopf" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no operator process for pod {pod_name}")


def test_killing_the_active_replica_hands_over_within_seconds(testbed: Any, release: Release, namespace: str, subject: str) -> None:
    """Two replicas, one acts; SIGKILL the active one (no goodbye): the other takes over once its
    peering record expires (leaderElection.leaseSeconds: 10) and handles a job applied meanwhile."""
    active = leader_pod(testbed, release.namespace, RELEASE)
    standby = [p for p in operator_pods(testbed, release.namespace, RELEASE) if p["metadata"]["name"] != active["metadata"]["name"]]
    assert len(standby) == 1 and not leads(testbed, standby[0])
    testbed.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": namespace},
                   "stringData": {"AWS_ACCESS_KEY_ID": testbed.minio.access_key, "AWS_SECRET_ACCESS_KEY": testbed.minio.secret_key}})
    killed = time.monotonic()
    os.kill(_kopf_pid(active["metadata"]["name"]), signal.SIGKILL)
    spec = gpu_spec(testbed, subject, runPolicy={"suspend": True})
    del spec["storage"]
    testbed.apply({"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob", "metadata": {"name": "handover", "namespace": namespace}, "spec": spec})
    testbed.wait_for("the job handled by the standby", lambda: (get_job(testbed, namespace, "handover").get("status") or {}).get("phase") == "Suspended",
                     timeout=45, interval=0.5)
    handover = time.monotonic() - killed
    assert leads(testbed, standby[0]), "the standby replica took over"
    assert handover < 30, f"handover took {handover:.1f} s"
    print(f"\n[chart] active replica SIGKILLed: the standby acted on a new job {handover:.1f} s later (leaseSeconds 10)")
    testbed.kubectl("delete", "dbj", "handover", "-n", namespace, "--wait=false")
    # restartPolicy Always: the kubelet restarts the killed container in the same pod.
    def restarted() -> dict[str, Any] | None:
        pod = testbed.get("pod", active["metadata"]["name"], release.namespace) or {}
        status = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
        return status if status.get("restartCount", 0) >= 1 and status.get("ready") else None

    status = testbed.wait_for("the killed replica restarted in place", restarted, timeout=90)
    assert status["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
    assert len(operator_pods(testbed, release.namespace, RELEASE)) == 2


def test_uninstall_leaves_only_the_crd(testbed: Any, helm: Helm, release: Release) -> None:
    """Last in this module: removes the release the tests above used."""
    helm.run("uninstall", RELEASE, "-n", release.namespace, "--wait", "--timeout", "120s", timeout=180)
    selector = f"app.kubernetes.io/instance={RELEASE}"
    namespaced = "deployments,replicasets,pods,services,serviceaccounts,configmaps,secrets,roles,rolebindings,jobs"
    testbed.wait_for("the release's pods gone", lambda: not testbed.kubectl(
        "get", "pods", "-n", release.namespace, "-l", selector, "-o", "name").stdout.strip(), timeout=60)
    left = testbed.kubectl("get", namespaced, "-n", release.namespace, "-l", selector, "-o", "name").stdout.split()
    left += testbed.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name").stdout.split()
    left += [s for s in testbed.kubectl("get", "secrets", "-n", release.namespace, "-o", "name").stdout.split() if "sh.helm.release" in s]
    assert not left, left
    assert not helm.run("list", "-n", release.namespace, "-q").stdout.strip()
    assert testbed.get("crd", CRD) is not None, "Helm keeps CRDs (and with them every DreamboothJob)"
