"""The baseline loop (diffusers_loop_baseline.py) in the variants our figures are measured against.

- `cached_train_case`: the same step with latents and text embeddings computed once (diffusers'
  scripts cache the VAE's latent distribution and sample it every step): the same FLOPs as ours.
  With `compile_unet`, the UNet is `torch.compile`d too: the tuned baseline.
- `job_case`: the loop as users run it for N steps, saving the way accelerate's `save_state` does
  every `every` steps (model weights as safetensors, optimizer and scheduler with torch.save,
  RNG states), synchronously, so checkpoint stalls count.

Models and shapes come from the baseline's own `build()`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import diffusers_loop_baseline as baseline


def _setup(dev: str, tiny: bool, per_side: int) -> tuple:
    torch.manual_seed(0)
    with torch.device(dev):
        unet, vae, te, res = baseline.build(tiny)
    half = torch.bfloat16 if dev == "cuda" else torch.float32
    unet.train()
    vae.to(dev, dtype=half).requires_grad_(False)
    te.to(dev, dtype=half).requires_grad_(False)
    sched = baseline.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    bsz = 2 * per_side
    pixels = torch.randn(bsz, 3, res, res, device=dev)
    ids = torch.randint(0, te.config.vocab_size, (bsz, 77), device=dev)
    return unet, vae, te, sched, pixels, ids, bsz


def _timed(step, steps: int, warmup: int, dev: str) -> float:
    for _ in range(warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def cached_train_case(dev: str, tiny: bool, per_side: int, steps: int, warmup: int, compile_unet: bool = False) -> dict:
    unet, vae, te, sched, pixels, ids, bsz = _setup(dev, tiny, per_side)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    with torch.no_grad(), amp:
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        enc = te(ids)[0]
    model = torch.compile(unet) if compile_unet else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, fused=dev == "cuda")

    def step() -> torch.Tensor:
        latents = (mean + std * torch.randn_like(std)) * 0.18215
        return prior_preservation_step(model, sched, opt, amp, latents, enc)

    seconds = _timed(step, steps, warmup, dev)
    return {"case": f"baseline cached per_side={per_side} compile={compile_unet}", "s_per_step": round(seconds, 4),
            "images_per_s": round(bsz / seconds, 2)}


def prior_preservation_step(model: torch.nn.Module, sched, opt: torch.optim.Optimizer, amp, latents: torch.Tensor,
                            enc: torch.Tensor) -> torch.Tensor:
    """One optimizer step of the loop's loss: instance half + class (prior) half, each an MSE to its noise."""
    with amp:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        pred = model(sched.add_noise(latents, noise, t), t, enc).sample
        inst, prior = pred.float().chunk(2)
        n_inst, n_prior = noise.float().chunk(2)
        loss = F.mse_loss(inst, n_inst) + F.mse_loss(prior, n_prior)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def save_like_accelerate(folder: Path, unet: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """What `accelerator.save_state` writes for one process, synchronously."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(opt.state_dict(), folder / "optimizer.bin")
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               folder / "random_states_0.pkl")


def job_case(dev: str, tiny: bool, per_side: int, steps: int, every: int, folder: Path) -> dict:
    """N steps of the users' loop with a checkpoint every `every` steps; wall time of the whole job."""
    unet, vae, te, sched, pixels, ids, bsz = _setup(dev, tiny, per_side)
    te.to(torch.float32 if dev == "cpu" else torch.bfloat16)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, fused=dev == "cuda")

    def step() -> None:
        with amp, torch.no_grad():
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * 0.18215
            enc = te(ids)[0]
        prior_preservation_step(unet, sched, opt, amp, latents, enc)

    step()  # step 1 warms up (kernels, allocator) untimed, as ours does
    if dev == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    stalls = []
    for index in range(2, steps + 1):
        step()
        if index % every == 0:
            if dev == "cuda":
                torch.cuda.synchronize()
            saving = time.perf_counter()
            save_like_accelerate(folder / f"checkpoint-{index}", unet, opt)
            stalls.append(time.perf_counter() - saving)
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"case": f"baseline job per_side={per_side} steps={steps} checkpoint_every={every}", "seconds": round(seconds, 3),
            "checkpoint_stall_s": round(max(stalls), 3) if stalls else None}
