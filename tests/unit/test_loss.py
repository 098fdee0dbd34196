import pytest
import torch

from dreambooth_trainer.loss import diffusion_target, prior_preservation_loss


def test_prior_loss_is_instance_mse_plus_weighted_class_mse() -> None:
    prediction = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    parts = prior_preservation_loss(prediction, target, num_instance=1, prior_loss_weight=0.5)
    # instance: mean((1,1)^2) = 1; class rows: mean(0,4,4,4) = 3; total = 1 + 0.5 * 3
    assert parts.instance.item() == pytest.approx(1.0)
    assert parts.prior.item() == pytest.approx(3.0)
    assert parts.total.item() == pytest.approx(2.5)


def test_without_class_rows_the_loss_is_plain_mse() -> None:
    prediction, target = torch.ones(2, 3), torch.zeros(2, 3)
    parts = prior_preservation_loss(prediction, target, num_instance=2, prior_loss_weight=10.0)
    assert parts.prior is None
    assert parts.total.item() == pytest.approx(1.0)


def test_zero_weight_ignores_the_class_rows() -> None:
    prediction, target = torch.zeros(2, 4), torch.zeros(2, 4)
    prediction[1] = 5.0
    assert prior_preservation_loss(prediction, target, 1, 0.0).total.item() == 0.0


class _Scheduler:
    def __init__(self, kind: str) -> None:
        self.config = type("C", (), {"prediction_type": kind})()

    def get_velocity(self, latents, noise, timesteps):
        return latents - noise


def test_target_follows_the_prediction_type() -> None:
    latents, noise, t = torch.ones(1, 2), torch.full((1, 2), 3.0), torch.zeros(1)
    assert torch.equal(diffusion_target(_Scheduler("epsilon"), latents, noise, t), noise)
    assert torch.equal(diffusion_target(_Scheduler("v_prediction"), latents, noise, t), latents - noise)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(_Scheduler("sample"), latents, noise, t)
