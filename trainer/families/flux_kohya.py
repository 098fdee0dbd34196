"""Flux LoRA in the BFL/kohya key layout (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`),
which ComfyUI and kohya's tools read. BFL fuses q/k/v (and, in single blocks, the MLP input) into
one linear: the fused adapter's down is the parts' downs stacked along the rank, its up is their
ups block-diagonal, and alpha grows with the number of parts so the scale alpha/rank stays the same.
Parts the LoRA did not target are zero, since a fused layer needs all of them."""
from __future__ import annotations

import torch

DOUBLE_BLOCKS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_BLOCKS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
BLOCK_KINDS = (("transformer_blocks", "double_blocks", DOUBLE_BLOCKS), ("single_transformer_blocks", "single_blocks", SINGLE_BLOCKS))


def fused_adapter(downs: list[torch.Tensor], ups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(downs, dim=0), torch.block_diag(*ups)


def bfl_lora(peft_state: dict[str, torch.Tensor], transformer: torch.nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT adapter weights of a FluxTransformer2DModel -> BFL-named kohya weights."""
    out: dict[str, torch.Tensor] = {}
    for prefix, bfl_prefix, mapping in BLOCK_KINDS:
        for index in range(len(getattr(transformer, prefix))):
            for bfl_name, parts in mapping.items():
                keys = [f"{prefix}.{index}.{part}" for part in parts]
                present = [key for key in keys if f"{key}.lora_A.weight" in peft_state]
                if not present:
                    continue
                rank = peft_state[f"{present[0]}.lora_A.weight"].shape[0]
                downs, ups = [], []
                for key in keys:
                    if key in present:
                        downs.append(peft_state[f"{key}.lora_A.weight"])
                        ups.append(peft_state[f"{key}.lora_B.weight"])
                    else:
                        layer = transformer.get_submodule(key)
                        downs.append(torch.zeros(rank, layer.in_features))
                        ups.append(torch.zeros(layer.out_features, rank))
                down, up = fused_adapter([d.detach().float().cpu() for d in downs], [u.detach().float().cpu() for u in ups])
                name = f"lora_unet_{bfl_prefix}_{index}_{bfl_name}"
                out[f"{name}.lora_down.weight"] = down.contiguous()
                out[f"{name}.lora_up.weight"] = up.contiguous()
                out[f"{name}.alpha"] = torch.tensor(float(alpha) * len(parts))
    return out
