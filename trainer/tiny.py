"""A tiny Stable Diffusion, built in code from a seed (no download).

Same architecture family as SD1.5 (CLIP text encoder, UNet2DCondition, a VAE), small enough to
train a few steps on a CPU in seconds. Used by tests, examples and the demo. The text encoder and
UNet are random; the VAE is set by hand to average 4x4 pixel blocks into its latents and repeat
them back, so what the UNet learns shows in pixels: a few hundred steps on a CPU draw the subject.
"""
from __future__ import annotations

import string
from collections.abc import Callable
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

T = TypeVar("T")

# Names the tiny model's design; change it whenever the same seed would give different weights, so
# caches keyed by the model (class images) never serve images of an older design.
TINY_DESIGN = "block-mean-vae-word-tokens-distinct-words-3"
TEXT_HIDDEN = 32
MAX_TOKENS = 77
VAE_BLOCKS = 3  # two 2x downsamplings: the latent is 1/4 of the image's side
LATENT_CHANNELS = 4  # red, green, blue, luminance
# The encoder's latents are pixel means in [0, 1] less 0.5; x2 puts the model's latents in [-1, 1].
VAE_SCALING_FACTOR = 2.0


# The words of the prompts the project's examples, tests and docs use: each is one token, so the
# instance prompt differs from the class prompt by one embedding (`sks`), not by three characters.
# Any other word still tokenizes, character by character.
TINY_WORDS = tuple(sorted(set("""
a an the of on in at to and or with by from for is it its this that photo picture image painting portrait
drawing sketch render style art sks zwx ohwx toy dog cat man woman person car house moon beach forest city
street snow mountain sea sky garden table room red green blue yellow black white small big cute blurry warm
up x on wearing hat sitting standing""".split())))
# CLIP draws token embeddings at std 0.02, which a random encoder's layers drown: for some seeds
# "sks" and "toy" came out of it 98 % alike at their own position, and the UNet could not tell the
# instance prompt from the class prompt. At std 0.5 each word keeps its identity through the
# encoder (14-45 % alike at its own position for seeds 0-5), as a pretrained encoder's distinct words do.
WORD_EMBEDDING_SCALE = 25.0
T5_MAX_TOKENS = 32  # the tiny T5's sequence length (SD3 and Flux pad their T5 prompts to it)


def word_merges(words: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE tokens and merges that turn each whole word into one token. Words are built from their
    end (c_k + suffix</w>): only a pair holding an end-of-word token can merge, so merges made for
    one word never split another, and a word outside the list falls back to characters."""
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    for word in words:
        suffix = word[-1] + "</w>"
        for char in reversed(word[:-1]):
            merge = (char, suffix)
            suffix = char + suffix
            if suffix not in tokens:
                tokens.append(suffix)
                merges.append(merge)
    return tokens, merges


def tiny_tokenizer() -> CLIPTokenizer:
    """A word-level CLIP tokenizer: every printable char, its end-of-word form, and each of
    TINY_WORDS as one token (built offline, no vocabulary download)."""
    chars = [c for c in string.printable if not c.isspace()]
    words, merges = word_merges(TINY_WORDS)
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + words
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    # model_max_length must be set explicitly: the default is a huge sentinel int.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A word-level T5 (Unigram) tokenizer: each of TINY_WORDS is one piece, other words fall back
    to characters (a lower score makes the whole word win)."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, 0.0) for word in TINY_WORDS] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_TOKENS)


def tiny_clip_config(tokenizer: CLIPTokenizer, hidden: int = TEXT_HIDDEN, projection: int = TEXT_HIDDEN) -> CLIPTextConfig:
    # The token ids come from the tokenizer: CLIP pools at the tokenizer's end-of-text id.
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=projection,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def tiny_clip_encoder(model_class: type[T], tokenizer: CLIPTokenizer, **config: int) -> T:
    """A random CLIP text encoder (`CLIPTextModel` or `...WithProjection`) whose words stay apart."""
    encoder = model_class(tiny_clip_config(tokenizer, **config))
    with torch.no_grad():
        encoder.get_input_embeddings().weight.mul_(WORD_EMBEDDING_SCALE)
    return encoder


def tiny_t5_encoder(tokenizer: T5Tokenizer, width: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1))


def tiny_kl_autoencoder(resolution: int, latent_channels: int, shift: float | None = None, scale: float = 1.0,
                        quant_conv: bool = True) -> AutoencoderKL:
    """A random KL VAE whose latents are 1/4 of the image's side (as the SD1 tiny model's)."""
    extra = {"shift_factor": shift} if shift is not None else {}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * VAE_BLOCKS,
                         up_block_types=("UpDecoderBlock2D",) * VAE_BLOCKS, block_out_channels=(8,) * VAE_BLOCKS,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2, sample_size=resolution,
                         scaling_factor=scale, use_quant_conv=quant_conv, use_post_quant_conv=quant_conv, **extra)


def seeded(seed: int, build: "Callable[[], T]") -> "T":
    """Build modules under a fixed seed without disturbing the caller's random state."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


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
        text_encoder = tiny_clip_encoder(CLIPTextModel, tokenizer)
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
