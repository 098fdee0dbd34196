"""training.strategy=fsdp with two real ranks over gloo on CPU: the UNet is sharded, checkpoints
are sharded (one torch.distributed.checkpoint file per rank) and committed as any checkpoint,
a resume continues the same curve, and the export is a whole diffusers folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from .conftest import metric_lines, tiny_config_dict, write_config
from .test_distributed_and_s3 import launch_rank
from tests.testbed.minio_server import free_port

STEPS = 3


def train_two_ranks(tmp_path: Path, out: Path, name: str) -> list[str]:
    """Both ranks of a run with training.strategy=fsdp, through the command pods run; their logs."""
    config = write_config(tmp_path / f"{name}.yaml", tiny_config_dict(
        str(out), model={"tiny_resolution": 16}, data={"resolution": 16}, prior={"enabled": False},
        training={"max_steps": STEPS, "strategy": "fsdp"}, validation={"fidelity": False},
        checkpointing={"every_n_steps": 1, "keep_last": 2}))
    port = free_port()
    logs = [tmp_path / f"{name}-rank{rank}.log" for rank in (0, 1)]
    ranks = [launch_rank(config, rank, port, {}, logs[rank]) for rank in (1, 0)]  # worker first
    codes = [process.wait(timeout=600) for process in ranks]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    return texts


def exported_unet(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_fsdp_two_ranks_checkpoint_sharded_resume_the_same_curve_and_export_a_whole_pipeline(tmp_path: Path) -> None:
    """One test, so that a parallel runner never splits it from the straight run it resumes."""
    straight = tmp_path / "straight"
    train_two_ranks(tmp_path, straight, "straight")
    sharded_checkpoints_are_committed_and_pruned_whole(straight)
    resuming_continues_the_same_curve_and_exports_a_whole_pipeline(straight, tmp_path / "resumed")


def sharded_checkpoints_are_committed_and_pruned_whole(straight: Path) -> None:
    assert (straight / "latest").read_text() == "checkpoints/step-00000003"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]  # keep_last=2
    manifest = json.loads((straight / "checkpoints/step-00000003/manifest.json").read_text())
    assert (manifest["layout"], manifest["world"], manifest["step"]) == ("dcp", 2, 3)
    shards = {name: meta["size"] for name, meta in manifest["files"].items() if name.endswith(".distcp")}
    assert sorted(shards) == ["dcp/__0_0.distcp", "dcp/__1_0.distcp"]
    # Each rank wrote its own part of the weights and optimizer state, not a copy of the whole.
    assert max(shards.values()) < 0.7 * sum(shards.values())
    digests = [json.loads((straight / "ranks" / f"{rank}.json").read_text())["weights_digest"] for rank in (0, 1)]
    assert digests[0] != digests[1], "each rank holds a different shard"


def resuming_continues_the_same_curve_and_exports_a_whole_pipeline(straight: Path, resumed: Path) -> None:
    from diffusers import DiffusionPipeline

    from dreambooth_trainer.tiny import tiny_pipeline

    # Stopped after step 2: its committed checkpoint, and a step-3 checkpoint whose writers died
    # before the commit (no manifest) that `latest` already names; the resume must not take it.
    shutil.copytree(straight / "checkpoints/step-00000002", resumed / "checkpoints/step-00000002")
    shutil.copytree(straight / "checkpoints/step-00000003", resumed / "checkpoints/step-00000003")
    (resumed / "checkpoints/step-00000003/manifest.json").unlink()
    (resumed / "latest").write_text("checkpoints/step-00000003")
    logs = train_two_ranks(resumed.parent, resumed, "resumed")
    starts = [json.loads(line) for line in logs[0].splitlines() if '"message": "starting"' in line]
    assert starts[0]["resume_from"] == "checkpoints/step-00000002"
    assert [line["step"] for line in metric_lines(resumed)] == [3]
    assert metric_lines(resumed)[0]["loss"] == pytest.approx(metric_lines(straight)[2]["loss"], rel=1e-5)

    gathered, again = exported_unet(straight), exported_unet(resumed)
    fresh = tiny_pipeline(0, 16).unet.state_dict()
    assert sorted(gathered) == sorted(fresh), "the export holds the whole UNet, gathered from both shards"
    assert any(not torch.equal(gathered[key], fresh[key]) for key in fresh), "training changed the weights"
    assert all(torch.allclose(gathered[key], again[key], atol=1e-6) for key in gathered)
    pipeline = DiffusionPipeline.from_pretrained(str(straight / "final"))
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert torch.equal(pipeline.unet.state_dict()["conv_in.weight"], gathered["conv_in.weight"])


def test_a_sharded_unet_with_lora_gathers_back_whole(tmp_path: Path) -> None:
    """The export's gather on a one-rank group in this process (the two-rank run above gathers
    a full fine-tune): LoRA adapters survive sharding and come back on a plain UNet."""
    import torch.distributed as dist
    from peft import LoraConfig
    from torch.distributed.device_mesh import init_device_mesh

    from dreambooth_trainer.fsdp import block_class_names, gathered_copy, shard_denoiser
    from dreambooth_trainer.tiny import tiny_pipeline

    def lora_unet() -> torch.nn.Module:
        unet = tiny_pipeline(0, 16).unet
        torch.manual_seed(1)
        unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
        return unet

    expected = lora_unet().state_dict()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sharded = lora_unet()
        shard_denoiser(sharded, init_device_mesh("cpu", (1,)), block_class_names(sharded, []), True)
        plain = gathered_copy(sharded, 0)
    finally:
        dist.destroy_process_group()
    assert type(plain).__name__ == "UNet2DConditionModel" and sorted(plain.peft_config) == ["default"]
    gathered = plain.state_dict()
    assert sorted(gathered) == sorted(expected) and any("lora_A" in key for key in expected)
    assert all(torch.equal(gathered[key], expected[key]) for key in expected)
