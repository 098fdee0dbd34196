"""Each family's training step equals its reference: the same batch, noise, timesteps (sigmas) and
weights go through our step and through the step math of that family's diffusers DreamBooth script
(`reference_steps.py`); the loss agrees to 1e-6 and every gradient of the denoiser agrees. Our
deliberate differences are options whose defaults are the reference's (docs/families.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dreambooth_trainer.config import config_from_dict

from . import reference_steps as ref
from .conftest import SUBJECT, tiny_config_dict

VARIANTS = {"sd1-epsilon": "tiny", "sd2-v": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}


def module_and_batch(variant: str, tmp_path: Path) -> tuple[Any, dict]:
    from diffusers import DDIMScheduler

    from dreambooth_trainer.data import DreamBoothBatches, ImageSet, load_instance_images
    from dreambooth_trainer.models import load_model
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.storage import open_storage

    cfg = config_from_dict(tiny_config_dict(str(tmp_path), model={"source": VARIANTS[variant]},
                                            prior={"loss_weight": 0.7}, training={"lora": {"enabled": False}}))
    family, pipeline = load_model(cfg.model.source)
    if variant == "sd2-v":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    instance = load_instance_images(open_storage(str(SUBJECT)), cfg.data.instance_prompt, cfg.data.token, None)
    klass = ImageSet([Image.new("RGB", (48, 40), (30, 90, 200)), Image.new("RGB", (40, 40), (200, 200, 30))], cfg.prior.class_prompt)
    batches = DreamBoothBatches(instance, klass, cfg.data.resolution, False, False, 1, 0, 0, 1, 0, 4)
    module = DreamBoothModule(cfg, family, pipeline, None, batches.prompts)
    return module, batches.batch_at(3)


def denoiser_gradients(module: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in module.denoiser.named_parameters() if p.grad is not None}


def reference_loss(variant: str, module: Any, batch: dict, noised: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pipeline, denoiser, weight = module._pipeline, module.denoiser, module.cfg.prior.loss_weight
    prompts = [module.prompts[i] for i in batch["prompt_index"].tolist()]
    t5_length = min(pipeline.tokenizer_3.model_max_length if variant == "sd3" else
                    getattr(getattr(pipeline, "tokenizer_2", None), "model_max_length", 0) or 0,
                    ref.SD3_T5_LENGTH if variant == "sd3" else ref.FLUX_T5_LENGTH)  # the tiny T5's 32 tokens cap both
    if variant in ("sd1-epsilon", "sd2-v"):
        conds = ref.sd_text(pipeline, prompts)
        loss = ref.ddpm_loss(denoiser, module.noise_scheduler, noised.latents, noised.noise, noised.timesteps, conds, weight)
    elif variant == "sdxl":
        conds = ref.sdxl_text(pipeline, prompts)
        time_ids = ref.sdxl_time_ids([tuple(s) for s in batch["original_size"].tolist()],
                                     [tuple(c) for c in batch["crop_top_left"].tolist()], module.cfg.data.resolution)
        loss = ref.ddpm_loss(denoiser, module.noise_scheduler, noised.latents, noised.noise, noised.timesteps, conds, weight,
                             time_ids.float())
    elif variant == "sd3":
        conds = ref.sd3_text(pipeline, prompts, t5_length)
        loss = ref.sd3_loss(denoiser, noised.latents, noised.noise, noised.timesteps, noised.sigmas, conds, weight)
    else:
        conds = ref.flux_text(pipeline, prompts, t5_length)
        loss = ref.flux_loss(denoiser, noised.latents, noised.noise, noised.timesteps, noised.sigmas, conds, weight,
                             int(pipeline.vae_scale_factor))
    return loss, conds


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_step_equals_the_reference_scripts_step(variant: str, tmp_path: Path) -> None:
    from .test_families import seen_noised

    module, batch = module_and_batch(variant, tmp_path)
    ours = module.compute_loss(batch)
    our_gradients = denoiser_gradients(module, ours)
    noised = seen_noised(module, batch)  # the very draws of that step, again
    theirs, their_conds = reference_loss(variant, module, batch, noised)
    their_gradients = denoiser_gradients(module, theirs)

    prompts = [module.prompts[i] for i in batch["prompt_index"].tolist()]
    with torch.no_grad():
        our_conds = module.family.encode_text(module._pipeline, prompts, torch.device("cpu"))
    for name, tensor in their_conds.items():
        assert torch.allclose(our_conds[name], tensor, atol=1e-6), f"text condition {name}"
    assert abs(float(ours) - float(theirs)) <= 1e-6, f"loss: ours {float(ours):.8f}, the reference's {float(theirs):.8f}"
    assert our_gradients.keys() == their_gradients.keys() and our_gradients
    for name, gradient in our_gradients.items():
        assert torch.allclose(gradient, their_gradients[name], rtol=1e-5, atol=1e-8), f"gradient of {name}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_latents_reach_model_space_as_in_the_reference(variant: str, tmp_path: Path) -> None:
    module, _ = module_and_batch(variant, tmp_path)
    raw = torch.randn(2, module.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(module.family.to_model_space(raw, module.vae), ref.model_space(raw, module.vae))


def test_the_flow_families_draw_timesteps_and_read_t5_as_their_references_by_default(tmp_path: Path) -> None:
    from dreambooth_trainer.families import FAMILIES
    from dreambooth_trainer.module import flow_settings

    for name, source in (("sd3", "tiny-sd3"), ("flux", "tiny-flux")):
        cfg = config_from_dict(tiny_config_dict(str(tmp_path), model={"source": source}))
        scheme = flow_settings(cfg, FAMILIES[name]).weighting_scheme
        assert {"uniform": "none"}.get(scheme, scheme) == ref.DEFAULT_WEIGHTING[name], name
        assert FAMILIES[name].training_text_length(cfg) == {"sd3": ref.SD3_T5_LENGTH, "flux": ref.FLUX_T5_LENGTH}[name]
