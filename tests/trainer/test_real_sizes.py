"""The published models at their real size, on the meta device (no weights; seconds on a CPU):
the memory plan's counts are what diffusers builds from the published configs; every LoRA export
layout is read back whole by diffusers' own readers (the adapters alone are real tensors, drawn at
random); kohya names are sd-scripts' own; FSDP finds each denoiser's blocks."""
from __future__ import annotations

import tempfile
from functools import cache
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dreambooth_api.v1alpha1.architectures import ARCHITECTURES
from dreambooth_api.v1alpha1.sections import LoraConfig as LoraSection
from dreambooth_trainer.architectures import PUBLISHED, activation_estimate, build_denoiser, build_text_encoders, build_vae
from dreambooth_trainer.families import FAMILIES
from dreambooth_trainer.families.base import TEXT_LORA_TARGETS
from dreambooth_trainer.module import add_lora_adapters

NAMES = list(PUBLISHED)
RANK, ALPHA = 2, 6.0


def size_facts(module: torch.nn.Module) -> tuple[int, int, int]:
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return (sum(p.numel() for p in module.parameters()), sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears))


def per_rank(module: torch.nn.Module, targets: list[str], read_layers: int | None = None) -> int:
    """LoRA parameters per unit of rank on `targets` (within the first `read_layers` layers, for a text encoder)."""
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            layer = name.split("layers.")[1].split(".")[0] if "layers." in name else None
            if read_layers is None or layer is None or int(layer) < read_layers:
                total += sub.in_features + sub.out_features
    return total


