"""Precision placement as the references do it, with CUDA faked (the modules stay on the CPU):
under mixed precision every frozen weight is in the training's half type and only what trains keeps
an fp32 copy; the VAE stays fp32 where the family needs it (SDXL, SD3); without mixed precision
everything is fp32."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreambooth_trainer.config import config_from_dict

from .conftest import tiny_config_dict

SOURCES = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
MODES = {"full": {"lora": {"enabled": False}}, "lora": {"lora": {"enabled": True, "rank": 2}},
         "lora+text": {"lora": {"enabled": True, "rank": 2}, "train_text_encoder": True},
         "full+text": {"lora": {"enabled": False}, "train_text_encoder": True}}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtypes(module: torch.nn.Module, lora: bool | None = None) -> set[torch.dtype]:
    """The types of a module's parameters: all, only LoRA's (True) or only the base's (False)."""
    return {p.dtype for name, p in module.named_parameters() if lora is None or ("lora_" in name) == lora}


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family_name", list(SOURCES))
def test_each_module_is_kept_in_the_type_the_references_keep_it(family_name: str, mode: str, precision: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_trainer.models import load_model
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.train import place_frozen_modules

    training = {"mixed_precision": precision, **MODES[mode]}
    cfg = config_from_dict(tiny_config_dict(str(tmp_path), model={"source": SOURCES[family_name]}, prior={"enabled": False},
                                            training=training))
    family, pipeline = load_model(cfg.model.source)
    parts = family.components(pipeline)
    DreamBoothModule(cfg, family, load_model(cfg.model.source)[1])  # every lazy import done before CUDA is faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    place_frozen_modules(parts, family, cfg, torch.device("cpu"))
    module = DreamBoothModule(cfg, family, pipeline)

    half = HALF.get(precision, torch.float32)
    fp32 = torch.float32
    lora = cfg.training.lora.enabled
    assert dtypes(module.vae) == {fp32 if family_name in ("sdxl", "sd3") else half}, "the VAE"
    if lora:
        assert dtypes(module.denoiser, lora=False) == {half}, "the LoRA's frozen base denoiser"
        assert dtypes(module.denoiser, lora=True) == {fp32}, "the denoiser's adapters"
    else:
        assert dtypes(module.denoiser) == {fp32}, "a fully trained denoiser keeps its fp32 master copy"
    trained = set(family.trainable_text_encoders) if cfg.training.train_text_encoder else set()
    for index, encoder in enumerate(module.text_encoders):
        if index in trained and lora:
            assert dtypes(encoder, lora=False) == {half} and dtypes(encoder, lora=True) == {fp32}, f"text encoder {index} (LoRA)"
        elif index in trained:
            assert dtypes(encoder) == {fp32}, f"text encoder {index} (trained)"
        else:
            assert dtypes(encoder) == {half}, f"text encoder {index} (frozen)"
    assert {p.dtype for p in module.trainable_parameters()} == {fp32}, "only what trains is fp32, and all of it"
