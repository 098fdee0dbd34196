"""The LightningModule: what trains, the step, the optimizer. Side effects live in callbacks."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from .checkpoint import RANK_LOCAL
from .config import TrainConfig
from .data import latent_distribution_params, step_generator
from .errors import UserInputError
from .loss import diffusion_target, min_snr_weights, offset_noise, prior_preservation_loss

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def sample_latents(params: torch.Tensor, scaling_factor: float, generator: torch.Generator) -> torch.Tensor:
    """Draw from the VAE's diagonal Gaussian (mean, logvar stacked on channels), then scale."""
    mean, logvar = params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std * eps) * scaling_factor


class DreamBoothModule(pl.LightningModule):
    def __init__(self, cfg: TrainConfig, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer: object, noise_scheduler: object, prompt_embeddings: torch.Tensor | None = None,
                 prompts: list[str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.noise_scheduler = tokenizer, noise_scheduler
        self.strict_loading = False  # checkpoints hold only what trains
        self.vae.requires_grad_(False).eval()
        self.train_text = cfg.training.train_text_encoder
        self.text_encoder.requires_grad_(False)
        # Every distinct prompt once (the dataset's table: instance, class, then captions); rows index it.
        prompts = prompts or [cfg.data.instance_prompt, cfg.prior.class_prompt or ""]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        self.register_buffer("prompt_ids", ids, persistent=False)
        # Cached text embeddings (frozen text encoder): the hot step skips the encoder.
        self.register_buffer("prompt_embeddings", prompt_embeddings, persistent=False)
        self._configure_trainable()
        self.ema = None
        if cfg.training.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.ema_parameters(), decay=cfg.training.ema_decay)
        # The optimizer step's loss: the sum of its micro-batch losses, kept on the device.
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    def _configure_trainable(self) -> None:
        training = self.cfg.training
        if training.lora.enabled:
            from peft import LoraConfig

            lora = training.lora
            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                                             init_lora_weights="gaussian", target_modules=list(lora.target_modules)))
            if self.train_text:
                self.text_encoder.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank,
                                                         init_lora_weights="gaussian", target_modules=TEXT_LORA_TARGETS))
        else:
            self.unet.requires_grad_(True)
            if self.train_text:
                self.text_encoder.requires_grad_(True)
        self.unet.train()
        self.text_encoder.train(self.train_text)
        if training.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text:
                self.text_encoder.gradient_checkpointing_enable()
        if training.attention == "default":
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())
        if training.channels_last:
            self.unet.to(memory_format=torch.channels_last)

    # -- what is trained and saved ------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        """What the EMA averages: the UNet's trained parameters (only the adapters with LoRA)."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def state_dict(self, *args, **kwargs):  # noqa: D401 - torch signature
        """Only trained modules: the frozen VAE (and text encoder) come from the base model."""
        state = super().state_dict(*args, **kwargs)
        keep = ("unet.",) + (("text_encoder.",) if self.train_text else ())
        lora_only = self.cfg.training.lora.enabled
        return {key: value for key, value in state.items() if key.startswith(keep) and (not lora_only or "lora_" in key)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint[RANK_LOCAL] = {"rng": {"torch": torch.get_rng_state(),
                                          "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.to(self.device)
        rng = checkpoint.get(RANK_LOCAL, {}).get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # -- the step -------------------------------------------------------------------------------
    def encode_prompts(self, indices: torch.Tensor) -> torch.Tensor:
        if self.prompt_embeddings is not None and not self.train_text:
            return self.prompt_embeddings[indices]
        return self.text_encoder(self.prompt_ids[indices])[0]

    def latent_params(self, batch: dict) -> torch.Tensor:
        if "latent_params" in batch:
            return batch["latent_params"]
        with torch.no_grad():
            pixels = batch["pixels"].to(self.device, next(self.vae.parameters()).dtype)
            return latent_distribution_params(self.vae, pixels)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        generator = step_generator(self.cfg.training.seed, int(batch["micro_step"]), self.global_rank, self.device)
        latents = sample_latents(self.latent_params(batch).to(self.device), self.vae.config.scaling_factor, generator)
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=self.device)
        noise = offset_noise(noise, self.cfg.training.noise_offset, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = self.encode_prompts(batch.get("prompt_index", batch["prompt_kind"]).to(self.device))
        if self.cfg.training.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        weights = self.snr_weights(timesteps)
        parts = prior_preservation_loss(prediction, target, int(batch["num_instance"]), self.cfg.prior.loss_weight, weights)
        return parts.total

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        gamma = self.cfg.training.min_snr_gamma
        if gamma is None:
            return None
        return min_snr_weights(timesteps, self.noise_scheduler.alphas_cumprod, gamma, self.noise_scheduler.config.prediction_type)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Nothing is logged here: Lightning's logging reads values back from the device every step.
        loss = self.compute_loss(batch)
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_count += 1
        return loss

    def take_step_loss(self) -> torch.Tensor | None:
        """The finished optimizer step's loss (mean over its micro-batches, on the device); resets."""
        if self._loss_sum is None:
            return None
        mean = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        return mean

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        # The schedule's tables live on the device once, so add_noise never copies them per step.
        for name in ("alphas_cumprod",):
            table = getattr(self.noise_scheduler, name, None)
            if torch.is_tensor(table):
                setattr(self.noise_scheduler, name, table.to(self.device))
        if self.cfg.training.compile:
            training = self.cfg.training
            mode = None if training.compile_mode == "default" else training.compile_mode
            # In place: parameter names (and so checkpoints) stay the same.
            self.unet.compile(backend=training.compile_backend, mode=mode)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: object, optimizer_closure: object = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Inside the step, before any callback: a checkpoint of this step holds this step's EMA.
        if self.ema is not None:
            self.ema.step(self.ema_parameters())

    # -- optimizer -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        training = self.cfg.training
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        groups = [{"params": unet_params, "lr": training.learning_rate}]
        if self.train_text:
            text_params = [p for p in self.text_encoder.parameters() if p.requires_grad]
            groups.append({"params": text_params, "lr": training.text_encoder_learning_rate or training.learning_rate})
        kwargs = dict(betas=(training.adam_beta1, training.adam_beta2), weight_decay=training.adam_weight_decay, eps=training.adam_epsilon)
        if training.optimizer == "adamw_8bit":
            optimizer = eight_bit_adamw(groups, kwargs)
        else:
            # One fused kernel over all parameters (CUDA and CPU), except under mixed precision with
            # gradient clipping: fused AdamW unscales inside its kernel, so Lightning cannot clip first.
            mixed = str(self.trainer.precision).endswith("-mixed")
            fused = self.device.type in ("cpu", "cuda") and not (mixed and training.max_grad_norm is not None)
            optimizer = torch.optim.AdamW(groups, fused=fused, **kwargs)
        from diffusers.optimization import get_scheduler

        scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.lr_warmup_steps,
                                  num_training_steps=training.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def eight_bit_adamw(groups: list[dict], kwargs: dict) -> torch.optim.Optimizer:
    if not torch.cuda.is_available():
        raise UserInputError("training.optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes); use adamw on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserInputError("training.optimizer=adamw_8bit needs bitsandbytes: pip install 'dreambooth-k8s[gpu]'") from None
    return bnb.optim.AdamW8bit(groups, **kwargs)