@pytest.mark.parametrize("name", NAMES)
def test_the_memory_plans_counts_are_the_published_models(name: str) -> None:
    arch, family = ARCHITECTURES[name], FAMILIES[PUBLISHED[name].family]
    denoiser, encoders, vae = build_denoiser(name), build_text_encoders(name), build_vae(name)
    assert arch.family == family.name
    assert size_facts(denoiser) == (arch.denoiser.parameters, arch.denoiser.linear_weights, arch.denoiser.linear_outputs)
    assert [size_facts(e) for e in encoders] == [(s.parameters, s.linear_weights, s.linear_outputs) for s in arch.text_encoders]
    assert sum(p.numel() for p in vae.parameters()) == arch.vae
    assert per_rank(denoiser, list(family.denoiser_lora_targets)) == arch.lora_per_rank
    assert [per_rank(e, TEXT_LORA_TARGETS, family.text_layers_read(i, e)) if i in family.trainable_text_encoders else 0
            for i, e in enumerate(encoders)] == list(arch.text_lora_per_rank)
    assert activation_estimate(name) == (arch.activation_per_latent_pixel, arch.activation_per_text_token)
    pipeline = SimpleNamespace(**{family.denoiser_name: denoiser}, vae=vae, vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    assert family.native_size(pipeline) == arch.native_size


@pytest.mark.parametrize("name", NAMES)
def test_fsdp_finds_each_denoisers_blocks(name: str) -> None:
    from dreambooth_trainer.fsdp import block_class_names

    denoiser = build_denoiser(name)
    blocks = block_class_names(denoiser, [])
    assert blocks == set(ARCHITECTURES[name].block_classes)
    present = {type(module).__name__ for module in denoiser.modules()}
    assert {"FluxTransformerBlock", "JointTransformerBlock", "BasicTransformerBlock"} & blocks <= present


@cache
def adapted(name: str) -> tuple[Any, torch.nn.Module, list[torch.nn.Module]]:
    """The model on meta with the family's default LoRA (denoiser and trainable text encoders), its
    adapters alone made real and random."""
    family = FAMILIES[PUBLISHED[name].family]
    denoiser, encoders = build_denoiser(name), build_text_encoders(name)
    with torch.device("meta"):
        add_lora_adapters(family, LoraSection(enabled=True, rank=RANK, alpha=ALPHA), denoiser,
                          [(i, encoders[i]) for i in family.trainable_text_encoders])
    generator = torch.Generator().manual_seed(0)
    for module in (denoiser, *encoders):
        for sub_name, sub in module.named_modules():
            if sub_name.endswith(("lora_A.default", "lora_B.default")):
                sub.weight = torch.nn.Parameter(torch.randn(sub.weight.shape, generator=generator) * 0.1)
    return family, denoiser, encoders


def trained_updates(family: Any, denoiser: torch.nn.Module, encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Each adapted module's update B·A·alpha/rank (on probes), by `<component>.<module>` (text_model. dropped)."""
    from peft.utils import get_peft_model_state_dict

    updates = {}
    for component, module in zip((family.denoiser_name, *family.text_encoder_names), (denoiser, *encoders)):
        if not getattr(module, "peft_config", None):
            continue
        state = get_peft_model_state_dict(module)
        for key in state:
            if key.endswith(".lora_A.weight"):
                name = key.removesuffix(".lora_A.weight")
                updates[f"{component}.{name.removeprefix('text_model.')}"] = delta(state[f"{name}.lora_B.weight"], state[key], ALPHA / RANK)
    return updates


def delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """The update B·A·scale applied to fixed random probes: equal maps give equal results, and at
    real size the update itself would be as large as the model."""
    probes = torch.randn(down.flatten(1).shape[1], 4, generator=torch.Generator().manual_seed(down.flatten(1).shape[1]))
    return up.flatten(1) @ (down.flatten(1) @ probes) * scale


def read_updates(state: dict[str, torch.Tensor], alphas: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """What a reader's PEFT-layout state dict (and network alphas) makes of each module."""
    updates = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            scale = (alphas or {}).get(name, down.shape[0]) / down.shape[0]
            updates[name.replace(".text_model.", ".")] = delta(state[f"{name}.lora_B.weight"], down, scale)
    return updates


def peft_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya reader's old-layout keys (`to_q_lora.down`) in PEFT's (`to_q.lora_A`), as diffusers' loader
    converts them, and each old key's new name (the converters keep order and map key for key)."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    converted: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for group, convert in ((("unet.",), convert_unet_state_dict_to_peft), (("text_encoder",), convert_state_dict_to_peft)):
        part = {k: v for k, v in state.items() if k.startswith(group)}
        if not part:
            continue
        if all(".lora_A." in k or ".lora_B." in k for k in part):  # already PEFT's layout (Flux's transformer)
            new = dict(part)
        else:
            new = convert(part)
        assert len(new) == len(part)
        renamed.update(zip(part, new))
        converted.update(new)
    converted.update({k: v for k, v in state.items() if not k.startswith(("unet.", "text_encoder"))})
    renamed.update({k: k for k in state if not k.startswith(("unet.", "text_encoder"))})
    return converted, renamed


def assert_same_updates(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(ours) - set(theirs))
    assert not missing, f"{what}: {len(missing)} of {len(ours)} adapted modules not restored, e.g. {missing[:3]}"
    for name, update in ours.items():
        assert torch.allclose(theirs[name], update, rtol=1e-4, atol=1e-5 * float(update.abs().max())), f"{what}: {name}"
    for name in set(theirs) - set(ours):  # a fused layer's parts the LoRA did not target are zero
        assert not theirs[name].any(), f"{what}: {name} is not ours and not zero"


@pytest.mark.parametrize("name", NAMES)
def test_the_diffusers_file_is_read_back_whole_with_its_alpha(name: str) -> None:
    family, denoiser, encoders = adapted(name)
    layers = family.lora_layers(denoiser, encoders)
    pipeline = family.pipeline_class()
    with tempfile.TemporaryDirectory() as folder:
        pipeline.save_lora_weights(folder, **layers, safe_serialization=True)
        state, metadata = read_with_metadata(pipeline, folder)
    saved = {f"{k.removesuffix('_lora_layers')}.{key}" for k, v in layers.items() if k.endswith("_lora_layers") for key in v}
    assert set(state) == saved, f"the reader changed {len(saved ^ set(state))} of {len(saved)} keys"
    assert set(metadata) == {k.removesuffix("_lora_layers") for k in layers if k.endswith("_lora_layers")}
    assert all(config["lora_alpha"] == ALPHA and config["r"] == RANK for config in metadata.values()), "the trained alpha travels with the file"
    alphas = {key.removesuffix(".lora_A.weight"): metadata[key.split(".")[0]]["lora_alpha"] for key in state if key.endswith(".lora_A.weight")}
    assert_same_updates(trained_updates(family, denoiser, encoders), read_updates(state, alphas), f"{name} diffusers file")


def read_with_metadata(pipeline: Any, folder: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The state dict and the per-component adapter configs (`<component>.lora_alpha`, ...)."""
    result = pipeline.lora_state_dict(folder, return_lora_metadata=True)
    state, metadata = result[0], result[-1]
    by_component: dict[str, dict] = {}
    for key, value in (metadata or {}).items():
        component, _, field = key.partition(".")
        by_component.setdefault(component, {})[field] = value
    return state, by_component


@pytest.mark.parametrize("name", ["sd15", "sd21-v", "sdxl-base", "flux1-dev", "flux1-schnell"])
def test_the_kohya_file_is_read_back_whole_by_diffusers_kohya_readers(name: str) -> None:
    family, denoiser, encoders = adapted(name)
    kohya = family.kohya_lora(denoiser, encoders)
    pipeline = family.pipeline_class()
    if family.name == "flux":  # BFL names: the reader bakes alpha/rank into the tensors
        state, alphas = pipeline.lora_state_dict(dict(kohya), return_alphas=True)
    else:
        state, alphas = pipeline.lora_state_dict(dict(kohya), unet_config=denoiser.config)
    state, renamed = peft_layout(state)
    module_alphas = {renamed[key.removesuffix(".alpha")].removesuffix(".lora_A.weight"): value for key, value in (alphas or {}).items()}
    theirs = read_updates(state, module_alphas)
    assert_same_updates(trained_updates(family, denoiser, encoders), theirs, f"{name} kohya file")


# sd-scripts' SDXL UNet (library/sdxl_original_unet.py): transformer layers of each SGM block that has attention.
SDXL_SGM_ATTENTION = {**{f"input_blocks_{i}_1": 2 for i in (4, 5)}, **{f"input_blocks_{i}_1": 10 for i in (7, 8)},
                      "middle_block_1": 10, **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
                      **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}}
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")


def kohya_modules(kohya: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {key.split(".")[0] for key in kohya if key.startswith(prefix + "_")}


def test_kohya_names_are_sd_scripts_names_at_real_size() -> None:
    family, denoiser, encoders = adapted("sdxl-base")
    kohya = family.kohya_lora(denoiser, encoders)
    assert kohya_modules(kohya, "lora_unet") == {f"lora_unet_{block}_transformer_blocks_{t}_{attn}_{proj}"
                                                 for block, depth in SDXL_SGM_ATTENTION.items() for t in range(depth)
                                                 for attn in ("attn1", "attn2") for proj in ATTENTION_PROJECTIONS}
    clip = ("q_proj", "k_proj", "v_proj", "out_proj")
    # SDXL reads CLIP-L's penultimate layer: sd-scripts' names for its first 11 layers, and all 32 of bigG's.
    assert kohya_modules(kohya, "lora_te1") == {f"lora_te1_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(11) for p in clip}
    assert kohya_modules(kohya, "lora_te2") == {f"lora_te2_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(32) for p in clip}

    family, denoiser, encoders = adapted("sd15")
    kohya = family.kohya_lora(denoiser, encoders)
    # sd-scripts trains SD1/SD2 on diffusers' UNet names; one text encoder is lora_te_.
    expected_unet = {"lora_unet_" + name.replace(".", "_") for name, _ in denoiser.named_modules()
                     if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and ".lora_" not in name}
    assert kohya_modules(kohya, "lora_unet") == expected_unet and len(expected_unet) == 16 * 2 * 4
    assert kohya_modules(kohya, "lora_te") == {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(12) for p in clip}
    assert all(float(value) == ALPHA for key, value in kohya.items() if key.endswith(".alpha")), "the trained alpha"

    family, denoiser, encoders = adapted("flux1-dev")
    kohya = family.kohya_lora(denoiser, encoders)
    # sd-scripts' Flux layout: BFL block names for the transformer, CLIP-L as lora_te1_.
    assert kohya_modules(kohya, "lora_unet") == {f"lora_unet_double_blocks_{i}_{part}" for i in range(19) for part in (
        "img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2")} | {
        f"lora_unet_single_blocks_{i}_linear1" for i in range(38)}
    assert kohya_modules(kohya, "lora_te1") == {f"lora_te1_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(12) for p in clip}
