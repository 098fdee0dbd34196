"""docs/serving.md decides every field and endpoint the official OpenAI SDK's image calls send:
read from the installed SDK, so a field a new SDK adds fails here until the docs (and the server)
decide it."""
from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
DECISION = re.compile(r"\b(supported|accepted|refused)\b")


def table_rows(section: str) -> dict[str, str]:
    """`| `name`, `other` | ... |` rows of the docs section titled `section`: each name -> its row."""
    text = DOCS.read_text().split(f"### {section}\n", 1)[1].split("\n### ", 1)[0]
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                rows[name] = line
    return rows


def sdk_fields() -> set[str]:
    from openai.types import image_edit_params, image_generate_params

    typed = (image_generate_params.ImageGenerateParamsNonStreaming, image_generate_params.ImageGenerateParamsStreaming,
             image_edit_params.ImageEditParamsNonStreaming, image_edit_params.ImageEditParamsStreaming)
    return {key for params in typed for key in params.__required_keys__ | params.__optional_keys__}


def test_every_field_the_sdk_sends_is_decided_in_the_docs() -> None:
    rows = table_rows("Fields")
    fields = sdk_fields()
    assert {"prompt", "image", "mask", "markup", "input_fidelity", "svg"} <= fields, "the SDK's params were read"
    undecided = {field for field in fields if field not in rows or not DECISION.search(rows[field].split(" | ", 2)[2])}
    assert not undecided, f"docs/serving.md's Fields table does not decide {sorted(undecided)}"


def test_every_images_and_models_call_of_the_sdk_has_its_endpoint_in_the_docs() -> None:
    from openai.resources.images import Images
    from openai.resources.models import Models

    calls = {f"images.{name}" for name in ("generate", "edit", "create_variation") if hasattr(Images, name)}
    calls |= {f"models.{name}" for name in ("list", "retrieve", "delete") if hasattr(Models, name)}
    assert len(calls) == 6
    rows = DOCS.read_text().split("### Endpoints\n", 1)[1].split("\n### ", 1)[0]
    for call in calls:
        row = next((line for line in rows.splitlines() if f"`{call}`" in line), None)
        assert row is not None and DECISION.search(row), f"docs/serving.md's Endpoints table does not decide {call}"
