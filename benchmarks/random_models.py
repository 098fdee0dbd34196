"""Pipelines with random weights saved as diffusers folders, for the benchmark cases that run
`dreambooth train` on the baseline's very modules: the published architectures' shapes, nothing
downloaded. `sd15` (SD1.5's shapes, the baseline loop's `build()`), `sd15-tiny` (the same loop's
tiny shapes, for CPUs), full-size `sdxl` and `flux` (FLUX.1-dev), all three in bf16, and the
trainer's built-in `tiny-sdxl` and `tiny-flux` (gpu_session.sh's dry run).

    python benchmarks/random_models.py --family sd15 --out /tmp/models/sd15      # ~2.1 GB written
    python benchmarks/random_models.py --family sdxl --out /tmp/models/sdxl      # ~6.9 GB
    python benchmarks/random_models.py --family flux --out /tmp/models/flux      # ~34 GB

Weights are built on the GPU when there is one (fast), else on the CPU. The tokenizers are the
project's offline word-level ones (ids stay inside the full vocabularies); the T5 pads to 512 as
FLUX.1-dev's does. Timing and memory do not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# Shapes of stabilityai/stable-diffusion-xl-base-1.0 (model_index.json's components).
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
KL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")
# black-forest-labs/FLUX.1-dev: FluxTransformer2DModel's defaults are its shapes; dev embeds guidance.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
FLUX_T5_LENGTH = 512


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def built(make: Callable[[], T]) -> T:
    """A module made on the GPU (when there is one) in bf16: half the memory and time of fp32."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            return make()
    finally:
        torch.set_default_dtype(torch.float32)


def clip_config(shape: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**shape, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def sd15_pipeline(tiny: bool) -> Any:
    """The baseline loop's own modules (diffusers_loop_baseline.build) as a StableDiffusionPipeline."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from dreambooth_trainer.tiny import tiny_tokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    import diffusers_loop_baseline as baseline

    unet, vae, text_encoder, _ = baseline.build(tiny) if tiny else built(lambda: baseline.build(False))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def saved(family: str, out: Path) -> dict[str, Any]:
    """Build `family` and save it to `out` (kept when already there); what was done, as a record."""
    if (out / "model_index.json").exists():
        return {"family": family, "out": str(out), "reused": True}
    started = time.perf_counter()
    torch.manual_seed(0)
    pipeline = BUILDERS[family]()
    build_seconds = time.perf_counter() - started
    partial = out.with_name(out.name + ".partial")  # a folder with model_index.json is always complete
    pipeline.save_pretrained(str(partial), safe_serialization=True)
    partial.rename(out)
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    return {"family": family, "out": str(out), "denoiser_parameters_b": round(denoiser.num_parameters() / 1e9, 3),
            "disk_gib": round(size / 2**30, 2), "build_s": round(build_seconds, 1),
            "save_s": round(time.perf_counter() - started - build_seconds, 1)}


def sdxl_pipeline() -> Any:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_trainer.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return StableDiffusionXLPipeline(
        unet=built(lambda: UNet2DConditionModel(**SDXL_UNET)),
        vae=built(lambda: AutoencoderKL(**KL_VAE, latent_channels=4, scaling_factor=0.13025, force_upcast=True)),
        text_encoder=built(lambda: CLIPTextModel(clip_config(CLIP_L, tokenizer))),
        text_encoder_2=built(lambda: CLIPTextModelWithProjection(clip_config(CLIP_BIG_G, tokenizer))),
        tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                         timestep_spacing="leading"),
    )


def flux_pipeline() -> Any:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from dreambooth_trainer.tiny import tiny_t5_tokenizer, tiny_tokenizer

    tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
    t5_tokenizer.model_max_length = FLUX_T5_LENGTH
    return FluxPipeline(
        transformer=built(lambda: FluxTransformer2DModel(guidance_embeds=True)),
        vae=built(lambda: AutoencoderKL(**KL_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                        shift_factor=0.1159, scaling_factor=0.3611)),
        text_encoder=built(lambda: CLIPTextModel(clip_config(CLIP_L, tokenizer))),
        text_encoder_2=built(lambda: T5EncoderModel(T5Config(**T5_XXL, pad_token_id=t5_tokenizer.pad_token_id,
                                                             eos_token_id=t5_tokenizer.eos_token_id))),
        tokenizer=tokenizer, tokenizer_2=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
    )


def built_in_tiny(source: str) -> Callable[[], Any]:
    """The trainer's own tiny model (32 px) as a folder: what gpu_session.sh's dry run stands in with."""
    def build() -> Any:
        from dreambooth_trainer.models import load_pipeline

        return load_pipeline(source, seed=0, tiny_resolution=32)
    return build


BUILDERS: dict[str, Callable[[], Any]] = {
    "sd15": lambda: sd15_pipeline(False), "sd15-tiny": lambda: sd15_pipeline(True), "sdxl": sdxl_pipeline, "flux": flux_pipeline,
    "tiny-sdxl": built_in_tiny("tiny-sdxl"), "tiny-flux": built_in_tiny("tiny-flux"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(BUILDERS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    print(json.dumps(saved(args.family, args.out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
