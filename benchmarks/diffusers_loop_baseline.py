"""(Copied unchanged from the team's shared bench folder: the anchor our ratios are measured against.)

Baseline: the DreamBooth inner loop as diffusers' train_dreambooth.py runs it,
on SD1.5-architecture models with random weights (no downloads), timed on one GPU.

This is the anchor the project's trainer is compared against, and the source of
the FLOPs-per-step figure used for MFU. Run: python diffusers_loop_baseline.py [--tiny]
"""
import argparse
import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel


def build(tiny):
    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=77))
        return unet, vae, te, 16
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu"))
    return unet, vae, te, 512


def train_case(dev, tiny, per_side, train_te, steps, warmup, grad_ckpt=False, compile_unet=False):
    """One DreamBooth step = instance batch + class (prior) batch, bf16 autocast, AdamW."""
    torch.manual_seed(0)
    with torch.device(dev):
        unet, vae, te, res = build(tiny)
    unet.train()
    if compile_unet:
        unet = torch.compile(unet)
    vae.to(dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32).requires_grad_(False)
    te.to(dev)
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters())
    if train_te:
        te.train()
        params += list(te.parameters())
    else:
        te.requires_grad_(False)
        if dev == "cuda":
            te.to(dtype=torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=5e-6, fused=(dev == "cuda"))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    bsz = 2 * per_side
    pixels = torch.randn(bsz, 3, res, res, device=dev)
    ids = torch.randint(0, te.config.vocab_size, (bsz, 77), device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda"))

    def step():
        with amp:
            with torch.no_grad():
                latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * 0.18215
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (bsz,), device=dev)
            noisy = sched.add_noise(latents, noise, t)
            if train_te:
                enc = te(ids)[0]
            else:
                with torch.no_grad():
                    enc = te(ids)[0]
            pred = unet(noisy, t, enc).sample
            inst, prior = pred.float().chunk(2)
            n_inst, n_prior = noise.float().chunk(2)
            loss = F.mse_loss(inst, n_inst) + 1.0 * F.mse_loss(prior, n_prior)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if compile_unet:  # the flop counter cannot see inside compiled graphs
        return {"case": f"train per_side={per_side} train_te={train_te} compile=True",
                "s_per_step": round(dt, 4), "images_per_s": round(bsz / dt, 2)}
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {"case": f"train per_side={per_side} train_te={train_te} grad_ckpt={grad_ckpt} compile={compile_unet}",
            "s_per_step": round(dt, 4), "images_per_s": round(bsz / dt, 2),
            "tflop_per_step": round(flops / 1e12, 3), "achieved_tflops": round(flops / dt / 1e12, 1),
            "peak_gib": None if peak is None else round(peak, 2), "loss": float(loss)}


@torch.no_grad()
def infer_case(dev, tiny, batch, steps_n):
    """Text-to-image: 25-step DDIM, classifier-free guidance batched (uncond+cond), VAE decode."""
    torch.manual_seed(0)
    with torch.device(dev):
        unet, vae, te, res = build(tiny)
    dt_ = torch.bfloat16 if dev == "cuda" else torch.float32
    unet.to(dev, dtype=dt_).eval()
    vae.to(dev, dtype=dt_).eval()
    te.to(dev, dtype=dt_).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    ids = torch.randint(0, te.config.vocab_size, (2 * batch, 77), device=dev)

    def gen():
        enc = te(ids)[0]
        sched.set_timesteps(steps_n)
        lat = torch.randn(batch, 4, res // 8, res // 8, device=dev, dtype=dt_)
        for t in sched.timesteps:
            eps = unet(torch.cat([lat, lat]), t, enc).sample
            unc, cond = eps.chunk(2)
            lat = sched.step(unc + 7.5 * (cond - unc), t, lat).prev_sample
        return vae.decode(lat / 0.18215).sample

    gen()
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        gen()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    return {"case": f"infer batch={batch} steps={steps_n} cfg=batched",
            "s_per_batch": round(dt, 3), "images_per_s": round(batch / dt, 2)}


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    n, w = (2, 1) if a.tiny else (15, 4)
    cases = [
        lambda: train_case(dev, a.tiny, 1, False, n, w),
        lambda: train_case(dev, a.tiny, 4, False, n, w),
        lambda: train_case(dev, a.tiny, 1, True, n, w),
        lambda: train_case(dev, a.tiny, 4, True, n, w),
        lambda: train_case(dev, a.tiny, 8, False, n, w, grad_ckpt=True),
        lambda: infer_case(dev, a.tiny, 1, 25),
        lambda: infer_case(dev, a.tiny, 8, 25),
        lambda: train_case(dev, a.tiny, 4, False, n, w, compile_unet=True),
    ]
    for c in cases:
        try:
            print(json.dumps(c()), flush=True)
        except Exception as e:  # report and go on: one failed case must not hide the rest
            print(json.dumps({"error": repr(e)[:300]}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
