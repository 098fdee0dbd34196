"""A tiny random Stable Diffusion, built in code from a seed (no download).

Same architecture family as SD1.5 (CLIP text encoder, UNet2DCondition, AutoencoderKL), small
enough to train a few steps on a CPU in seconds. Used by tests, examples and the demo.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_HIDDEN = 32
MAX_TOKENS = 77


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every printable char and its end-of-word form."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    with tempfile.TemporaryDirectory() as folder:
        vocab_path, merges_path = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_path.write_text(json.dumps(vocab))
        merges_path.write_text("#version: 0.2\n")
        # model_max_length must be set explicitly: the default is a huge sentinel int.
        return CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=MAX_TOKENS)


def tiny_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionPipeline:
    """Random-weight tiny SD pipeline; the same seed gives bitwise-identical weights."""
    tokenizer = tiny_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=MAX_TOKENS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=sample_size,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def training_scheduler_for(pipeline: StableDiffusionPipeline) -> DDPMScheduler:
    """The noise scheduler used for training (DDPM with the pipeline's beta schedule)."""
    return DDPMScheduler.from_config(pipeline.scheduler.config)
