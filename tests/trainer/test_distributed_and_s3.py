"""Two-process DDP over gloo, and a whole run against MinIO (instance images, output, class cache)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_trainer.storage import open_storage

from .conftest import SUBJECT, metric_lines, tiny_config_dict, write_config
from tests.testbed.minio_server import free_port


def launch_rank(config: Path, rank: int, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    rank_env = {**os.environ, **env, "MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "NNODES": "2",
                "NODE_RANK": str(rank), "NPROC_PER_NODE": "1", "DREAMBOOTH_LOG_FORMAT": "json"}
    return subprocess.Popen([str(Path(sys.executable).with_name("dreambooth")), "train", str(config)],
                            env=rank_env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_two_ranks_over_gloo_stay_in_sync_and_split_class_generation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(
        # Two micro-batches a step: DDP's static graph cannot record a first step under no_sync.
        str(out), training={"max_steps": 4, "gradient_accumulation_steps": 2}, prior={"num_class_images": 4, "sample_batch_size": 1},
        checkpointing={"every_n_steps": 2}))
    port = free_port()
    env = {"DREAMBOOTH_CACHE": str(tmp_path / "cache")}
    ranks = [launch_rank(config, rank, port, env, tmp_path / f"rank{rank}.log") for rank in (1, 0)]  # worker first
    codes = [process.wait(timeout=600) for process in ranks]
    assert codes == [0, 0], "\n".join((tmp_path / f"rank{r}.log").read_text()[-2000:] for r in (0, 1))
    records = [json.loads((out / "ranks" / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["weights_digest"] == records[1]["weights_digest"], "DDP kept the weights identical"
    assert records[0]["step"] == records[1]["step"] == 4
    generated = [record["class_images_generated"] for record in records]
    assert generated == [2, 2], "class generation was split between the ranks"
    assert [line["step"] for line in metric_lines(out)] == [1, 2, 3, 4]
    assert (out / "final" / "model_index.json").exists()


def test_a_run_on_minio_streams_images_checkpoints_there_and_reuses_the_class_cache(s3_env, bucket: str, tmp_path: Path) -> None:
    from dreambooth_trainer.config import config_from_dict
    from dreambooth_trainer.train import run_training

    photos = open_storage(f"s3://{bucket}/subjects/toy")
    photos.upload_tree("", SUBJECT)
    first_uri = f"s3://{bucket}/jobs/default/first/uid-1"
    cfg = config_from_dict(tiny_config_dict(first_uri, instance=photos.uri, training={"max_steps": 2},
                                            prior={"num_class_images": 3}, checkpointing={"every_n_steps": 1}))
    assert run_training(cfg) == 0
    first = open_storage(first_uri)
    assert first.read_text("latest") == "checkpoints/step-00000002"
    assert first.exists("checkpoints/step-00000002/manifest.json") and first.exists("final/model_index.json")
    assert [line["step"] for line in map(json.loads, first.read_text("metrics.jsonl").splitlines()) if "loss" in line] == [1, 2]
    assert json.loads(first.read_text("ranks/0.json"))["class_images_generated"] == 3
    cache_keys = open_storage(f"s3://{bucket}/class-cache").list()
    assert sum(key.endswith(".png") for key in cache_keys) == 3 and any(key.endswith("complete.json") for key in cache_keys)

    second_uri = f"s3://{bucket}/jobs/default/second/uid-2"
    again = config_from_dict(tiny_config_dict(second_uri, instance=photos.uri, training={"max_steps": 1},
                                              prior={"num_class_images": 3}))
    assert run_training(again) == 0
    assert json.loads(open_storage(second_uri).read_text("ranks/0.json"))["class_images_generated"] == 0

    # The model exported to MinIO loads back through the s3:// model source.
    from dreambooth_trainer.models import load_pipeline
    from dreambooth_trainer.tiny import tiny_pipeline

    pipeline = load_pipeline(f"{first_uri}/final")
    fresh = tiny_pipeline(0, 32).unet.config  # the same architecture came back
    assert (pipeline.unet.config.sample_size, list(pipeline.unet.config.block_out_channels)) == (fresh.sample_size, list(fresh.block_out_channels))


def test_given_class_images_are_used_and_only_the_rest_generated(tmp_path: Path) -> None:
    from dreambooth_trainer.class_images import ensure_class_images
    from dreambooth_trainer.config import config_from_dict
    from dreambooth_trainer.tiny import tiny_pipeline

    given = tmp_path / "class"
    given.mkdir()
    for name in ("a.png", "b.png"):
        (given / name).write_bytes((SUBJECT / "toy-0.png").read_bytes())
    cfg = config_from_dict(tiny_config_dict(str(tmp_path / "out"), prior={"class_uri": str(given), "num_class_images": 3}))
    result = ensure_class_images(cfg, tiny_pipeline(0))
    assert (len(result.image_set.images), result.generated_here) == (3, 1)
    enough = config_from_dict(tiny_config_dict(str(tmp_path / "out"), prior={"class_uri": str(given), "num_class_images": 2}))
    assert ensure_class_images(enough, tiny_pipeline(0)).generated_here == 0
