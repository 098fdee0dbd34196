"""The LightningModule: what trains, the step, the optimizer. Side effects live in callbacks."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from .checkpoint import RANK_LOCAL
from .config import TrainConfig
from .data import latent_distribution_params, step_generator
from .errors import UserInputError
from .families import FlowSettings, ModelFamily, StepMeta
from .families.base import TEXT_LORA_TARGETS, text_encoder_blocks
from .loss import prior_preservation_loss

# The references' learning rates: diffusers' LoRA DreamBooth scripts (SDXL, SD3, Flux) and train_dreambooth.py.
LORA_LEARNING_RATE = 1e-4
FULL_LEARNING_RATE = 5e-6



def sample_raw_latents(params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw from the VAE's diagonal Gaussian (mean, logvar stacked on channels), unscaled."""
    mean, logvar = params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    return mean + std * eps


def prompt_list(cfg: TrainConfig) -> list[str]:
    """The distinct prompts a batch's `prompt_kind` indexes: the instance prompt, then the class prompt."""
    return [cfg.data.instance_prompt, cfg.prior.class_prompt or ""]


def add_text_adapter(encoder: torch.nn.Module, config: object) -> None:
    """LoRA into a transformers text encoder through peft itself: transformers' own `add_adapter`
    asks for a newer peft than diffusers does. `peft_config` is what peft's state-dict helpers read."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, encoder, adapter_name="default")
    encoder.peft_config = {"default": config}


def add_lora_adapters(family: ModelFamily, lora: "object", denoiser: torch.nn.Module,
                      text_encoders: list[tuple[int, torch.nn.Module]]) -> None:
    """LoRA on the denoiser (`lora.target_modules`, or the family's usual ones) and on the given
    (index, text encoder)s, only on the layers the family reads; the bases freeze."""
    from peft import LoraConfig

    denoiser.requires_grad_(False)
    targets = list(lora.target_modules) or list(family.denoiser_lora_targets)
    denoiser.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                                    init_lora_weights="gaussian", target_modules=targets))
    for index, encoder in text_encoders:
        read = family.text_layers_read(index, encoder)
        unread = {"layers_to_transform": list(range(read)), "layers_pattern": "layers"} if read < encoder.config.num_hidden_layers else {}
        add_text_adapter(encoder, LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, init_lora_weights="gaussian",
                                             target_modules=TEXT_LORA_TARGETS, **unread))


def freeze_unread_layers(encoder: torch.nn.Module, read: int) -> None:
    """Layers after the hidden state the family reads, and the final norm after them, get no
    gradient: trainable, they would stop DDP (a parameter that never receives a gradient)."""
    prefix, layers = text_encoder_blocks(encoder)
    if read >= len(layers):
        return
    for layer in layers[read:]:
        layer.requires_grad_(False)
    encoder.get_submodule(prefix + "final_layer_norm").requires_grad_(False)


def flow_settings(cfg: TrainConfig, family: ModelFamily) -> FlowSettings:
    """The run's flow-matching settings; unset, the family's reference defaults (SD3 preconditions its outputs)."""
    training = cfg.training
    precondition = family.name == "sd3" if training.precondition_outputs is None else training.precondition_outputs
    return FlowSettings(training.weighting_scheme or family.default_weighting_scheme, training.logit_mean, training.logit_std,
                        training.mode_scale, precondition)


def refuse_other_families_options(cfg: TrainConfig, family: ModelFamily) -> None:
    """An option of other families (min-SNR and offset noise of the DDPM loss, SD3's preconditioning,
    Flux's distilled guidance, ...) is refused by name, never ignored (the admission rules' twin,
    for models whose family only their files tell)."""
    from dreambooth_api.v1alpha1.spec import FAMILY_OPTIONS, option_set

    for option in FAMILY_OPTIONS:
        if family.name not in option.families and option_set(option, cfg):
            raise UserInputError(f"{option.section}.{option.field} is {option.why}; not for {family.name}")


def learning_rate(cfg: TrainConfig) -> float:
    """training.learning_rate, or the references' default: 1e-4 for LoRA, 5e-6 for a full fine-tune."""
    training = cfg.training
    return training.learning_rate or (LORA_LEARNING_RATE if training.lora.enabled else FULL_LEARNING_RATE)


class DreamBoothModule(pl.LightningModule):
    """The family-agnostic step: the family says how to noise, condition, predict and compare."""

    def __init__(self, cfg: TrainConfig, family: ModelFamily, pipeline: object,
                 text_conds: dict[str, torch.Tensor] | None = None, prompts: list[str] | None = None):
        super().__init__()
        self.cfg, self.family = cfg, family
        parts = family.components(pipeline)
        self.denoiser, self.vae = parts.denoiser, parts.vae
        self.text_encoders = torch.nn.ModuleList(parts.text_encoders)
        self._pipeline = pipeline  # the frozen parts (tokenizers, schedulers) for text encoding
        self.noise_scheduler = family.training_scheduler(pipeline)
        self.vae_scale = int(getattr(pipeline, "vae_scale_factor", 8))
        self.flow = flow_settings(cfg, family)
        self.text_length = family.training_text_length(cfg)
        self.guidance = family.training_guidance(self.denoiser, cfg)
        self.prompts = prompts or prompt_list(cfg)
        self.strict_loading = False  # checkpoints hold only what trains
        self.vae.requires_grad_(False).eval()
        self.train_text = cfg.training.train_text_encoder
        self.text_encoders.requires_grad_(False)
        # Cached text conditions (frozen text encoders): the hot step runs the denoiser only.
        self.cond_names = sorted(text_conds or {})
        for name in self.cond_names:
            self.register_buffer(f"text_cond_{name}", text_conds[name], persistent=False)
        self._configure_trainable()
        self.ema = None
        if cfg.training.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.ema_parameters(), decay=cfg.training.ema_decay)
        # The optimizer step's loss: the sum of its micro-batch losses, kept on the device.
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under its SD name (a UNet or a transformer)."""
        return self.denoiser

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    def indexed_trained_text_encoders(self) -> list[tuple[int, torch.nn.Module]]:
        return [(i, self.text_encoders[i]) for i in self.family.trainable_text_encoders] if self.train_text else []

    def trained_text_encoders(self) -> list[torch.nn.Module]:
        return [encoder for _, encoder in self.indexed_trained_text_encoders()]

    def _configure_trainable(self) -> None:
        training, family = self.cfg.training, self.family
        if training.lora.enabled:
            add_lora_adapters(family, training.lora, self.denoiser, self.indexed_trained_text_encoders())
            # Adapters are made in their base layer's type (half under mixed precision); they train in fp32.
            for parameter in self.trainable_parameters():
                parameter.data = parameter.data.float()
        else:
            self.denoiser.requires_grad_(True)
            for index, encoder in self.indexed_trained_text_encoders():
                encoder.requires_grad_(True)
                freeze_unread_layers(encoder, family.text_layers_read(index, encoder))
        self.denoiser.train()
        self.text_encoders.train(False)
        for encoder in self.trained_text_encoders():
            encoder.train()
        if training.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            for encoder in self.trained_text_encoders():
                encoder.gradient_checkpointing_enable()
        unet = family.denoiser_name == "unet"
        if training.attention == "default" and unet:  # transformers keep their joint-attention processors
            from diffusers.models.attention_processor import AttnProcessor

            self.denoiser.set_attn_processor(AttnProcessor())
        if training.channels_last and unet:
            self.denoiser.to(memory_format=torch.channels_last)

    # -- what is trained and saved ------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        """What the EMA averages: the denoiser's trained parameters (only the adapters with LoRA)."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def state_dict(self, *args, **kwargs):  # noqa: D401 - torch signature
        """Only trained modules: the frozen VAE (and text encoder) come from the base model."""
        state = super().state_dict(*args, **kwargs)
        keep = ("denoiser.",) + tuple(f"text_encoders.{i}." for i in self.family.trainable_text_encoders if self.train_text)
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
    def text_conditions(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The denoiser's text inputs for each row's prompt: cached, or encoded now when training them."""
        if self.cond_names and not self.train_text:
            return {name: getattr(self, f"text_cond_{name}")[indices] for name in self.cond_names}
        # The pipeline holds these very encoder objects (adapters and all), so it encodes with them.
        return self.family.encode_text(self._pipeline, [self.prompts[i] for i in indices.tolist()], self.device, self.text_length)

    def latent_params(self, batch: dict) -> torch.Tensor:
        if "latent_params" in batch:
            return batch["latent_params"]
        with torch.no_grad():
            pixels = batch["pixels"].to(self.device, next(self.vae.parameters()).dtype)
            return latent_distribution_params(self.vae, pixels)

    def step_meta(self, batch: dict) -> StepMeta:
        return StepMeta(self.vae_scale, batch.get("original_size"), batch.get("crop_top_left"), self.guidance)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        family = self.family
        generator = step_generator(self.cfg.training.seed, int(batch["micro_step"]), self.global_rank, self.device)
        raw = sample_raw_latents(self.latent_params(batch).to(self.device), generator)
        latents = family.to_model_space(raw, self.vae)
        noised = family.noise(latents, self.noise_scheduler, generator, self.flow, self.cfg.training.noise_offset)
        conds = self.text_conditions(batch.get("prompt_index", batch["prompt_kind"]).to(self.device))
        if self.cfg.training.channels_last and family.denoiser_name == "unet":
            noised.noisy = noised.noisy.contiguous(memory_format=torch.channels_last)
        prediction = family.predict(self.denoiser, noised, conds, self.step_meta(batch))
        prediction, target = family.objective(noised, prediction, self.noise_scheduler, self.flow)
        weights = family.loss_weights(noised, self.noise_scheduler, self.cfg.training.min_snr_gamma)
        parts = prior_preservation_loss(prediction, target, int(batch["num_instance"]), self.cfg.prior.loss_weight, weights)
        return parts.total

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
        for name in ("alphas_cumprod",):  # DDPM; flow sigmas are indexed on the host
            table = getattr(self.noise_scheduler, name, None)
            if torch.is_tensor(table):
                setattr(self.noise_scheduler, name, table.to(self.device))
        if self.cfg.training.compile:
            training = self.cfg.training
            mode = None if training.compile_mode == "default" else training.compile_mode
            # In place: parameter names (and so checkpoints) stay the same.
            self.denoiser.compile(backend=training.compile_backend, mode=mode)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: object, optimizer_closure: object = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Inside the step, before any callback: a checkpoint of this step holds this step's EMA.
        if self.ema is not None:
            self.ema.step(self.ema_parameters())

    # -- optimizer -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        training = self.cfg.training
        denoiser_params = [p for p in self.denoiser.parameters() if p.requires_grad]
        groups = [{"params": denoiser_params, "lr": learning_rate(self.cfg)}]
        if self.train_text:
            text_params = [p for encoder in self.trained_text_encoders() for p in encoder.parameters() if p.requires_grad]
            groups.append({"params": text_params, "lr": training.text_encoder_learning_rate or learning_rate(self.cfg)})
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
