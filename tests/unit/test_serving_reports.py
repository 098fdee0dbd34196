"""Where a server looks for the training report beside the weights it loads (pure)."""
from __future__ import annotations

from pathlib import Path

from dreambooth_serving.reports import is_stored_model, read_report, report_folders


def test_an_export_folder_holds_its_report() -> None:
    assert report_folders("s3://b/jobs/ns/rex/u/exports/best") == ["s3://b/jobs/ns/rex/u/exports/best"]
    assert report_folders("s3://b/jobs/ns/rex/u/final/") == ["s3://b/jobs/ns/rex/u/final"]


def test_an_adapter_finds_it_one_folder_up() -> None:
    assert report_folders("s3://b/r/final/lora") == ["s3://b/r/final/lora", "s3://b/r/final"]
    assert report_folders("s3://b/r/final/lora/pytorch_lora_weights.safetensors") == ["s3://b/r/final/lora", "s3://b/r/final"]
    assert report_folders("/data/rex.safetensors") == ["/data"]


def test_built_in_and_hub_models_have_none(tmp_path: Path) -> None:
    assert not is_stored_model("tiny") and not is_stored_model("hf://org/model") and read_report("tiny") is None
    assert is_stored_model("s3://b/x") and is_stored_model(str(tmp_path))
    (tmp_path / "final" / "lora").mkdir(parents=True)
    assert read_report(str(tmp_path / "final" / "lora")) is None
    (tmp_path / "final" / "report.html").write_text("<title>r</title>")
    assert read_report(str(tmp_path / "final" / "lora")) == b"<title>r</title>"
