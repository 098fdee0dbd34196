"""DDP never meets an unused parameter: every tensor that trains gets a gradient from the step, in
every family, with and without text-encoder training, full or LoRA (DDP without
find_unused_parameters fails on the next step otherwise: SDXL reads CLIP-L's penultimate layer, so
its last layer must not train). And a real two-rank gloo run of SDXL that accumulates and trains
both text encoders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth_trainer.config import config_from_dict

from .conftest import SUBJECT, tiny_config_dict, write_config
from .test_distributed_and_s3 import launch_rank
from tests.testbed.minio_server import free_port

SOURCES = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("train_text", [False, True], ids=["frozen-text", "trained-text"])
@pytest.mark.parametrize("family_name", list(SOURCES))
def test_every_trained_tensor_gets_a_gradient(family_name: str, train_text: bool, mode: str, tmp_path: Path) -> None:
    from dreambooth_trainer.data import DreamBoothBatches, load_instance_images
    from dreambooth_trainer.models import load_model
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.storage import open_storage

    cfg = config_from_dict(tiny_config_dict(str(tmp_path), model={"source": SOURCES[family_name]}, prior={"enabled": False},
                                            training={"train_text_encoder": train_text, "lora": {"enabled": mode == "lora", "rank": 2}}))
    family, pipeline = load_model(cfg.model.source)
    instance = load_instance_images(open_storage(str(SUBJECT)), cfg.data.instance_prompt, cfg.data.token, None)
    batches = DreamBoothBatches(instance, None, 32, True, False, 1, 0, 0, 1, 0, 1)
    module = DreamBoothModule(cfg, family, pipeline, None, batches.prompts)
    module.compute_loss(batches.batch_at(0)).backward()
    trained = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
    assert trained, "something trains"
    assert [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None] == []


def test_two_sdxl_ranks_accumulate_and_train_both_text_encoders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(
        str(out), model={"source": "tiny-sdxl"}, prior={"enabled": False},
        training={"max_steps": 2, "gradient_accumulation_steps": 2, "train_text_encoder": True, "lora": {"enabled": True, "rank": 2}},
        validation={"fidelity": False}))
    port = free_port()
    ranks = [launch_rank(config, rank, port, {"DREAMBOOTH_CACHE": str(tmp_path / "cache")}, tmp_path / f"rank{rank}.log")
             for rank in (1, 0)]
    codes = [process.wait(timeout=600) for process in ranks]
    assert codes == [0, 0], "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
    records = [json.loads((out / "ranks" / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["step"] == records[1]["step"] == 2
    assert records[0]["weights_digest"] == records[1]["weights_digest"], "DDP kept the weights identical"
