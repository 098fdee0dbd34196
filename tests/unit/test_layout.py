"""The folder operator/ must never shadow the standard library's `operator` module."""
import re
import subprocess
import sys
from pathlib import Path

from tests.repo_files import repo_files

REPO = Path(__file__).resolve().parents[2]


def test_running_python_from_the_repo_root_keeps_the_stdlib_operator() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    result = subprocess.run([sys.executable, "-c", "import operator, collections; print(operator.__file__)"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "/operator/" not in result.stdout


def test_the_operator_package_imports_under_its_own_name() -> None:
    import dreambooth_operator.builders  # noqa: F401


def test_the_command_face_imports_no_room_until_a_command_runs() -> None:
    code = ("import sys, dreambooth_cli.main; "
            "print(sorted(m for m in ('torch', 'kubernetes', 'kopf', 'dreambooth_trainer', 'dreambooth_operator') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_nothing_imports_the_command_face() -> None:
    importers = [path for folder in ("trainer", "operator", "serving") for path in repo_files(folder, suffix=".py")
                 if "dreambooth_cli" in path.read_text()]
    assert importers == []


def test_dependencies_point_one_way() -> None:
    """Serving sits above the trainer and knows no cluster; the trainer knows no server."""
    def importers(folder: str, *modules: str) -> list[str]:
        return [f"{path.relative_to(REPO)} imports {module}" for path in repo_files(folder, suffix=".py")
                for module in modules if f"import {module}" in path.read_text() or f"from {module}" in path.read_text()]

    assert importers("serving", "kopf", "kubernetes", "dreambooth_operator") == []
    assert importers("trainer", "dreambooth_serving", "fastapi", "uvicorn", "kopf", "kubernetes") == []


def test_the_operator_image_needs_nothing_heavy_from_serving() -> None:
    code = ("import sys, dreambooth_serving.registry, dreambooth_operator.shared_server; "
            "print(sorted(m for m in ('torch', 'diffusers', 'fastapi', 'uvicorn', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_api_package_imports_pydantic_and_the_standard_library_only() -> None:
    """The contract between operator, client and trainer depends on none of them (nor on yaml or torch)."""
    allowed = set(sys.stdlib_module_names) | {"pydantic", "pydantic_core", "typing_extensions", "annotated_types", "dreambooth_api"}
    imported = {line.split()[1].split(".")[0] for path in repo_files("api", suffix=".py") for line in path.read_text().splitlines()
                if line.startswith(("import ", "from ")) and not line.startswith("from .")}
    assert imported - {"__future__"} <= allowed, imported - allowed


def test_nothing_imports_the_operator_but_its_entry_point() -> None:
    """The client, trainer and server read the API package, never the operator's modules."""
    importers = [str(path.relative_to(REPO)) for folder in ("api", "client", "cli", "trainer", "serving") for path in repo_files(folder, suffix=".py")
                 if re.search(r"^\s*(from|import) dreambooth_operator", path.read_text(), re.M)]
    assert importers == []
