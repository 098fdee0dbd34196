"""The memory plan (dreambooth_api.v1alpha1.memory): exact parts from the published architectures'
counts, the activation estimate labelled, printed by `dreambooth plan` for every example job."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dreambooth_api.v1alpha1.memory import GIB, PlanInputs, plan
from dreambooth_api.v1alpha1.spec import memory_plan, parse_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("job*.yaml"))


def inputs(**changes: object) -> PlanInputs:
    base = dict(source="hf://black-forest-labs/FLUX.1-dev", architecture=None, lora=True, rank=16, train_text_encoder=False,
                precision="bf16", strategy="ddp", world=1, quantize="none", optimizer="adamw", ema=False, batch_size=1,
                prior=True, resolution=1024, gradient_checkpointing=True, gpu_memory=None)
    return PlanInputs(**{**base, **changes})


def test_flux_lora_frozen_weights_are_the_half_type_and_int8_halves_them() -> None:
    bf16 = plan(inputs())
    # transformer 11.90 B + T5 4.76 B + CLIP-L 0.12 B in bf16, the VAE too (Flux's is safe in bf16)
    assert bf16.parts["frozen weights"] == 2 * (11_901_408_320 + 4_762_310_656 + 123_060_480 + 83_819_683)
    int8 = plan(inputs(quantize="int8"))
    assert int8.parts["frozen weights"] < 0.52 * bf16.parts["frozen weights"]
    adapters = 16 * 2_801_664
    assert bf16.parts["trained weights"] == bf16.parts["gradients"] == 4 * adapters and bf16.parts["optimizer state"] == 8 * adapters


@pytest.mark.parametrize(("gpu", "prior", "verdicts"), [
    (24, False, ("too-big", "fits", "fits")), (24, True, ("too-big", "tight", "tight")),
    (48, True, ("fits", "fits", "fits")), (80, True, ("fits", "fits", "fits"))])
def test_flux_lora_on_24_48_and_80_gb(gpu: int, prior: bool, verdicts: tuple[str, ...]) -> None:
    """bf16 cannot fit a 24 GB card for certain; 8 bits fit it one image a step (with prior
    preservation's second image the activation estimate makes it tight)."""
    got = tuple(plan(inputs(quantize=q, prior=prior, gpu_memory=gpu * 10**9)).verdict for q in ("none", "int8", "fp8"))
    assert got == verdicts


def test_fsdp_shards_what_trains_and_the_vae_stays_fp32_for_sdxl() -> None:
    full = inputs(source="hf://stabilityai/stable-diffusion-xl-base-1.0", lora=False)
    one, eight = plan(full), plan(PlanInputs(**{**full.__dict__, "strategy": "fsdp", "world": 8}))
    assert eight.parts["trained weights"] * 8 == pytest.approx(one.parts["trained weights"], rel=1e-6)
    assert one.parts["frozen weights"] == 4 * 83_653_863 + 2 * (123_060_480 + 694_659_840), "VAE fp32, text encoders bf16"


def test_an_unknown_model_has_no_plan_and_is_never_refused() -> None:
    unknown = plan(inputs(source="s3://mirror/flux", gpu_memory=1))
    assert unknown.architecture is None and unknown.verdict == "unknown" and "model.architecture" in unknown.summary()
    named = plan(inputs(source="s3://mirror/flux", architecture="flux1-dev", gpu_memory=GIB))
    assert named.verdict == "too-big"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_dreambooth_plan_prints_every_example_and_each_fits_its_gpus(example: Path) -> None:
    result = subprocess.run([str(Path(sys.executable).with_name("dreambooth")), "plan", str(example)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    spec = parse_spec(yaml.safe_load(example.read_text())["spec"])
    expected = memory_plan(spec)
    if expected.architecture is None:
        assert "no memory plan" in result.stdout
        return
    assert f"memory plan for {expected.architecture}" in result.stdout and "estimate" in result.stdout
    assert expected.verdict == "fits", expected.summary()
    assert f"dreambooth plan examples/{example.name}" in example.read_text() or example.name == "job.yaml"


@pytest.mark.parametrize(("gpu_memory", "status", "reason"), [("80Gi", "True", "Fits"), ("20Gi", "False", "TightWithActivations"),
                                                             (None, "Unknown", "NoGpuMemory")])
def test_an_accepted_job_carries_its_memory_plan_in_a_condition(gpu_memory: str | None, status: str, reason: str) -> None:
    from datetime import datetime, timezone

    from dreambooth_operator import lifecycle
    from dreambooth_operator.conditions import MEMORY_PLAN, get_condition

    spec = yaml.safe_load((REPO / "examples" / "job-flux-lora.yaml").read_text())["spec"]
    spec["model"]["quantize"] = "int8"
    if gpu_memory:
        spec["resources"]["gpuMemory"] = gpu_memory
    else:
        spec["resources"].pop("gpuMemory", None)
    plan_ = memory_plan(parse_spec(spec))
    accepted = lifecycle.accept({}, 1, datetime.now(timezone.utc), "s3://b/jobs/x", None, plan_)
    condition = get_condition(accepted.status["conditions"], MEMORY_PLAN)
    assert (condition["status"], condition["reason"]) == (status, reason)
    assert condition["message"].startswith("flux1-dev: ") and "exact per GPU" in condition["message"]
