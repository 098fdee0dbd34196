"""`model.quantize`: a LoRA run's frozen base in 8 bits (torchao weight-only), so the largest
families' LoRA fits a 24 GB GPU by the memory plan. The frozen denoiser and the text encoders that
stay frozen keep their linear layers' weights in int8 (or fp8 on GPUs that have it) with one scale
per output; the adapters peft adds on top train in fp32, and the exported LoRA files are as
without quantization (the export fuses them into the base as loaded)."""
from __future__ import annotations

from typing import Any

import torch

from .errors import UserInputError


def check_quantize_runtime(choice: str) -> None:
    """fp8 weights need a GPU with fp8 (Ada, Hopper or newer); int8 runs anywhere."""
    if choice != "fp8":
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise UserInputError("model.quantize=fp8 needs a CUDA GPU with fp8 (compute capability 8.9 or newer: L4, L40, H100); use int8")


def weight_only_config(choice: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[choice]()


def quantize_frozen_modules(parts: Any, family: Any, cfg: Any) -> list[torch.nn.Module]:
    """Quantize the frozen denoiser and frozen text encoders in place; returns what was quantized."""
    choice = cfg.model.quantize
    if choice == "none":
        return []
    from torchao.quantization import quantize_

    training = cfg.training
    frozen = [parts.denoiser] + [encoder for index, encoder in enumerate(parts.text_encoders)
                                 if not (training.train_text_encoder and index in family.trainable_text_encoders)]
    for module in frozen:
        quantize_(module, weight_only_config(choice))
    return frozen
