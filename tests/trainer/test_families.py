"""Model families end to end on the four built-in tiny models (SD1, SDXL, SD3, Flux).

One module-scoped set of runs per family: a LoRA run (denoiser and CLIP text encoders, prior
preservation with class images drawn by that family's pipeline, cached latents), the same run stopped
after one step and resumed, and a full fine-tune of the denoiser on cached text conditions; the tests
then read their outputs (export, from_pretrained, load_lora_weights, generate, serve).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.errors import UserInputError
from dreambooth_trainer.train import run_training

from .conftest import losses, tiny_config_dict

SOURCES = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}
QUICK = {
    "prior": {"num_class_images": 1, "sample_steps": 1, "sample_batch_size": 1},
    "training": {"max_steps": 2, "cache_latents": True, "train_text_encoder": True, "lora": {"enabled": True, "rank": 2}},
    "checkpointing": {"every_n_steps": 100},
    "validation": {"fidelity": False, "steps": 1, "num_images": 1},
}


def family_config(out: Path, source: str, **extra: dict[str, Any]) -> Any:
    from .conftest import deep_merge

    return config_from_dict(tiny_config_dict(str(out), **deep_merge({"model": {"source": source}, **QUICK}, extra)))


@pytest.fixture(scope="module", params=list(SOURCES), ids=list(SOURCES))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    family, source = request.param, SOURCES[request.param]
    root = tmp_path_factory.mktemp(family)
    lora, resumed, full = root / "lora", root / "resumed", root / "full"
    assert run_training(family_config(lora, source)) == 0
    every_step = {"every_n_steps": 1, "keep_last": 1}
    assert run_training(family_config(resumed, source, training={"max_steps": 1}, checkpointing=every_step)) == 0
    assert run_training(family_config(resumed, source, checkpointing=every_step)) == 0
    full_run = {"max_steps": 1, "train_text_encoder": False, "lora": {"enabled": False}}
    assert run_training(family_config(full, source, training=full_run, prior={"enabled": False})) == 0
    return {"family": family, "source": source, "lora": lora, "resumed": resumed, "full": full}


def test_lora_and_full_train_and_resume_on_the_same_curve(runs: dict[str, Any]) -> None:
    reference = losses(runs["lora"])
    assert sorted(reference) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in reference.values())
    resumed = losses(runs["resumed"])
    assert sorted(resumed) == [1, 2]
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), f"step {step} after resuming from step 1"
    assert sorted(losses(runs["full"])) == [1]
    assert (runs["lora"] / "samples" / "final.png").exists(), "validation drew with the family's pipeline"


def test_the_export_loads_as_the_family_pipeline_with_the_trained_weights(runs: dict[str, Any]) -> None:
    from diffusers import DiffusionPipeline

    from dreambooth_trainer.families import FAMILIES
    from dreambooth_trainer.models import load_model

    family = FAMILIES[runs["family"]]
    base = family.components(load_model(runs["source"])[1]).denoiser.state_dict()
    for run in ("lora", "full"):
        pipeline = DiffusionPipeline.from_pretrained(str(runs[run] / "final"))
        assert type(pipeline).__name__ == PIPELINES[runs["family"]]
        trained = family.components(pipeline).denoiser.state_dict()
        assert trained.keys() == base.keys(), "adapters are fused into plain weights"
        assert any(not torch.equal(trained[key], base[key]) for key in base), f"{run}: the denoiser trained"


def test_the_lora_loads_with_load_lora_weights_and_generates_and_serves(runs: dict[str, Any]) -> None:
    from dreambooth_trainer.generate import ImageRequest, generate_images
    from dreambooth_trainer.models import load_pipeline
    from serving.family import served_family
    from serving.runtime import prepare_pipeline
    from serving.settings import ServerSettings

    lora_folder = runs["lora"] / "final" / "lora"
    base = load_pipeline(runs["source"])
    request = [ImageRequest("a photo of sks toy", seed=3)]
    before = generate_images(base, request, steps=2, height=32, width=32)[0]
    base.load_lora_weights(str(lora_folder))
    after = generate_images(base, request, steps=2, height=32, width=32)[0]
    assert before.size == after.size == (32, 32)
    assert before.tobytes() != after.tobytes(), "the adapters change the image"
    served = prepare_pipeline(ServerSettings(model=runs["source"], lora=str(lora_folder), device="cpu"))
    assert served_family(served).native_side == 32
    image = generate_images(served, request, steps=2, height=32, width=32)[0]
    # the server fuses a fixed LoRA into the weights (it outlives later adapters): float rounding only
    drift = numpy.abs(numpy.asarray(image, dtype=numpy.int16) - numpy.asarray(after, dtype=numpy.int16)).max()
    assert drift <= 1, f"the server draws what the trainer's generation draws (max pixel difference {drift})"


def test_dreambooth_generate_draws_from_the_export_and_its_lora(runs: dict[str, Any]) -> None:
    """The `dreambooth generate` command (in process: the command's own function, not a new interpreter)."""
    from PIL import Image
    from typer.testing import CliRunner

    from dreambooth_cli.main import app

    out = runs["lora"].parent / "generated.png"
    final = runs["full"] / "final"
    result = CliRunner().invoke(app, ["generate", "--model", str(final), "--prompt", "a photo of sks toy", "--steps", "1",
                                      "--lora", str(runs["lora"] / "final" / "lora"), "--out", str(out)])
    assert result.exit_code == 0, result.output[-2000:]
    assert Image.open(out).size == (32, 32)


def test_kohya_layout_where_the_family_has_one(runs: dict[str, Any]) -> None:
    prefixes = {key.split(".")[0] for key in load_file(str(runs["lora"] / "final" / "lora" / "pytorch_lora_weights.safetensors"))}
    trained_text = {"sd": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}, "sd3": {"text_encoder", "text_encoder_2"},
                    "flux": {"text_encoder"}}[runs["family"]]
    assert prefixes == {"unet" if runs["family"] in ("sd", "sdxl") else "transformer"} | trained_text
    files = {path.name for path in (runs["lora"] / "final" / "lora").iterdir()}
    if runs["family"] == "sd3":
        assert files == {"pytorch_lora_weights.safetensors"}, "SD3 has no kohya layout (ComfyUI reads diffusers keys)"
        return
    kohya = load_file(str(runs["lora"] / "final" / "lora" / "lora_kohya.safetensors"))
    names = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in kohya}
    for name in names:
        down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"]
        assert up.shape[1] == down.shape[0] and alpha.numel() == 1, name
    # sd-scripts' prefixes: one text encoder is lora_te, two are lora_te1/lora_te2; Flux's CLIP-L is lora_te1.
    kohya_prefixes = {"sd": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet", "lora_te1", "lora_te2"}, "flux": {"lora_unet", "lora_te1"}}
    assert {name.split("_", 2)[0] + "_" + name.split("_", 2)[1] for name in names} == kohya_prefixes[runs["family"]]
    if runs["family"] == "sdxl":  # the original UNet's block names, as sd-scripts trains SDXL
        assert all(name.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for name in names if name.startswith("lora_unet"))
    if runs["family"] == "flux":  # diffusers' reverse converter assumes Flux-dev's 19/38 blocks: BFL names and shapes
        assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_single_blocks_0_linear1"} <= names
        assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * 2, "alpha scales with the fused parts"


def test_flux_bfl_fusion_keeps_each_part_update() -> None:
    """The fused qkv adapter's update equals the q, k and v updates stacked (scale alpha/rank kept)."""
    from dreambooth_trainer.families.flux_kohya import fused_adapter

    generator = torch.Generator().manual_seed(0)
    downs = [torch.randn(2, 8, generator=generator) for _ in range(3)]
    ups = [torch.randn(5, 2, generator=generator) for _ in range(3)]
    down, up = fused_adapter(downs, ups)
    assert down.shape == (6, 8) and up.shape == (15, 6)
    alpha, rank = 2.0, 2
    fused = up @ down * (3 * alpha / down.shape[0])
    separate = torch.cat([u @ d * (alpha / rank) for d, u in zip(downs, ups)])
    assert torch.allclose(fused, separate, atol=1e-6)


def test_the_family_is_read_from_the_model_and_a_mismatch_names_model_family(tmp_path: Path) -> None:
    from dreambooth_trainer.models import family_for, load_model

    assert {source: family_for(source).name for source in SOURCES.values()} == {v: k for k, v in SOURCES.items()}
    folder = tmp_path / "sdxl"  # only model_index.json is read before an explicit family is checked
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    assert family_for(str(folder)).name == "sdxl"
    with pytest.raises(UserInputError, match=r"model\.family is 'flux' but model .* is a 'sdxl' model"):
        load_model(str(folder), family="flux")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserInputError, match="KandinskyPipeline"):
        family_for(str(folder))
    with pytest.raises(ValueError, match="model.family"):
        family_config(tmp_path / "out", "tiny", model={"family": "sd4"})


