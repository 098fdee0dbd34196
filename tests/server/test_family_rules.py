"""The server's family rules without a model: sizes and negative prompts per family, and which
LoRA key layouts (diffusers' and kohya's) belong to a UNet or a transformer model."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dreambooth_serving.adapters import other_family
from dreambooth_serving.family import ServedFamily, UnsupportedRequest

SDXL = ServedFamily("sdxl", native_side=1024, pixel_multiple=8, negative_prompt=True, default_guidance=5.0)
FLUX = ServedFamily("flux", native_side=1024, pixel_multiple=16, negative_prompt=False, default_guidance=3.5)
SD15 = ServedFamily("sd", native_side=512, pixel_multiple=8, negative_prompt=True, default_guidance=7.5)


@pytest.mark.parametrize(("family", "width", "height", "negative", "field"), [
    (FLUX, 1000, None, "", "width"),  # not a multiple of 16
    (FLUX, None, 2064, "", "height"),  # above twice the native size
    (FLUX, None, None, "blurry", "negative_prompt"),
    (SD15, 1032, None, "", "width"),  # SD 1.5 stops at 1024
])
def test_what_a_family_cannot_draw_is_refused_naming_the_field(family: ServedFamily, width: int | None, height: int | None,
                                                                negative: str, field: str) -> None:
    with pytest.raises(UnsupportedRequest) as refused:
        family.check(width, height, negative)
    assert refused.value.field == field and field in str(refused.value)


def test_what_a_family_can_draw_passes() -> None:
    SDXL.check(2048, 1016, "blurry")
    FLUX.check(1024, 2048, "")
    SD15.check(1024, 8, "blurry")
    with pytest.raises(UnsupportedRequest) as refused:
        FLUX.check(1000, 1024, "", size_field="size")
    assert refused.value.field == "size", "the OpenAI API names its one size field"


@pytest.mark.parametrize(("keys", "trained_for"), [
    (["unet.down_blocks.0.attn.to_q.lora_A.weight"], "unet"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "unet"),  # kohya SD/SDXL
    (["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"], "unet"),  # kohya SDXL (original block names)
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "transformer"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "transformer"),  # kohya/BFL Flux
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], None),  # text encoder only: either
])
def test_a_lora_file_of_the_other_denoiser_kind_is_named(tmp_path: Path, keys: list[str], trained_for: str | None) -> None:
    path = tmp_path / "adapter.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    unet_model = SimpleNamespace(unet=object())
    transformer_model = SimpleNamespace(unet=None, transformer=object())
    for served, pipeline in (("unet", unet_model), ("transformer", transformer_model)):
        reason = other_family(path, pipeline)
        if trained_for in (None, served):
            assert reason is None
        else:
            assert f"trained for a {trained_for.replace('unet', 'UNet')} model" in reason, reason
