"""model.quantize: LoRA on an 8-bit frozen base. int8 weight-only runs on a CPU: train, export,
generate and serve on tiny-flux and tiny-sdxl; the exported files are plain (unquantized) LoRA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_trainer.config import config_from_dict
from dreambooth_trainer.errors import UserInputError
from dreambooth_trainer.train import run_training

from .conftest import tiny_config_dict

SOURCES = {"flux": "tiny-flux", "sdxl": "tiny-sdxl"}


def quantized_config(out: Path, source: str, choice: str = "int8") -> object:
    return config_from_dict(tiny_config_dict(
        str(out), model={"source": source, "quantize": choice},
        prior={"num_class_images": 1, "sample_steps": 1, "sample_batch_size": 1},
        training={"max_steps": 2, "cache_latents": True, "lora": {"enabled": True, "rank": 2}},
        validation={"fidelity": False, "steps": 1, "num_images": 1}))


@pytest.mark.parametrize("family", list(SOURCES))
def test_int8_keeps_the_frozen_base_in_8_bits_and_trains_only_full_precision_adapters(family: str, tmp_path: Path) -> None:
    from torchao.utils import TorchAOBaseTensor

    from dreambooth_trainer.models import load_model
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.quantize import quantize_frozen_modules

    cfg = quantized_config(tmp_path, SOURCES[family])
    fam, pipeline = load_model(cfg.model.source)
    parts = fam.components(pipeline)
    quantized = quantize_frozen_modules(parts, fam, cfg)
    assert quantized[0] is parts.denoiser and len(quantized) == 1 + len(parts.text_encoders), "the base and every frozen encoder"
    module = DreamBoothModule(cfg, fam, pipeline)
    linears = [m for m in module.denoiser.modules() if type(m) is torch.nn.Linear and not any(p.requires_grad for p in m.parameters())]
    assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears), "every frozen linear weight in 8 bits"
    assert all(p.dtype == torch.float32 and not isinstance(p, TorchAOBaseTensor) for p in module.trainable_parameters())


@pytest.mark.parametrize("family", list(SOURCES))
def test_an_int8_lora_run_exports_plain_lora_files_that_generate_and_serve(family: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dreambooth_cli.main import app
    from dreambooth_trainer.export import LORA_DIFFUSERS
    from dreambooth_trainer.generate import ImageRequest, generate_images
    from dreambooth_trainer.models import load_pipeline
    from serving.runtime import prepare_pipeline
    from serving.settings import ServerSettings

    out = tmp_path / "out"
    assert run_training(quantized_config(out, SOURCES[family])) == 0
    lora = out / "final" / "lora"
    weights = load_file(str(lora / LORA_DIFFUSERS))
    assert weights and all(t.dtype == torch.float32 for t in weights.values()), "plain fp32 LoRA tensors"
    request = [ImageRequest("a photo of sks toy", seed=3)]
    base = load_pipeline(SOURCES[family])
    before = generate_images(base, request, steps=2, height=32, width=32)[0]
    base.load_lora_weights(str(lora))
    after = generate_images(base, request, steps=2, height=32, width=32)[0]
    assert before.tobytes() != after.tobytes(), "the adapters change the image"
    served = prepare_pipeline(ServerSettings(model=SOURCES[family], lora=str(lora), device="cpu"))
    assert generate_images(served, request, steps=2, height=32, width=32)[0].tobytes() == after.tobytes()
    result = CliRunner().invoke(app, ["generate", "--model", str(out / "final"), "--prompt", "a photo of sks toy", "--steps", "1",
                                      "--out", str(tmp_path / "moon.png")])
    assert result.exit_code == 0, result.output[-2000:]


def test_fp8_needs_a_gpu_that_has_it(tmp_path: Path) -> None:
    from dreambooth_trainer.quantize import check_quantize_runtime

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        check_quantize_runtime("fp8")
    else:
        with pytest.raises(UserInputError, match="model.quantize=fp8 needs a CUDA GPU with fp8"):
            check_quantize_runtime("fp8")
    with pytest.raises(ValueError, match="model.quantize=int8 quantizes the frozen base of a LoRA run"):
        config_from_dict(tiny_config_dict(str(tmp_path), model={"quantize": "int8"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_fp8_lora_run_on_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this GPU has no fp8")
    assert run_training(quantized_config(tmp_path / "out", "tiny-flux", "fp8")) == 0
