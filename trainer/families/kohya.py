"""LoRA in kohya's key layout (`lora_unet_…`, `lora_te_…`; `lora_down`/`lora_up`/`alpha`), named
exactly as kohya's sd-scripts names its modules, since its tools, A1111 and ComfyUI match by name
and skip what they do not know without a word.

- One text encoder (SD1/SD2) is `lora_te_`; two (SDXL) are `lora_te1_` and `lora_te2_`; Flux's
  CLIP-L is `lora_te1_` (its T5 would be `lora_te3_`).
- sd-scripts trains SD1/SD2 on a UNet with diffusers' module names, but SDXL on the original
  (SGM/LDM) UNet: `input_blocks`, `middle_block`, `output_blocks`, and resnets named `in_layers`,
  `emb_layers`, `out_layers`, `skip_connection`. `sgm_unet_name` maps diffusers' names there.
- Each module's alpha is the trained `lora_alpha` (the scale alpha/rank is what the readers apply).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

# A diffusers resnet's layers by their SGM names (norm1, conv1, … in `in_layers`, `out_layers`).
SGM_RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
SGM_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                 "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sgm_resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return ".".join(part for part in (SGM_RESNET_LAYERS.get(head, head), rest) if part)


def sgm_unet_name(name: str, config: Any) -> str:
    """A module of diffusers' `UNet2DConditionModel` under its name in the original SGM UNet (the
    one sd-scripts trains SDXL on). Down block b's layer j is input block 1 + b·(n+1) + j (n = layers
    per block; its resnet at .0, its attention at .1), its downsampler input block (b+1)·(n+1) `.0.op`;
    up block b's layer j is output block b·(n+1) + j, its upsampler at the last layer's next slot."""
    for diffusers, sgm in SGM_TOP_LEVEL.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return sgm + name[len(diffusers):]
    per_block = config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    match = re.match(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", name)
    if match is None:
        raise ValueError(f"no SGM name for UNet module {name!r}")
    kind, block, inner, layer, tail = match.group(1), int(match.group(2) or 0), match.group(3), int(match.group(4)), match.group(5) or ""
    resnet = inner == "resnets"
    tail = sgm_resnet_tail(tail) if resnet else tail
    if kind == "mid_block":
        slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(inner, layer)]
        return ".".join(part for part in (f"middle_block.{slot}", tail) if part)
    if kind == "down_blocks":
        if inner == "downsamplers":
            return f"input_blocks.{(block + 1) * (per_block + 1)}.0.op" + tail.removeprefix("conv")
        return ".".join(part for part in (f"input_blocks.{1 + block * (per_block + 1) + layer}.{0 if resnet else 1}", tail) if part)
    block_type = config.up_block_types[block]
    if inner == "upsamplers":
        slot = 2 if "CrossAttn" in block_type else 1
        return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}" + ("." + tail if tail else "")
    return ".".join(part for part in (f"output_blocks.{block * (per_block + 1) + layer}.{0 if resnet else 1}", tail) if part)


def adapted_modules(peft_state: dict[str, torch.Tensor]) -> list[str]:
    """The module names a PEFT state dict adapts (`….lora_A.weight` keys), in order."""
    return [key.removesuffix(".lora_A.weight") for key in peft_state if key.endswith(".lora_A.weight")]


def kohya_weights(prefix: str, peft_state: dict[str, torch.Tensor], alpha: float,
                  name_of: Callable[[str], str] = lambda name: name, bake_scale: bool = False) -> dict[str, torch.Tensor]:
    """One module's adapters under kohya keys: `<prefix>_<module with _ for .>.lora_down/lora_up/alpha`.
    `bake_scale`: alpha/rank goes into lora_up and alpha is the rank, for readers that drop alphas."""
    out: dict[str, torch.Tensor] = {}
    for module in adapted_modules(peft_state):
        if f"{module}.lora_B.bias" in peft_state:
            raise ValueError(f"LoRA module {module} has a lora_B bias, which kohya's layout cannot hold")
        name = f"{prefix}_{name_of(module).replace('.', '_')}"
        down = peft_state[f"{module}.lora_A.weight"].detach().float().cpu().contiguous()
        up = peft_state[f"{module}.lora_B.weight"].detach().float().cpu().contiguous()
        rank = down.shape[0]
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up * (alpha / rank) if bake_scale else up
        out[f"{name}.alpha"] = torch.tensor(float(rank if bake_scale else alpha))
    return out


def text_encoder_prefixes(count: int) -> list[str]:
    """kohya's text-encoder prefixes for a model with `count` CLIP encoders."""
    return ["lora_te"] if count == 1 else [f"lora_te{index + 1}" for index in range(count)]


def peft_alpha(module: torch.nn.Module) -> float:
    config = module.peft_config["default"]
    return float(config.lora_alpha)
