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
    `sample_weights` ([B], e.g. min-SNR) scale each example's mse before the means.
    """
    prediction, target = prediction.float(), target.float()
    mse = weighted_mse if sample_weights is not None else plain_mse
    instance = mse(prediction[:num_instance], target[:num_instance], sample_weights, 0, num_instance)
    if num_instance == prediction.shape[0]:
        return LossParts(instance, instance, None)
    prior = mse(prediction[num_instance:], target[num_instance:], sample_weights, num_instance, prediction.shape[0])
    return LossParts(instance + prior_loss_weight * prior, instance, prior)


def plain_mse(prediction: torch.Tensor, target: torch.Tensor, weights: None, start: int, stop: int) -> torch.Tensor:
    return F.mse_loss(prediction, target, reduction="mean")


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    per_sample = F.mse_loss(prediction, target, reduction="none").flatten(1).mean(dim=1)
    return (per_sample * weights[start:stop].float()).mean()


def diffusion_target(noise_scheduler: object, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")
