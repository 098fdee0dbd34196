"""training.strategy=fsdp with two real ranks over gloo on CPU: the UNet is sharded, checkpoints
are sharded (one torch.distributed.checkpoint file per rank) and committed as any checkpoint,
a resume continues the same curve, and the export is a whole diffusers folder."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import traceback
from pathlib import Path

import pytest
import torch

from .conftest import metric_lines, tiny_config_dict, write_config
from tests.testbed.minio_server import free_port

STEPS = 3


def run_rank(config: Path, rank: int, port: int, log: Path) -> None:
    """One rank, in a child forked from this process: what `dreambooth train` runs in a pod, without
    paying the imports again (two runs of two ranks would spend most of their time there)."""
    stream = open(log, "w", buffering=1)
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    os.environ.update({"MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "NNODES": "2", "NODE_RANK": str(rank),
                       "NPROC_PER_NODE": "1", "DREAMBOOTH_LOG_FORMAT": "json"})
    code = 1
    try:
        from dreambooth_trainer.config import load_config
        from dreambooth_trainer.train import run_training

        code = run_training(load_config(config))
    except BaseException:
        traceback.print_exc()
    finally:
        stream.flush()
        os._exit(code)


def preload_training_modules() -> None:
    """Import here, once, what a run imports, so that the forked ranks inherit it."""
    import diffusers.optimization  # noqa: F401
    import pytorch_lightning.strategies  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    from dreambooth_trainer import callbacks, class_images, data, export, fsdp, models, module, tiny, train, validation  # noqa: F401


def train_two_ranks(tmp_path: Path, out: Path, name: str) -> list[str]:
    """Both ranks of a run with training.strategy=fsdp; returns their logs."""
    config = write_config(tmp_path / f"{name}.yaml", tiny_config_dict(
        str(out), model={"tiny_resolution": 16}, data={"resolution": 16}, prior={"enabled": False},
        training={"max_steps": STEPS, "strategy": "fsdp"}, validation={"fidelity": False},
        checkpointing={"every_n_steps": 1, "keep_last": 2}))
    port = free_port()
    logs = [tmp_path / f"{name}-rank{rank}.log" for rank in (0, 1)]
    preload_training_modules()
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=run_rank, args=(config, rank, port, logs[rank])) for rank in (1, 0)]  # worker first
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
        if process.exitcode is None:
            process.kill()
    texts = [log.read_text() for log in logs]
    assert [process.exitcode for process in ranks] == [0, 0], "\n".join(text[-3000:] for text in texts)
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


def gather_lora_unet(rank: int, port: int, folder: Path) -> None:
    """A rank that shards a tiny UNet with LoRA adapters over two ranks, then gathers it back."""
    import torch.distributed as dist
    from peft import LoraConfig
    from torch.distributed.device_mesh import init_device_mesh

    from dreambooth_trainer.fsdp import block_class_names, gathered_copy, shard_denoiser
    from dreambooth_trainer.tiny import tiny_pipeline

    code = 1
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        unet = tiny_pipeline(0, 16).unet
        torch.manual_seed(1)
        unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
        shard_denoiser(unet, init_device_mesh("cpu", (2,)), block_class_names(unet, []), True)
        plain = gathered_copy(unet, rank)
        if rank == 0:
            torch.save({"type": type(plain).__name__, "state": plain.state_dict(), "peft": sorted(plain.peft_config)}, folder / "gathered.pt")
        dist.destroy_process_group()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def test_a_sharded_unet_with_lora_gathers_back_whole_on_rank_0(tmp_path: Path) -> None:
    from peft import LoraConfig

    from dreambooth_trainer.tiny import tiny_pipeline

    preload_training_modules()
    port, fork = free_port(), multiprocessing.get_context("fork")
    ranks = [fork.Process(target=gather_lora_unet, args=(rank, port, tmp_path)) for rank in (1, 0)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [process.exitcode for process in ranks] == [0, 0]
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=False)
    original = tiny_pipeline(0, 16).unet
    torch.manual_seed(1)
    original.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    expected = original.state_dict()
    assert (gathered["type"], gathered["peft"]) == ("UNet2DConditionModel", ["default"])
    assert sorted(gathered["state"]) == sorted(expected) and any("lora_A" in key for key in expected)
    assert all(torch.equal(gathered["state"][key], expected[key]) for key in expected)
