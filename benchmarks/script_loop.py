"""diffusers' examples/dreambooth/train_dreambooth.py as users run it, on a model folder: the loop our
trainer's figures are measured against, written again here in our own words.

Every step, as the script does it with its defaults (one process, `--with_prior_preservation`,
`--center_crop`, bf16 under `--mixed_precision bf16` on a GPU, fp32 on a CPU):
- the data: a map-style dataset that opens each instance and class photo from its folder, converts,
  resizes, crops, makes a [-1, 1] tensor and tokenizes both prompts; a shuffling DataLoader with
  `num_workers=0` and the script's collate (instance rows, then class rows);
- the VAE encodes the pixels and the frozen text encoder the prompt ids (both in the weight dtype);
  noise, t ~ U{0..999}, add_noise, the UNet under autocast, MSE on each half, prior weight 1;
- backward, `clip_grad_norm_` to 1.0, the optimizer step, the LR scheduler's step,
  `zero_grad(set_to_none=False)` (`--set_grads_to_none` is off by default), the logged loss read back
  with `.item()`, the progress bar's postfix and a TensorBoard scalar (`--report_to` defaults to it).

Variants: `cached` computes the latent distributions once (sampled every step) and the text
embeddings once (`--pre_compute_text_embeddings`): the same FLOPs as our cached step. `compile`
wraps the UNet in torch.compile. `job_case` runs N steps with a checkpoint every K, written the way
accelerate's `save_state` writes one, synchronously.

The AdamW implementation is passed in (`optimizer`): the benchmark gives the one our trainer's run
picked, so both sides step with the same kernel.
"""
from __future__ import annotations

import itertools
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.ImageOps import exif_transpose
from safetensors.torch import save_file

import measure

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 5e-6


class ScriptDataset(torch.utils.data.Dataset):
    """The script's DreamBoothDataset: each item reads an instance and a class photo from disk."""

    def __init__(self, instance_dir: Path, class_dir: Path, prompts: tuple[str, str], tokenizer: Any, size: int) -> None:
        self.instance = sorted(p for p in Path(instance_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.klass = sorted(p for p in Path(class_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.prompts, self.tokenizer, self.size = prompts, tokenizer, size

    def __len__(self) -> int:
        return max(len(self.instance), len(self.klass))

    def pixels(self, path: Path) -> torch.Tensor:
        image = exif_transpose(Image.open(path))
        if image.mode != "RGB":
            image = image.convert("RGB")
        scale = self.size / min(image.size)  # shorter side to `size`, bilinear, then the centre crop
        image = image.resize((max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))), Image.BILINEAR)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - 0.5) / 0.5

    def ids(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, truncation=True, padding="max_length", max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").input_ids

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"instance_images": self.pixels(self.instance[index % len(self.instance)]), "instance_prompt_ids": self.ids(self.prompts[0]),
                "class_images": self.pixels(self.klass[index % len(self.klass)]), "class_prompt_ids": self.ids(self.prompts[1])}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Instance rows first, then class rows, as one batch (one forward for both losses)."""
    pixels = [e["instance_images"] for e in examples] + [e["class_images"] for e in examples]
    ids = [e["instance_prompt_ids"] for e in examples] + [e["class_prompt_ids"] for e in examples]
    return {"pixel_values": torch.stack(pixels).to(memory_format=torch.contiguous_format).float(), "input_ids": torch.cat(ids)}


@dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any
    weight_dtype: torch.dtype
    resolution: int


def load(model_dir: Path, device: str) -> Models:
    """The folder's modules as the script prepares them: the UNet trainable in fp32, the VAE and text
    encoder frozen in the weight dtype (bf16 under mixed precision on a GPU)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    weight_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    unet = pipeline.unet.to(device).train()
    vae = pipeline.vae.to(device, weight_dtype).requires_grad_(False)
    text_encoder = pipeline.text_encoder.to(device, weight_dtype).requires_grad_(False)
    resolution = unet.config.sample_size * pipeline.vae_scale_factor
    return Models(unet, vae, text_encoder, pipeline.tokenizer, DDPMScheduler.from_config(pipeline.scheduler.config), weight_dtype, resolution)


class ScriptLoop:
    """The script's loop on `models`; `step()` runs one optimizer step with its bookkeeping."""

    def __init__(self, models: Models, instance_dir: Path, class_dir: Path, prompts: tuple[str, str], per_side: int, device: str,
                 optimizer: dict[str, Any], cached: bool = False, compile_backend: str | None = None, compile_mode: str | None = None) -> None:
        from diffusers.optimization import get_scheduler
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.m, self.device, self.per_side = models, device, per_side
        self.amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
        self.model = torch.compile(models.unet, backend=compile_backend, mode=compile_mode) if compile_backend else models.unet
        kwargs = {key: optimizer[key] for key in ("fused", "foreach") if optimizer.get(key) is not None}
        self.optimizer = torch.optim.AdamW(models.unet.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, **kwargs)
        self.lr_scheduler = get_scheduler("constant", self.optimizer, num_warmup_steps=500, num_training_steps=10**6)
        self.logdir = tempfile.mkdtemp(prefix="bench-script-tb-")
        self.writer = SummaryWriter(self.logdir)
        self.progress = tqdm(total=10**6, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the loop
        self.global_step = 0
        dataset = ScriptDataset(instance_dir, class_dir, prompts, models.tokenizer, models.resolution)
        if cached:
            with torch.no_grad():
                rows = [dataset[i] for i in range(len(dataset))]
                pixels = torch.stack([r["instance_images"] for r in rows] + [r["class_images"] for r in rows]).to(device, models.weight_dtype)
                dist = models.vae.encode(pixels).latent_dist
                self.latent_mean, self.latent_std = dist.mean.float(), dist.std.float()
                embeds = models.text_encoder(torch.cat([rows[0]["instance_prompt_ids"], rows[0]["class_prompt_ids"]]).to(device))[0]
            self.cached_rows = len(rows)
            self.embeds = embeds
            self.order = itertools.count()
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=per_side, shuffle=True, collate_fn=collate, num_workers=0)
            self.batches = (batch for _ in itertools.count() for batch in loader)
        self.cached = cached

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's scaled latents and text embeddings: encoded now, or from the caches."""
        m = self.m
        if self.cached:
            start = next(self.order) * self.per_side
            rows = [(start + i) % self.cached_rows for i in range(self.per_side)]
            index = torch.tensor(rows + [self.cached_rows + r for r in rows], device=self.device)
            mean, std = self.latent_mean[index], self.latent_std[index]
            latents = (mean + std * torch.randn_like(std)) * m.vae.config.scaling_factor
            return latents, self.embeds[torch.tensor([0] * self.per_side + [1] * self.per_side, device=self.device)]
        batch = next(self.batches)
        with torch.no_grad():
            latents = m.vae.encode(batch["pixel_values"].to(self.device, m.weight_dtype)).latent_dist.sample() * m.vae.config.scaling_factor
            embeds = m.text_encoder(batch["input_ids"].to(self.device))[0]
        return latents, embeds

    def step(self) -> float:
        m = self.m
        latents, embeds = self.inputs()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, m.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
        noisy = m.scheduler.add_noise(latents, noise, timesteps)
        with self.amp:
            prediction = self.model(noisy, timesteps, embeds).sample
        prediction, prediction_prior = torch.chunk(prediction, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        prior_loss = F.mse_loss(prediction_prior.float(), target_prior.float(), reduction="mean")
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean") + 1.0 * prior_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.unet.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.progress.update(1)
        self.global_step += 1
        logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0]}
        self.progress.set_postfix(**logs)
        for name, value in logs.items():
            self.writer.add_scalar(name, value, self.global_step)
        return logs["loss"]

    def close(self) -> None:
        self.writer.close()
        self.progress.close()


