"""The trainer, for real, on a tiny random Stable Diffusion on CPU."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_trainer.checkpoint import load_checkpoint_tensors
from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.storage import LocalStorage
from dreambooth_trainer.tiny import tiny_pipeline
from dreambooth_trainer.train import run_training

from .conftest import REPO, metric_lines, run_cli, tiny_config_dict, write_config

EXAMPLE = REPO / "examples" / "train-tiny.yaml"


def train(tmp_path: Path, name: str, **sections) -> Path:
    out = tmp_path / name
    assert run_training(config_from_dict(tiny_config_dict(str(out), **sections))) == 0
    return out


def final_weights(out: Path, component: str) -> dict[str, torch.Tensor]:
    folder = out / "final" / component
    files = list(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return load_file(str(files[0]))


def checkpoint_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights a checkpoint holds (all ranks' shares)."""
    tensors = load_checkpoint_tensors(LocalStorage(out), f"checkpoints/step-{step:08d}")
    return {key.removeprefix("state_dict/"): value for key, value in tensors.items() if key.startswith("state_dict/")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The acceptance command: 6 steps, a checkpoint every 3, through the installed CLI."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(["train", str(EXAMPLE), "--set", "training.max_steps=6", "--set", "checkpointing.every_n_steps=3",
                      "--set", f"output.uri={out}", "--set", "output.tensorboard=true", "--set", "validation.every_n_steps=3"],
                     env={"DREAMBOOTH_CACHE": str(out.parent / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_example_run_leaves_metrics_checkpoints_and_a_loadable_model(straight_run: Path) -> None:
    lines = metric_lines(straight_run)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert (straight_run / "latest").read_text() == "checkpoints/step-00000006"
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    progress = json.loads((straight_run / "progress.json").read_text())
    assert progress["step"] == progress["total_steps"] == 6 and progress["state"] == "succeeded"
    assert {"loss", "images_per_second", "eta_seconds", "time", "percent"} <= progress.keys()
    assert list((straight_run / "tb").glob("events.out.tfevents.*")), "TensorBoard events"
    assert (straight_run / "samples" / "step-00000003.png").exists() and (straight_run / "samples" / "final.png").exists()
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(straight_run / "final"))
    image = pipeline("a photo of sks toy", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (32, 32)


def test_stopping_at_3_and_resuming_to_6_matches_the_straight_run(straight_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    env = {"DREAMBOOTH_CACHE": str(tmp_path / "cache")}
    common = ["--set", "checkpointing.every_n_steps=3", "--set", f"output.uri={out}"]
    first = run_cli(["train", str(EXAMPLE), "--set", "training.max_steps=3", *common], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(["train", str(EXAMPLE), "--set", "training.max_steps=6", *common], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert '"start_step": 3' in second.stderr, "the second process resumed from the step-3 checkpoint"
    straight = {line["step"]: line["loss"] for line in metric_lines(straight_run)}
    resumed = {line["step"]: line["loss"] for line in metric_lines(out)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step
    assert same(final_weights(out, "unet"), final_weights(straight_run, "unet"))


def test_sigterm_writes_a_checkpoint_and_the_next_run_resumes_from_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(str(out), training={"max_steps": 500},
                                                                checkpointing={"every_n_steps": 1000}))
    env = {**os.environ, "DREAMBOOTH_CACHE": str(tmp_path / "cache"), "DREAMBOOTH_LOG_FORMAT": "json"}
    process = subprocess.Popen([str(Path(sys.executable).with_name("dreambooth")), "train", str(config)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        progress = out / "progress.json"
        if progress.exists() and (json.loads(progress.read_text()).get("step") or 0) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    stopped_at = int((out / "latest").read_text().rsplit("-", 1)[1])
    assert 2 <= stopped_at < 500
    assert json.loads((out / "checkpoints" / f"step-{stopped_at:08d}" / "manifest.json").read_text())["step"] == stopped_at
    resumed = run_cli(["train", str(config), "--set", f"training.max_steps={stopped_at + 2}"],
                      env={"DREAMBOOTH_CACHE": str(tmp_path / "cache")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'"start_step": {stopped_at}' in resumed.stderr
    assert metric_lines(out)[-1]["step"] == stopped_at + 2


def test_vae_frozen_unet_trained_text_encoder_only_when_asked(tmp_path: Path) -> None:
    base = tiny_pipeline(seed=0)
    default = train(tmp_path, "default", training={"max_steps": 2})
    assert same(final_weights(default, "vae"), {k: v for k, v in base.vae.state_dict().items()}), "VAE bitwise unchanged"
    assert not same(final_weights(default, "unet"), dict(base.unet.state_dict())), "UNet trained"
    assert same(final_weights(default, "text_encoder"), dict(base.text_encoder.state_dict())), "text encoder frozen"
    with_text = train(tmp_path, "text", training={"max_steps": 2, "train_text_encoder": True})
    assert not same(final_weights(with_text, "text_encoder"), dict(base.text_encoder.state_dict())), "text encoder trained"
    assert same(final_weights(with_text, "vae"), dict(base.vae.state_dict()))


def test_lora_trains_only_adapters_and_exports_both_key_layouts(tmp_path: Path) -> None:
    out = train(tmp_path, "lora", training={"max_steps": 2, "lora": {"enabled": True, "rank": 4}},
                checkpointing={"every_n_steps": 2})
    weights = checkpoint_weights(out, 2)
    assert weights and all("lora_" in key for key in weights), "only adapter weights are trained and saved"
    diffusers_keys = load_file(str(out / "final" / "lora" / "pytorch_lora_weights.safetensors")).keys()
    kohya_keys = load_file(str(out / "final" / "lora" / "lora_kohya.safetensors")).keys()
    assert diffusers_keys and all(key.startswith("unet.") for key in diffusers_keys)
    assert kohya_keys and all(key.startswith("lora_unet_") for key in kohya_keys)
    assert any(key.endswith(".lora_down.weight") for key in kohya_keys) and any(key.endswith(".alpha") for key in kohya_keys)
    # The exported pipeline has the adapters fused: plain weights, loadable without peft.
    assert not any("lora" in key for key in final_weights(out, "unet"))
    base = dict(tiny_pipeline(seed=0).unet.state_dict())
    assert not same(final_weights(out, "unet"), base)


def test_cached_latents_and_embeddings_give_the_same_losses(tmp_path: Path) -> None:
    plain = train(tmp_path, "plain", training={"max_steps": 2}, data={"random_flip": True})
    cached = train(tmp_path, "cached", training={"max_steps": 2, "cache_latents": True}, data={"random_flip": True})
    for a, b in zip(metric_lines(plain), metric_lines(cached)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_gradient_checkpointing_and_attention_kernels_do_not_change_the_math(tmp_path: Path) -> None:
    reference = metric_lines(train(tmp_path, "ref", training={"max_steps": 2}))
    checkpointed = metric_lines(train(tmp_path, "gc", training={"max_steps": 2, "gradient_checkpointing": True}))
    classic = metric_lines(train(tmp_path, "attn", training={"max_steps": 2, "attention": "default"}))
    for ref, gc, attn in zip(reference, checkpointed, classic):
        assert gc["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert attn["loss"] == pytest.approx(ref["loss"], abs=1e-4)


def test_bf16_accumulation_and_ema_train(tmp_path: Path) -> None:
    out = train(tmp_path, "mixed", training={"max_steps": 3, "mixed_precision": "bf16", "gradient_accumulation_steps": 2,
                                              "ema": True, "ema_decay": 0.9}, checkpointing={"every_n_steps": 3})
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3] and all(math.isfinite(line["loss"]) for line in lines)
    raw = checkpoint_weights(out, 3)
    exported = final_weights(out, "unet")
    key = next(k for k in exported if k.endswith("conv_in.weight"))
    assert not torch.equal(exported[key], raw["denoiser." + key]), "the export holds the EMA weights, not the raw ones"


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"optimizer": "adamw_8bit"}, "training.optimizer=adamw_8bit needs a CUDA GPU"),
        ({"mixed_precision": "fp16"}, "training.mixed_precision=fp16 needs a CUDA GPU"),
    ],
)
def test_gpu_only_options_are_refused_on_cpu_before_any_work(tmp_path: Path, training: dict, message: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the option is valid here")
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(str(out), training=training))
    result = run_cli(["train", str(config)])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists(), "nothing was written"


def test_a_corrupt_instance_image_stops_the_run_with_its_name(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "good.png").write_bytes((REPO / "examples/tiny-subject/toy-0.png").read_bytes())
    (photos / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(str(tmp_path / "out"), instance=str(photos)))
    result = run_cli(["train", str(config)])
    assert result.returncode == 2
    assert f"instance image {photos}/3.jpg is not a readable image" in result.stderr


def test_compiled_unet_trains_to_the_same_losses(tmp_path: Path) -> None:
    eager = metric_lines(train(tmp_path, "eager", training={"max_steps": 2}, prior={"enabled": False}))
    # aot_eager traces and compiles the graph (forward and backward) without C++ code generation,
    # which would take minutes on two CPU cores; the GPU benchmark uses inductor.
    compiled = metric_lines(train(tmp_path, "compiled", training={"max_steps": 2, "compile": True, "compile_backend": "aot_eager"},
                                  prior={"enabled": False}))
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_with_loss_scaling_trains_on_gpu(tmp_path: Path) -> None:
    lines = metric_lines(train(tmp_path, "fp16", training={"max_steps": 3, "mixed_precision": "fp16"}))
    assert all(math.isfinite(line["loss"]) for line in lines)
