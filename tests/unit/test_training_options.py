"""Training options as pure functions: min-SNR weights, offset noise, buckets, caption prompts."""
from __future__ import annotations

import math

import pytest
import torch

from dreambooth_trainer.buckets import bucket_batch_indices, make_buckets, nearest_bucket
from dreambooth_trainer.captions import caption_key, caption_prompt, prompt_table
from dreambooth_trainer.config import ConfigError, config_from_dict
from dreambooth_trainer.data import drop_captions, prompt_slot
from dreambooth_trainer.errors import UserInputError
from dreambooth_trainer.loss import min_snr_weights, offset_noise, prior_preservation_loss

ALPHAS = torch.tensor([0.99, 0.9, 0.5, 0.1, 0.01])


# -- min-SNR-γ -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(kind: str) -> None:
    timesteps = torch.tensor([0, 1, 2, 3, 4])
    gamma = 5.0
    got = min_snr_weights(timesteps, ALPHAS, gamma, kind)
    for t, weight in zip(timesteps.tolist(), got.tolist()):
        snr = ALPHAS[t].item() / (1 - ALPHAS[t].item())
        want = min(snr, gamma) / (snr if kind == "epsilon" else snr + 1)
        assert weight == pytest.approx(want, rel=1e-5), (kind, t)
    # SNR 99 and 9 are clipped (weight < 1 for epsilon); SNR 1 and below are not (weight 1).
    if kind == "epsilon":
        assert got[0] < got[1] < 1 and got[2:].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_min_snr_refuses_a_target_it_has_no_formula_for() -> None:
    with pytest.raises(ValueError, match="min_snr_gamma.*'sample'"):
        min_snr_weights(torch.tensor([0]), ALPHAS, 5.0, "sample")


FAMILY_OPTION_VALUES = {"training.min_snr_gamma": 5.0, "training.noise_offset": 0.1, "prior.sampler": "euler",
                        "training.weighting_scheme": "mode", "training.max_sequence_length": 128,
                        "training.precondition_outputs": False, "training.distilled_guidance": 1.0}


@pytest.mark.parametrize("path", list(FAMILY_OPTION_VALUES))
def test_an_option_of_other_families_is_refused_by_name(path: str) -> None:
    """Never ignored: set for a family it does not apply to, the run stops naming the field."""
    from dreambooth_api.v1alpha1.spec import FAMILY_OPTIONS
    from dreambooth_trainer.families import FAMILIES
    from dreambooth_trainer.module import refuse_other_families_options

    section, field = path.split(".")
    option = next(o for o in FAMILY_OPTIONS if (o.section, o.field) == (section, field))
    cfg = config_from_dict({**BASE, section: {**BASE.get(section, {}), field: FAMILY_OPTION_VALUES[path]}})
    for name in FAMILIES:
        if name in option.families:
            refuse_other_families_options(cfg, FAMILIES[name])
        else:
            with pytest.raises(UserInputError, match=f"{path} is .*; not for {name}"):
                refuse_other_families_options(cfg, FAMILIES[name])
    assert {o.section + "." + o.field for o in FAMILY_OPTIONS} == set(FAMILY_OPTION_VALUES), "every family option is tried"


def test_admissions_family_tables_agree_with_the_trainers_families() -> None:
    """The operator's admission (api/v1alpha1/spec.py, no torch) keeps its own copy of what each family
    needs; it must say what the families themselves say."""
    from dreambooth_api.v1alpha1 import spec
    from dreambooth_trainer.families import FAMILIES

    assert spec.TINY_FAMILIES == {family.tiny_source: name for name, family in FAMILIES.items()}
    assert set(spec.FLOW_MATCHING) == {name for name, family in FAMILIES.items() if family.flow_matching}
    assert {name: spec.PIXEL_MULTIPLE.get(name, 8) for name in FAMILIES} == {name: f.pixel_multiple for name, f in FAMILIES.items()}


def test_sample_weights_scale_each_row_before_the_prior_split() -> None:
    prediction = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 2.0], [0.0, 0.0]])
    target = torch.zeros(4, 2)
    weights = torch.tensor([0.5, 0.25, 2.0, 1.0])
    parts = prior_preservation_loss(prediction, target, 2, 0.5, weights)
    # instance rows: mse 1 x 0.5 and mse 4 x 0.25 -> mean 0.75; class rows: mse 2 x 2 and 0 -> mean 2
    assert parts.instance.item() == pytest.approx(0.75)
    assert parts.prior.item() == pytest.approx(2.0)
    assert parts.total.item() == pytest.approx(0.75 + 0.5 * 2.0)
    unweighted = prior_preservation_loss(prediction, target, 2, 0.5)
    assert torch.equal(prior_preservation_loss(prediction, target, 2, 0.5, torch.ones(4)).total, unweighted.total)


# -- offset noise --------------------------------------------------------------------------------

def test_zero_offset_returns_the_noise_itself_and_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8)
    assert offset_noise(noise, 0.0, generator) is noise
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=torch.Generator().manual_seed(3)))


def test_offset_is_one_draw_per_sample_and_channel_from_the_generator() -> None:
    noise = torch.zeros(3, 4, 8, 8)
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    per_channel = shifted[:, :, :1, :1]
    assert torch.equal(shifted, per_channel.expand_as(shifted)), "constant over the pixels of a channel"
    assert torch.equal(per_channel.flatten(), 0.1 * torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).flatten())
    assert len(set(per_channel.flatten().tolist())) == 12


# -- buckets -------------------------------------------------------------------------------------

