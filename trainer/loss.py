"""The DreamBooth objective as pure functions on tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float,
                            sample_weights: torch.Tensor | None = None) -> LossParts:
    """loss = mse(instance) + prior_loss_weight * mse(class).

    `prediction` and `target` hold the instance examples first, then the class examples.
    With no class examples (num_instance == batch) the loss is the plain instance mse.
    `sample_weights` (one per row, e.g. min-SNR) scale each example's mse before the split.
    """
    prediction, target = prediction.float(), target.float()

    def mse(rows: slice) -> torch.Tensor:
        if sample_weights is None:
            return F.mse_loss(prediction[rows], target[rows], reduction="mean")
        return weighted_mse(prediction[rows], target[rows], sample_weights[rows])

    instance = mse(slice(0, num_instance))
    if num_instance == prediction.shape[0]:
        return LossParts(instance, instance, None)
    prior = mse(slice(num_instance, None))
    return LossParts(instance + prior_loss_weight * prior, instance, prior)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean over rows of (each row's mse x its weight)."""
    per_sample = F.mse_loss(prediction, target, reduction="none").flatten(1).mean(dim=1)
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


def diffusion_target(noise_scheduler: object, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights per sample (Hang et al. 2023): min(SNR, γ)/SNR for an epsilon target,
    min(SNR, γ)/(SNR+1) for a v target (the v loss already carries a factor SNR+1)."""
    alphas = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = alphas / (1.0 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"training.min_snr_gamma does not apply to prediction_type {prediction_type!r}")


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Noise plus `offset` x a normal draw per sample and channel (Guttenberg's offset noise), so
    the model learns to shift an image's mean brightness. 0 returns `noise` itself, drawing nothing."""
    if offset == 0:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.dim() - 2)
    return noise + offset * torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)