def test_v_prediction_trains_on_the_velocity_and_the_export_keeps_it(tmp_path: Path) -> None:
    """An SD2-style v-prediction model: the step's loss is against v, not the noise."""
    from diffusers import DDIMScheduler

    from dreambooth_trainer.data import DreamBoothBatches, ImageSet
    from dreambooth_trainer.export import export_pipeline
    from dreambooth_trainer.families import FAMILIES
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.storage import LocalStorage
    from dreambooth_trainer.tiny import tiny_pipeline
    from PIL import Image

    pipeline = tiny_pipeline(seed=0)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    cfg = family_config(tmp_path / "out", "tiny", prior={"enabled": False}, training={"lora": {"enabled": False}})
    module = DreamBoothModule(cfg, FAMILIES["sd"], pipeline)
    subject = ImageSet([Image.new("RGB", (32, 32), (200, 40, 40))], cfg.data.instance_prompt)
    batch = DreamBoothBatches(subject, None, 32, True, False, 1, 0, 0, 1, 0, 1).batch_at(0)
    with torch.no_grad():
        loss = float(module.compute_loss(batch))
        noised = seen_noised(module, batch)  # the same draws again: the step is a function of the micro-step
        prediction = module.family.predict(module.denoiser, noised, module.text_conditions(batch["prompt_kind"]), module.step_meta(batch))
    velocity = module.noise_scheduler.get_velocity(noised.latents, noised.noise, noised.timesteps)
    mse = torch.nn.functional.mse_loss
    assert loss == pytest.approx(float(mse(prediction, velocity)), rel=1e-5)
    assert loss != pytest.approx(float(mse(prediction, noised.noise)), rel=1e-3), "not the epsilon target"
    export_pipeline(lambda: pipeline, module.denoiser, list(module.text_encoders), LocalStorage(tmp_path / "export"), lora=False)
    config = json.loads((tmp_path / "export" / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert json.loads((tmp_path / "export" / "final" / "dreambooth.json").read_text()) == {"family": "sd", "prediction_type": "v_prediction"}


def seen_noised(module: Any, batch: dict) -> Any:
    """The step's noised latents again, from the same micro-step generator."""
    from dreambooth_trainer.data import step_generator
    from dreambooth_trainer.module import sample_raw_latents

    generator = step_generator(module.cfg.training.seed, int(batch["micro_step"]), 0, module.device)
    latents = module.family.to_model_space(sample_raw_latents(module.latent_params(batch), generator), module.vae)
    return module.family.noise(latents, module.noise_scheduler, generator, module.flow)


def test_sdxl_size_conditioning_uses_the_batch_sizes_when_given() -> None:
    from dreambooth_trainer.families import StepMeta
    from dreambooth_trainer.families.sdxl import add_time_ids

    plain = add_time_ids(StepMeta(8), 2, (4, 6), 8, torch.device("cpu"))
    assert plain.tolist() == [[32, 48, 0, 0, 32, 48]] * 2
    given = StepMeta(8, torch.tensor([[100, 80], [64, 64]]), torch.tensor([[3, 4], [0, 0]]))
    assert add_time_ids(given, 2, (4, 6), 8, torch.device("cpu")).tolist() == [[100, 80, 3, 4, 32, 48], [64, 64, 0, 0, 32, 48]]


def test_the_tiny_tokenizers_keep_whole_words() -> None:
    from dreambooth_trainer.tiny import tiny_t5_tokenizer, tiny_tokenizer

    clip, t5 = tiny_tokenizer(), tiny_t5_tokenizer()
    assert clip.tokenize("a photo of sks toy") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "toy</w>"]
    assert clip.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"], "other words fall back to characters"
    assert t5.tokenize("a photo of sks toy") == ["\u2581a", "\u2581photo", "\u2581of", "\u2581sks", "\u2581toy"]
    instance, klass = clip("a photo of sks toy").input_ids, clip("a photo of toy").input_ids
    assert len(instance) == len(klass) + 1, "the instance prompt differs from the class prompt by one token"
