"""Every LoRA file loads as trained: the base model + diffusers' own `load_lora_weights(final/lora)`
computes what the trained model computes, for every family × {the family's default targets, custom
targets (convolutions where the family has them), alpha ≠ rank, text-encoder LoRA}; so does the
kohya file read through diffusers' kohya reader (SD, SDXL; Flux's BFL file is read at real size in
test_real_sizes.py: diffusers' BFL reader assumes FLUX.1's 19/38 blocks).

The adapters are "trained" by drawing every lora_A and lora_B at random (a fresh adapter's lora_B
is zero, which any file reproduces), so a dropped or mis-scaled tensor shows in the outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.export import LORA_DIFFUSERS, LORA_KOHYA, write_lora_files
from dreambooth_trainer.families import FlowSettings, StepMeta
from dreambooth_trainer.module import DreamBoothModule

from .conftest import tiny_config_dict

VARIANTS = {"sd-epsilon": "tiny", "sd-v": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
# Custom targets: linear layers outside the defaults and, where the family has them, convolutions.
CUSTOM_TARGETS = {
    "sd": ["to_q", "to_v", "conv1", "conv_shortcut", "proj_in", "time_emb_proj"],
    "sdxl": ["to_k", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "downsamplers.0.conv", "conv_in"],
    "sd3": ["to_q", "add_k_proj", "ff.net.2", "pos_embed.proj", "norm1.linear"],
    "flux": ["to_q", "proj_mlp", "proj_out", "norm1.linear", "x_embedder"],
}
CASES = {
    "default-targets": {},
    "custom-targets": {"custom": True},
    "alpha-not-rank": {"lora": {"alpha": 8.0}},
    "text-encoder": {"train_text_encoder": True, "lora": {"alpha": 3.0}},
}
RANK = 2
PROMPT = "a photo of sks toy"
KOHYA_READERS = ("sd", "sdxl")  # the kohya files diffusers reads at any size


def base_pipeline(variant: str) -> tuple[Any, Any]:
    from diffusers import DDIMScheduler

    from dreambooth_trainer.models import load_model

    family, pipeline = load_model(VARIANTS[variant])
    if variant == "sd-v":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    return family, pipeline


def trained_module(variant: str, case: str, tmp_path: Path) -> DreamBoothModule:
    family, pipeline = base_pipeline(variant)
    options = dict(CASES[case])
    lora = {"enabled": True, "rank": RANK, **options.pop("lora", {})}
    if options.pop("custom", False):
        lora["target_modules"] = CUSTOM_TARGETS[family.name]
    cfg = config_from_dict(tiny_config_dict(str(tmp_path / "out"), model={"source": VARIANTS[variant]}, prior={"enabled": False},
                                            training={**options, "lora": lora}))
    module = DreamBoothModule(cfg, family, pipeline)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module


def denoiser_inputs(family: Any, pipeline: Any) -> tuple[Any, StepMeta]:
    """A fixed noised batch (the family's own noising) for comparing two denoisers."""
    scheduler = family.training_scheduler(pipeline)
    channels = family.components(pipeline).denoiser.config.in_channels
    channels = channels // 4 if family.name == "flux" else channels  # Flux packs 2x2 latent patches
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, channels, 8, 8, generator=generator)
    return family.noise(latents, scheduler, generator, FlowSettings()), StepMeta(int(pipeline.vae_scale_factor))


@torch.no_grad()
def outputs(family: Any, pipeline: Any) -> dict[str, Any]:
    """The text conditions, a denoiser prediction on fixed inputs, and one same-seed image."""
    conds = family.encode_text(pipeline, [PROMPT, "a photo of toy"], torch.device("cpu"))
    noised, meta = denoiser_inputs(family, pipeline)
    prediction = family.predict(family.components(pipeline).denoiser, noised, conds, meta)
    image = family.generate(pipeline, [PROMPT], [""], [5], steps=2, guidance=3.0, height=32, width=32)[0]
    return {"conds": conds, "prediction": prediction, "image": torch.tensor(list(image.getdata()), dtype=torch.int16)}


def assert_same_outputs(expected: dict[str, Any], got: dict[str, Any], what: str) -> None:
    for name, tensor in expected["conds"].items():
        assert torch.allclose(got["conds"][name], tensor, atol=1e-5, rtol=1e-4), f"{what}: text condition {name}"
    assert torch.allclose(got["prediction"], expected["prediction"], atol=1e-5, rtol=1e-4), f"{what}: denoiser output"
    difference = int((got["image"] - expected["image"]).abs().max())
    assert difference <= 1, f"{what}: same-seed images differ by {difference}/255"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_lora_files_load_as_trained(variant: str, case: str, tmp_path: Path) -> None:
    module = trained_module(variant, case, tmp_path)
    family = module.family
    _, reference_base = base_pipeline(variant)
    trained = family.with_trained(reference_base, module.denoiser, list(module.text_encoders))
    expected = outputs(family, trained)
    folder = tmp_path / "lora"
    write_lora_files(folder, family, module.denoiser, list(module.text_encoders))

    _, fresh = base_pipeline(variant)
    untouched = outputs(family, fresh)
    assert (untouched["prediction"] - expected["prediction"]).abs().max() > 1e-3, "the adapters change the output"
    fresh.load_lora_weights(str(folder), weight_name=LORA_DIFFUSERS)
    assert_same_outputs(expected, outputs(family, fresh), f"{variant} {case}: {LORA_DIFFUSERS}")

    if family.name in KOHYA_READERS:
        _, fresh = base_pipeline(variant)
        fresh.load_lora_weights(str(folder), weight_name=LORA_KOHYA)
        assert_same_outputs(expected, outputs(family, fresh), f"{variant} {case}: {LORA_KOHYA}")
