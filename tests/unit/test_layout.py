"""The folder operator/ must never shadow the standard library's `operator` module."""
import subprocess
import sys
from pathlib import Path

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
    importers = [path for folder in ("trainer", "operator") for path in (REPO / folder).rglob("*.py")
                 if "dreambooth_cli" in path.read_text()]
    assert importers == []