def train_case(model_dir: Path, instance_dir: Path, class_dir: Path, prompts: tuple[str, str], per_side: int, steps: int, warmup: int,
               device: str, optimizer: dict[str, Any], cached: bool = False, compile_backend: str | None = None,
               compile_mode: str | None = None, count_flops: bool = False) -> dict[str, Any]:
    """`steps` timed optimizer steps after `warmup`; then, when asked, one more under the FLOP counter."""
    torch.manual_seed(0)
    random.seed(0)
    loop = ScriptLoop(load(model_dir, device), instance_dir, class_dir, prompts, per_side, device, optimizer, cached,
                      compile_backend, compile_mode)
    try:
        for _ in range(warmup):
            loop.step()
        measure.synchronize()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loop.step()
        measure.synchronize()
        seconds = (time.perf_counter() - started) / steps
        cpu_seconds = time.process_time() - cpu_started
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        flops = measure.counted_flops(loop.step, type(loop.m.unet).__name__) if count_flops and not compile_backend else None
    finally:
        loop.close()
    kind = "cached latents + text" if cached else "as users run it"
    return {"case": f"train_dreambooth.py loop, {kind}, per_side={per_side}, compile={compile_backend or 'no'}",
            "s_per_step": round(seconds, 5), "images_per_s": round(2 * per_side / seconds, 3),
            **measure.per_cpu_second(2 * per_side * steps, cpu_seconds), "peak_gib": None if peak is None else round(peak, 2),
            "optimizer": measure.optimizer_implementation(loop.optimizer),
            **({"flops": flops} if flops else {})}


def save_like_accelerate(folder: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """What `accelerator.save_state` writes for one process, synchronously."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.bin")
    torch.save(scheduler.state_dict(), folder / "scheduler.bin")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, folder / "random_states_0.pkl")


def job_case(model_dir: Path, instance_dir: Path, class_dir: Path, prompts: tuple[str, str], per_side: int, steps: int, every: int,
             folder: Path, device: str, optimizer: dict[str, Any]) -> dict[str, Any]:
    """N steps of the loop as users run it with a checkpoint every `every`; steps 2..N timed (step 1
    warms up, as ours does), checkpoint stalls included."""
    torch.manual_seed(0)
    loop = ScriptLoop(load(model_dir, device), instance_dir, class_dir, prompts, per_side, device, optimizer)
    try:
        loop.step()
        measure.synchronize()
        started = time.perf_counter()
        stalls = []
        for index in range(2, steps + 1):
            loop.step()
            if index % every == 0:
                measure.synchronize()
                saving = time.perf_counter()
                save_like_accelerate(folder / f"checkpoint-{index}", loop.m.unet, loop.optimizer, loop.lr_scheduler)
                stalls.append(time.perf_counter() - saving)
        measure.synchronize()
        seconds = time.perf_counter() - started
    finally:
        loop.close()
    return {"case": f"train_dreambooth.py job per_side={per_side} steps={steps} checkpoint_every={every}", "seconds": round(seconds, 3),
            "checkpoint_stall_s": round(max(stalls), 3) if stalls else None}
