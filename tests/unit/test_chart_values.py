"""values.yaml is documented field by field, secure by default, and agrees with values.schema.json
(checked here without helm; tests/chart runs helm itself against the test bed)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "dreambooth-operator"
# Maps whose children are free-form Kubernetes objects, documented as a whole.
FREE_FORM = {"podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe"}


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def documented_keys() -> tuple[set[str], set[str]]:
    """Dotted paths of all keys in values.yaml, and of those with a `# --` comment above them."""
    keys: set[str] = set()
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    comment = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
            continue
        if stripped.startswith("#") or not stripped:
            if not stripped:
                comment = False
            continue
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if not match:
            continue  # list items and values of documented free-form maps
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(name in FREE_FORM for _, name in stack):
            comment = False
            continue
        path = ".".join([name for _, name in stack] + [match.group(2)])
        keys.add(path)
        if comment:
            documented.add(path)
        comment = False
        stack.append((indent, match.group(2)))
    return keys, documented


def leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in FREE_FORM:
            found |= leaves(value, path + ".")
        else:
            found.add(path)
    return found


def test_every_value_is_documented() -> None:
    keys, documented = documented_keys()
    missing = sorted(leaves(values()) - documented)
    assert not missing, f"values.yaml fields without a `# --` comment: {missing}"
    assert leaves(values()) <= keys


def test_defaults_are_secure() -> None:
    v = values()
    assert v["podSecurityContext"]["runAsNonRoot"] is True and v["podSecurityContext"]["runAsUser"] > 0
    assert v["podSecurityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = v["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert v["resources"]["requests"]["cpu"] and v["resources"]["requests"]["memory"]
    assert v["replicaCount"] == 2 and v["leaderElection"] == {"enabled": True, "leaseSeconds": 10}
    assert v["minio"]["enabled"] is False and v["metrics"]["serviceMonitor"]["enabled"] is False
    assert v["rbac"]["namespaces"] == [], "cluster-wide by default"
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert re.search(r"strategy:\n\s+type: Recreate", deployment), "one operator at a time (kopf standalone)"


def test_no_registry_host_in_default_images() -> None:
    v = values()
    assert v["image"]["registry"] == ""
    for repository in (v["image"]["repository"], v["defaults"]["trainerImage"]["repository"],
                       v["defaults"]["inferenceImage"]["repository"], v["minio"]["image"]["repository"]):
        assert "." not in repository.split("/")[0] and ":" not in repository


@pytest.fixture(scope="module")
def validator() -> Any:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    return jsonschema_rs.validator_for(json.loads((CHART / "values.schema.json").read_text()))


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    def merge(base: Any, extra: Any) -> Any:
        if isinstance(base, dict) and isinstance(extra, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in extra.items()}}
        return extra
    return merge(values(), overrides)


@pytest.mark.parametrize("path", sorted((CHART / "ci").glob("*-values.yaml")), ids=lambda p: p.stem)
def test_schema_accepts_the_defaults_and_each_ci_variant(validator: Any, path: Path) -> None:
    instance = merged(yaml.safe_load(path.read_text()) or {})
    errors = [e.message for e in validator.iter_errors(instance)]
    assert not errors


BAD_VALUES = {
    "two replicas without leader election": {"replicaCount": 2, "leaderElection": {"enabled": False, "leaseSeconds": 10}},
    "a lease too short to keep": {"leaderElection": {"enabled": True, "leaseSeconds": 1}},
    "misspelt key": {"replica": 1},
    "namespace not a DNS label": {"rbac": {"namespaces": ["Team_A"]}},
    "pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "port out of range": {"metrics": {"port": 70000}},
    "root user": {"podSecurityContext": {"runAsUser": 0}},
    "privilege escalation": {"securityContext": {"allowPrivilegeEscalation": True}},
    "no resource requests": {"resources": {"requests": None}},
    "log format": {"operator": {"logFormat": "xml"}},
    "volume size": {"minio": {"persistence": {"size": "lots"}}},
    "endpoint with scheme": {"defaults": {"storage": {"endpoint": "http://minio:9000"}}},
}


@pytest.mark.parametrize("overrides", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_refuses_bad_values(validator: Any, overrides: dict[str, Any]) -> None:
    assert not validator.is_valid(merged(overrides))
