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


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float) -> LossParts:
    """loss = mse(instance) + prior_loss_weight * mse(class).

    `prediction` and `target` hold the instance examples first, then the class examples.
    With no class examples (num_instance == batch) the loss is the plain instance mse.
    """
    prediction, target = prediction.float(), target.float()
    instance = F.mse_loss(prediction[:num_instance], target[:num_instance], reduction="mean")
    if num_instance == prediction.shape[0]:
        return LossParts(instance, instance, None)
    prior = F.mse_loss(prediction[num_instance:], target[num_instance:], reduction="mean")
    return LossParts(instance + prior_loss_weight * prior, instance, prior)


def diffusion_target(noise_scheduler: object, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")
