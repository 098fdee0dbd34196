"""A tiny Stable Diffusion, built in code from a seed (no download).

Same architecture family as SD1.5 (CLIP text encoder, UNet2DCondition, a VAE), small enough to
train a few steps on a CPU in seconds. Used by tests, examples and the demo. The text encoder and
UNet are random; the VAE is set by hand to average 4x4 pixel blocks into its latents and repeat
them back, so what the UNet learns shows in pixels: a few hundred steps on a CPU draw the subject.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Names the tiny model's design; change it whenever the same seed would give different weights, so
# caches keyed by the model (class images) never serve images of an older design.
TINY_DESIGN = "block-mean-vae-1"
TEXT_HIDDEN = 32
MAX_TOKENS = 77
VAE_BLOCKS = 3  # two 2x downsamplings: the latent is 1/4 of the image's side
LATENT_CHANNELS = 4  # red, green, blue, luminance
# The encoder's latents are pixel means in [0, 1] less 0.5; x2 puts the model's latents in [-1, 1].
VAE_SCALING_FACTOR = 2.0


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


@torch.no_grad()
def block_mean_autoencoder() -> AutoencoderTiny:
    """An AutoencoderTiny whose weights are set, not learned: the encoder averages 4x4 pixel blocks
    of R, G, B (and their mean) into the latent; the decoder repeats each latent pixel back.
    Every weight that would add a nonlinear detail is zero, so each block is the identity."""
    channels = (LATENT_CHANNELS,) * VAE_BLOCKS
    vae = AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                          num_encoder_blocks=(1,) * VAE_BLOCKS, num_decoder_blocks=(1,) * VAE_BLOCKS,
                          latent_channels=LATENT_CHANNELS, scaling_factor=VAE_SCALING_FACTOR)
    for parameter in vae.parameters():
        parameter.zero_()
    # The blocks' own convolutions stay zero, which makes each block the identity on the
    # non-negative values it sees (ReLU(0 + x)); the convolutions between blocks carry the image.
    encoder_convs = [m for m in vae.encoder.layers if isinstance(m, torch.nn.Conv2d)]
    decoder_convs = [m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d)]
    for conv in encoder_convs + decoder_convs:
        if conv.stride == (2, 2):  # downsampling: the mean of each 2x2 block, channel by channel
            for channel in range(conv.out_channels):
                conv.weight[channel, channel, 1:, 1:] = 0.25
        else:  # pass red, green, blue through the 3x3 kernel's centre
            for channel in range(min(conv.in_channels, conv.out_channels, 3)):
                conv.weight[channel, channel, 1, 1] = 1.0
    # The encoder's last convolution also writes luminance into the fourth latent channel and
    # centres the latents on 0; the decoder's first one adds the 0.5 back.
    encoder_convs[-1].weight[3, :3, 1, 1] = 1.0 / 3.0
    encoder_convs[-1].bias.fill_(-0.5)
    decoder_convs[0].bias[:3] = 0.5
    return vae


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
            sample_size=max(1, sample_size // 2 ** (VAE_BLOCKS - 1)),
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
        vae = block_mean_autoencoder()
    finally:
        torch.random.set_rng_state(generator_state)
    # The tiny model's latents are bounded ([-1, 1]): dynamic thresholding keeps each step's
    # estimate of the clean latent inside that range, so a briefly trained model samples images,
    # not blown-up noise.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        thresholding=True,
        sample_max_value=VAE_SCALING_FACTOR / 2,
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
