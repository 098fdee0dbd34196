"""Defaults per family and mode, each the reference's (docs/families.md has the table): the LoRA
learning rate, the guidance class and validation images are drawn with (Flux-dev: its distilled
3.5), SDXL's zeros for an empty negative prompt, prior.sampler honoured where it means something."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreambooth_trainer.config import config_from_dict

from .conftest import tiny_config_dict


@pytest.mark.parametrize(("lora", "expected"), [(True, 1e-4), (False, 5e-6)])
def test_the_learning_rate_defaults_to_the_references_for_the_mode(lora: bool, expected: float, tmp_path: Path) -> None:
    from dreambooth_trainer.module import learning_rate

    data = tiny_config_dict(str(tmp_path), training={"lora": {"enabled": lora}})
    del data["training"]["learning_rate"]
    assert learning_rate(config_from_dict(data)) == expected
    data["training"]["learning_rate"] = 3e-3
    assert learning_rate(config_from_dict(data)) == 3e-3, "a given rate is kept"


def test_class_images_and_samples_use_each_familys_pipeline_guidance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flux-dev's class and validation images are drawn at its distilled guidance 3.5 (not 7.5)."""
    from dreambooth_trainer import class_images, validation
    from dreambooth_trainer.models import load_model

    seen: list[tuple[str, float]] = []

    def recording(pipeline: object, requests: list, steps: int, guidance: float | None = None, **kwargs: object) -> list:
        from dreambooth_trainer.families import family_of_pipeline

        family = family_of_pipeline(pipeline)
        seen.append((family.name, family.default_guidance if guidance is None else guidance))
        return []

    monkeypatch.setattr("dreambooth_trainer.generate.generate_images", recording)
    monkeypatch.setattr(validation, "generate_images", recording)
    for source, expected in (("tiny", 7.5), ("tiny-sdxl", 5.0), ("tiny-sd3", 7.0), ("tiny-flux", 3.5)):
        cfg = config_from_dict(tiny_config_dict(str(tmp_path / source), model={"source": source}))
        family, pipeline = load_model(source)
        assert class_images.class_guidance(cfg, family) == expected
        seen.clear()
        validation.Validator(cfg, pipeline, [], torch.autocast("cpu", enabled=False), None, family).draw(pipeline, ["a photo of sks toy"])
        assert seen == [(family.name, expected)], "validation images"


def test_an_empty_sdxl_negative_prompt_is_zeros_as_in_the_pipeline_per_row() -> None:
    from dreambooth_trainer.generate import ImageRequest, generate_images
    from dreambooth_trainer.models import load_model

    family, pipeline = load_model("tiny-sdxl")
    pipeline.set_progress_bar_config(disable=True)

    def pipeline_alone(negative: str | None) -> torch.Tensor:
        image = pipeline(prompt=["a photo of sks toy"], negative_prompt=negative, num_inference_steps=2, height=32, width=32,
                         guidance_scale=5.0, generator=[torch.Generator().manual_seed(4)]).images[0]
        return pixels(image)

    def pixels(image: object) -> torch.Tensor:
        return torch.tensor(list(image.getdata()), dtype=torch.int16)

    def differ(a: torch.Tensor, b: torch.Tensor) -> int:
        return int((a - b).abs().max())

    ours = generate_images(pipeline, [ImageRequest("a photo of sks toy", "", 4), ImageRequest("a photo of sks toy", "blurry", 4)],
                           steps=2, height=32, width=32)
    zeros = pipeline_alone(None)
    assert differ(zeros, pipeline_alone("")) > 8, "zeros and the encoding of '' differ on this model"
    # A batch of two rounds a little differently from a batch of one: within 1/255.
    assert differ(pixels(ours[0]), zeros) <= 1, "an empty negative is the pipeline's zeros, even batched with another"
    assert differ(pixels(ours[1]), pipeline_alone("blurry")) <= 1


def test_prior_sampler_is_honoured_for_sdxl(tmp_path: Path) -> None:
    from dreambooth_trainer.class_images import class_sampler
    from dreambooth_trainer.generate import ImageRequest, generate_images
    from dreambooth_trainer.models import load_model

    family, pipeline = load_model("tiny-sdxl")
    cfg = config_from_dict(tiny_config_dict(str(tmp_path), model={"source": "tiny-sdxl"}, prior={"sampler": "ddim"}))
    assert class_sampler(cfg, family) == "ddim"
    request = [ImageRequest("a photo of toy", "", 1)]
    own = generate_images(pipeline, request, steps=3, height=32, width=32)[0]
    ddim = generate_images(pipeline, request, steps=3, height=32, width=32, sampler="ddim")[0]
    assert own.tobytes() != ddim.tobytes(), "the named sampler drew the class image"
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler", "the pipeline keeps its own scheduler afterwards"
    plain = config_from_dict(tiny_config_dict(str(tmp_path), model={"source": "tiny-sdxl"}))
    assert class_sampler(plain, family) is None and class_sampler(plain, load_model("tiny")[0]) == "ddim"
