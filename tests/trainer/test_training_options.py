"""Captions, aspect-ratio buckets, min-SNR and offset noise in the real dataset and module (tiny model)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_trainer.buckets import make_buckets
from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.data import DreamBoothBatches, ImageSet, LatentCache, latent_distribution_params, load_instance_images
from dreambooth_trainer.errors import UserInputError
from dreambooth_trainer.storage import open_storage
from dreambooth_trainer.families import family_of_pipeline
from dreambooth_trainer.tiny import tiny_pipeline
from dreambooth_trainer.train import cached_text_conditions, run_training

from .conftest import SUBJECT, metric_lines, tiny_config_dict

TOKEN = "sks"
CAPTION = "sks toy on a red chair"
WIDE = (24, 40)  # the 32 px bucket (step 8) of a 2:1 photo


def subject_with_a_wide_photo(folder: Path) -> Path:
    """The tiny subject (four 64x64 photos), one of them also as a 128x64 landscape, one captioned."""
    shutil.copytree(SUBJECT, folder)
    photo = Image.open(folder / "toy-0.png")
    wide = Image.new("RGB", (128, 64))
    wide.paste(photo, (0, 0))
    wide.paste(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (64, 0))
    wide.save(folder / "toy-wide.png")
    (folder / "toy-1.txt").write_text(CAPTION + "\n")
    return folder


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subject_with_a_wide_photo(tmp_path_factory.mktemp("options") / "subject")


@pytest.fixture(scope="module")
def pipeline():
    return tiny_pipeline(seed=0)


def instance_set(folder: Path, template: str | None = None) -> ImageSet:
    return load_instance_images(open_storage(str(folder)), "a photo of sks toy", TOKEN, template)


def class_set() -> ImageSet:
    return ImageSet([Image.new("RGB", (32, 32), (90, 90, 90)), Image.new("RGB", (32, 32), (20, 120, 200))], "a photo of toy")


def batches(instance: ImageSet, start: int = 0, stop: int = 12, **kwargs) -> DreamBoothBatches:
    return DreamBoothBatches(instance, class_set(), 32, True, True, 2, 0, 0, 1, start, stop, buckets=make_buckets(32, 8), **kwargs)


def module_for(pipeline, prompts: list[str] | None = None, cached: bool = False, **training):
    """The real module on the tiny SD pipeline; `cached`: text conditions encoded once up front."""
    from dreambooth_trainer.module import DreamBoothModule

    cfg = config_from_dict(tiny_config_dict("/unused", training=training))
    family = family_of_pipeline(pipeline)
    conds = cached_text_conditions(cfg, family, pipeline, prompts, torch.device("cpu")) if cached else None
    return DreamBoothModule(cfg, family, pipeline, conds, prompts)


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


# -- captions ------------------------------------------------------------------------------------

def test_a_captioned_photo_is_conditioned_on_its_caption(subject: Path, pipeline) -> None:
    data = batches(instance_set(subject))
    assert data.prompts == ["a photo of sks toy", "a photo of toy", CAPTION]
    captioned = next(batch for batch in map(data.batch_at, range(12)) if 2 in batch["prompt_index"].tolist())
    row = captioned["prompt_index"].tolist().index(2)
    ids = pipeline.tokenizer([CAPTION], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = pipeline.text_encoder(ids)[0][0]
        for module in (module_for(pipeline, data.prompts), module_for(pipeline, data.prompts, cached=True)):
            hidden = module.text_conditions(captioned["prompt_index"])["prompt_embeds"]
            assert torch.allclose(hidden[row], want, atol=1e-6)
            assert not torch.allclose(hidden[row], hidden[captioned["prompt_kind"].tolist().index(1)])


def test_a_caption_template_fills_in_the_caption(subject: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(subject, tmp_path / "s")
    (folder / "toy-2.txt").write_text("on a beach")
    prompts = instance_set(folder, "a photo of {token} toy, {caption}").image_prompts
    assert prompts == [None, "a photo of sks toy, sks toy on a red chair", "a photo of sks toy, on a beach", None, None]


def test_a_caption_without_the_token_names_its_file(subject: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(subject, tmp_path / "s")
    (folder / "toy-3.txt").write_text("a toy on a beach")
    with pytest.raises(UserInputError, match=rf"caption {folder / 'toy-3.txt'} must contain the token 'sks'"):
        instance_set(folder)


def test_captions_are_read_beside_photos_in_the_object_store(subject: Path, bucket: str) -> None:
    storage = open_storage(f"s3://{bucket}/subject")
    for path in sorted(subject.iterdir()):
        storage.write_bytes(path.name, path.read_bytes())
    storage.write_text("toy-2.txt", "a toy")
    with pytest.raises(UserInputError, match=rf"caption s3://{bucket}/subject/toy-2.txt must contain the token"):
        load_instance_images(storage, "a photo of sks toy", TOKEN, None)
    storage.write_text("toy-2.txt", "a sks toy")
    assert load_instance_images(storage, "a photo of sks toy", TOKEN, None).image_prompts == [None, CAPTION, "a sks toy", None, None]


# -- buckets -------------------------------------------------------------------------------------

def test_a_wide_photo_trains_at_its_bucket_and_batches_share_one_bucket(subject: Path) -> None:
    data = batches(instance_set(subject))
    wide = 4  # toy-wide.png, after toy-0..3
    shapes = set()
    for m in range(12):
        batch = data.batch_at(m)
        shapes.add(tuple(batch["pixels"].shape[-2:]))
        drew_wide = [64, 128] in batch["original_size"][:2].tolist()
        assert tuple(batch["pixels"].shape[-2:]) == (WIDE if drew_wide else (32, 32)), m
        if drew_wide:  # 128x64 just covers 40x24 at 48x24: the centered crop starts 4 px in
            assert batch["original_size"].tolist() == [[64, 128], [64, 128], [32, 32], [32, 32]]
            assert batch["crop_top_left"].tolist() == [[0, 4], [0, 4], [8, 0], [8, 0]]
    assert shapes == {WIDE, (32, 32)}
    assert data.layout.instance_sizes[wide] == WIDE


def test_bucketed_batches_are_the_same_for_any_worker_count_and_resume_point(subject: Path) -> None:
    instance = instance_set(subject)
    reference = [batches(instance).batch_at(m) for m in range(8)]
    loaded = list(torch.utils.data.DataLoader(batches(instance, stop=8), batch_size=None, num_workers=2))
    resumed = list(batches(instance, start=5, stop=8))
    assert len(loaded) == 8 and all(same_batch(a, b) for a, b in zip(loaded, reference))
    assert all(same_batch(a, b) for a, b in zip(resumed, reference[5:]))


def test_cached_latents_keep_each_bucket_shape(subject: Path, pipeline) -> None:
    instance = instance_set(subject)
    cache = LatentCache()
    cache.fill(pipeline.vae, [instance, class_set()], 32, (False, True), make_buckets(32, 8))
    cached, pixels = batches(instance, latent_cache=cache), batches(instance)
    shapes = set()
    for m in range(6):
        got, want = cached.batch_at(m), pixels.batch_at(m)
        shapes.add(tuple(got["latent_params"].shape[-2:]))
        with torch.no_grad():
            assert torch.allclose(got["latent_params"], latent_distribution_params(pipeline.vae, want["pixels"]), atol=1e-6)
        assert torch.equal(got["original_size"], want["original_size"]) and torch.equal(got["crop_top_left"], want["crop_top_left"])
    assert shapes == {(6, 10), (8, 8)}


# -- min-SNR and offset noise in the step --------------------------------------------------------

@pytest.fixture(scope="module")
def square_batch() -> dict:
    instance = ImageSet([Image.open(path).convert("RGB") for path in sorted(SUBJECT.glob("*.png"))], "a photo of sks toy")
    return DreamBoothBatches(instance, class_set(), 32, True, False, 2, 0, 0, 1, 0, 1).batch_at(0)


def step_loss(pipeline, batch: dict, **training) -> torch.Tensor:
    with torch.no_grad():
        return module_for(pipeline, **training).compute_loss(batch)


def test_min_snr_and_offset_noise_change_the_step_loss_and_off_changes_nothing(pipeline, square_batch: dict) -> None:
    today = step_loss(pipeline, square_batch)
    assert torch.equal(step_loss(pipeline, square_batch, noise_offset=0.0), today)
    assert torch.equal(step_loss(pipeline, square_batch, min_snr_gamma=None), today)
    assert not torch.allclose(step_loss(pipeline, square_batch, noise_offset=0.5), today)
    # γ below every timestep's SNR (≥ 0.0047 on this schedule): each weight γ/SNR < 1 lowers the loss.
    assert step_loss(pipeline, square_batch, min_snr_gamma=1e-3) < today
    # γ above every timestep's SNR: each epsilon weight is min(SNR, γ)/SNR = 1, the plain loss.
    assert torch.allclose(step_loss(pipeline, square_batch, min_snr_gamma=1e9), today, rtol=1e-6)


# -- one run with every option -------------------------------------------------------------------

def test_a_run_with_captions_buckets_min_snr_and_offset_noise(subject: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_trainer.module import DreamBoothModule

    seen: list[tuple[tuple[int, ...], list[int]]] = []
    compute_loss = DreamBoothModule.compute_loss

    def recording(self, batch):
        seen.append((tuple(batch["latent_params"].shape), batch["prompt_index"].tolist()))
        return compute_loss(self, batch)

    monkeypatch.setattr(DreamBoothModule, "compute_loss", recording)
    out = tmp_path / "run"
    cfg = tiny_config_dict(str(out), instance=str(subject),
                           data={"bucketing": True, "bucket_step": 8, "caption_template": "a photo of {token} toy, {caption}"},
                           training={"max_steps": 5, "batch_size": 1, "cache_latents": True, "min_snr_gamma": 5.0, "noise_offset": 0.1},
                           validation={"fidelity": False, "steps": 1, "num_images": 1})
    assert run_training(config_from_dict(cfg)) == 0
    # One pass over the five photos (batch 1): the wide one at its bucket, the captioned one on its caption.
    assert len(seen) == 5 and {shape for shape, _ in seen} == {(2, 8, 6, 10), (2, 8, 8, 8)}, seen
    assert sorted(index for _, (index, _) in seen) == [0, 0, 0, 0, 2]
    losses = [line["loss"] for line in metric_lines(out)]
    assert len(losses) == 5 and all(loss == loss and loss < 10 for loss in losses)
    assert (out / "final" / "model_index.json").exists()
