"""The test-bed helm (built from helm.sh/helm/v3) installs a chart into the test bed."""
from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.testbed

CHART = {
    "Chart.yaml": "apiVersion: v2\nname: probe\nversion: 0.1.0\n",
    "values.yaml": "greeting: hello\n",
    "templates/configmap.yaml": (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cfg\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    ),
}


def test_helm_installs_a_chart(testbed, namespace, tmp_path):
    chart = tmp_path / "probe"
    for rel, text in CHART.items():
        (chart / rel).parent.mkdir(parents=True, exist_ok=True)
        (chart / rel).write_text(text)
    env = testbed.env()
    env["HELM_CACHE_HOME"] = str(tmp_path / "helm-cache")
    env["HELM_CONFIG_HOME"] = str(tmp_path / "helm-config")
    env["HELM_DATA_HOME"] = str(tmp_path / "helm-data")
    helm = [str(testbed.bin_dir / "helm"), "--kubeconfig", str(testbed.kubeconfig), "-n", namespace]
    result = subprocess.run([*helm, "install", "rel", str(chart), "--set", "greeting=hi", "--wait"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    cm = testbed.get("configmap", "rel-cfg", namespace)
    assert cm["data"]["greeting"] == "hi"
    listed = subprocess.run([*helm, "list", "-q"], capture_output=True, text=True, env=env, check=True)
    assert listed.stdout.split() == ["rel"]
