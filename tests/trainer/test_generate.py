"""Generation: batched classifier-free guidance, seeds, the CLI."""
from __future__ import annotations

from pathlib import Path

import torch

from dreambooth_trainer.generate import ImageRequest, encode_text, generate_images, guided_noise, png_bytes
from dreambooth_trainer.tiny import tiny_pipeline

from .conftest import run_cli


def test_batched_guidance_equals_two_separate_passes() -> None:
    pipeline = tiny_pipeline(seed=0)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = encode_text(pipeline, ["a photo of sks toy", "a cat"])
    uncond = encode_text(pipeline, ["", ""])
    t = torch.tensor(500)
    with torch.no_grad():
        batched = guided_noise(pipeline.unet, latents, t, cond, uncond, guidance=7.5)
        separate_uncond = pipeline.unet(latents, t, encoder_hidden_states=uncond).sample
        separate_cond = pipeline.unet(latents, t, encoder_hidden_states=cond).sample
    expected = separate_uncond + 7.5 * (separate_cond - separate_uncond)
    assert torch.allclose(batched, expected, atol=1e-5)


def test_an_image_depends_on_its_own_seed_not_its_batch() -> None:
    pipeline = tiny_pipeline(seed=0)
    alone = generate_images(pipeline, [ImageRequest("a photo of sks toy", seed=5)], steps=2)[0]
    batched = generate_images(pipeline, [ImageRequest("a cat", seed=1), ImageRequest("a photo of sks toy", seed=5)], steps=2)
    diff = (torch.tensor(list(alone.getdata())) - torch.tensor(list(batched[1].getdata()))).abs().max()
    assert diff <= 1, "same seed, same image (up to one level of float rounding)"
    assert png_bytes(batched[0]) != png_bytes(batched[1])


def test_cli_same_seed_same_bytes_and_several_images(tmp_path: Path) -> None:
    common = ["generate", "--model", "tiny", "--prompt", "a photo of sks toy", "--steps", "2"]
    for name in ("a.png", "b.png"):
        result = run_cli([*common, "--seed", "7", "--out", str(tmp_path / name)])
        assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    result = run_cli([*common, "--num-images", "2", "--width", "48", "--height", "32", "--out", str(tmp_path / "many.png")])
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    images = [Image.open(tmp_path / f"many-{i}.png") for i in range(2)]
    assert [image.size for image in images] == [(48, 32), (48, 32)]
    assert images[0].tobytes() != images[1].tobytes()
    bad = run_cli([*common, "--width", "50", "--out", str(tmp_path / "bad.png")])
    assert bad.returncode == 2 and "--width must be a positive multiple of 8" in bad.stderr