def test_buckets_keep_the_area_and_the_step() -> None:
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert 256 <= min(height, width) and max(height, width) <= 1024
        assert height * width <= 512 * 512
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios)
    assert all(side % 16 == 0 for bucket in make_buckets(1024, 16, pixel_multiple=16) for side in bucket)
    with pytest.raises(UserInputError, match="data.bucket_step 8 must be a multiple of 16"):
        make_buckets(512, 8, pixel_multiple=16)


def test_a_photo_goes_to_the_bucket_of_its_aspect_ratio() -> None:
    buckets = make_buckets(512, 64)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    landscape = nearest_bucket((600, 1000), buckets)
    assert landscape[1] > landscape[0]
    assert abs(math.log(landscape[1] / landscape[0]) - math.log(1000 / 600)) < 0.1
    assert nearest_bucket((4000, 100), buckets) == (1024, 256), "the tallest bucket for an extreme photo"


def test_each_batch_comes_from_one_bucket_and_a_pass_shows_every_photo() -> None:
    buckets_of = (0, 1, 0, 2, 1, 0, 0)  # photo -> bucket
    batch = 2
    per_pass = 2 + 1 + 1  # ceil(4/2) + ceil(2/2) + ceil(1/2)
    seen: list[int] = []
    for step in range(per_pass):
        indices = bucket_batch_indices(5, 0, buckets_of, step, 0, 1, batch)
        assert len(indices) == batch and len({buckets_of[i] for i in indices}) == 1, indices
        seen.extend(indices)
    assert set(seen) == set(range(7))
    # The same function of (seed, micro-step, rank): ranks split the sequence, a new seed reorders it.
    assert [bucket_batch_indices(5, 0, buckets_of, m, r, 2, batch) for m in range(2) for r in range(2)] == \
        [bucket_batch_indices(5, 0, buckets_of, s, 0, 1, batch) for s in range(4)]
    orders = {tuple(bucket_batch_indices(seed, 0, buckets_of, s, 0, 1, batch) for s in range(per_pass)) for seed in range(6)}
    assert len(orders) > 1


# -- captions ------------------------------------------------------------------------------------

def test_caption_prompts_need_the_token_or_a_template() -> None:
    assert caption_key("dog/photo 1.JPG") == "dog/photo 1.txt"
    assert caption_prompt("  sks dog\non a beach \n", "sks", None, "x") == "sks dog on a beach"
    with pytest.raises(UserInputError, match=r"caption s3://b/dog/3.txt must contain the token 'sks'"):
        caption_prompt("a dog on a beach", "sks", None, "s3://b/dog/3.txt")
    assert caption_prompt("on a beach", "sks", "a photo of {token} dog, {caption}", "x") == "a photo of sks dog, on a beach"
    assert caption_prompt("", "sks", "a photo of {token} dog {caption}", "x") == "a photo of sks dog"


def test_the_prompt_table_lists_each_prompt_once_instance_and_class_first() -> None:
    prompts, indices = prompt_table("a sks dog", "a dog", [None, "sks on a beach", "a sks dog", "sks on a beach", "sks asleep"])
    assert prompts == ["a sks dog", "a dog", "sks on a beach", "sks asleep"]
    assert indices == [0, 2, 0, 2, 3]


def test_caption_dropout_drops_about_its_share_from_its_own_stream() -> None:
    rows = [0, 1] * 2000
    dropped = [drop_captions(rows[i:i + 2], 9, 0.25, 3, i, 0) for i in range(0, len(rows), 2)]
    flat = [index for pair in dropped for index in pair]
    assert 0.22 < flat.count(9) / len(flat) < 0.28
    assert [index for index, original in zip(flat, rows) if index != 9] == [o for i, o in zip(flat, rows) if i != 9]
    # The same (seed, micro-step, rank) drops the same rows; another rank or step draws anew.
    assert drop_captions([0] * 64, 9, 0.5, 3, 7, 0) == drop_captions([0] * 64, 9, 0.5, 3, 7, 0)
    assert drop_captions([0] * 64, 9, 0.5, 3, 7, 0) != drop_captions([0] * 64, 9, 0.5, 3, 7, 1)
    assert drop_captions([0] * 64, 9, 0.0, 3, 7, 0) == [0] * 64


def test_the_empty_prompt_takes_a_slot_once() -> None:
    prompts = ["a sks dog", "a dog"]
    assert prompt_slot(prompts, "") == 2 and prompt_slot(prompts, "") == 2 and prompts == ["a sks dog", "a dog", ""]
    assert prompt_slot(prompts, "a dog") == 1


BASE = {"data": {"instance_uri": "/x", "instance_prompt": "a photo of sks dog"}, "prior": {"enabled": False},
        "output": {"uri": "/y"}}


@pytest.mark.parametrize(("data", "message"), [
    ({"caption_template": "a photo of dog {caption}"}, "data.caption_template .* must contain {token} or the token 'sks'"),
    ({"caption_template": "a photo of {token}"}, "must contain {caption}"),
    ({"caption_template": "{token} {style} {caption}"}, "may use only {token} and {caption}"),
    ({"bucketing": True, "resolution": 32}, "data.bucket_step 64 must divide data.resolution 32"),
    ({"bucket_step": 12}, "bucket_step: must be a multiple of 8"),
])
def test_option_config_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, "data": {**BASE["data"], **data}})


def test_option_defaults_are_off() -> None:
    cfg = config_from_dict(BASE)
    assert (cfg.data.caption_template, cfg.data.bucketing, cfg.training.min_snr_gamma, cfg.training.noise_offset) == (None, False, None, 0.0)
    assert config_from_dict({**BASE, "training": {"minSnrGamma": 5, "noiseOffset": 0.05}}).training.min_snr_gamma == 5.0
