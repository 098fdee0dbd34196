"""Subject fidelity over a whole tiny run on MinIO: scores at every checkpoint in metrics.jsonl with
their backbones, the best checkpoint chosen from them, exported to exports/best/ beside final/,
kept by pruning with keep_last 1, and report.html written self-contained.

The run (learning rate 0.1, 6 steps, a checkpoint every 2) is one where an earlier checkpoint
scores best on DINO: measured 2026-12-07, DINO 0.869 / 0.955 / 0.866 at steps 2 / 4 / 6.
About 60 s on two idle cores (four scorings of 27 images).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from dreambooth_trainer.checkpoint import checkpoint_key, complete_checkpoints, load_checkpoint_state
from dreambooth_trainer.storage import open_storage

from .conftest import SUBJECT, run_cli, tiny_config_dict, write_config

STEPS, EVERY = 6, 2
SCORES = ("fidelity/dino", "fidelity/clip_i", "fidelity/clip_t", "fidelity/prior_similarity", "fidelity/instance_distance")
UNET = "unet/diffusion_pytorch_model.safetensors"


def test_an_earlier_checkpoint_that_scores_best_is_exported_and_kept(s3_env, bucket: str) -> None:
    from dreambooth_trainer.config import config_from_dict
    from dreambooth_trainer.train import run_training

    photos = open_storage(f"s3://{bucket}/subjects/toy")
    photos.upload_tree("", SUBJECT)
    uri = f"s3://{bucket}/jobs/default/fidelity/uid-1"
    cfg = config_from_dict(tiny_config_dict(
        uri, instance=photos.uri, training={"max_steps": STEPS, "learning_rate": 0.1},
        checkpointing={"every_n_steps": EVERY, "keep_last": 1},
        validation={"steps": 2, "num_images": 1, "fidelity": {"prompts": []}}))  # [] : the paper's 25
    assert run_training(cfg) == 0
    out = open_storage(uri)

    # Scores before training and at every checkpoint, each beside the backbones it was measured with.
    lines = [json.loads(line) for line in out.read_text("metrics.jsonl").splitlines()]
    scored = {line["step"]: line for line in lines if "fidelity/dino" in line}
    assert sorted(scored) == [0, 2, 4, 6]
    for line in scored.values():
        assert all(isinstance(line[name], float) for name in SCORES), line
        assert set(line["fidelity/backbones"]) == {"dino", "clip"}
        assert all(b["name"] and b["revision"] and b["scale"] == 1.0 for b in line["fidelity/backbones"].values())

    # The best is the highest DINO among the checkpoints (step 0 is the base model), here an earlier one.
    best = max((2, 4, 6), key=lambda step: scored[step]["fidelity/dino"])
    assert best < STEPS, "this run's last checkpoint is not its best (see the module docstring)"
    document = json.loads(out.read_text("fidelity.json"))
    assert document["best"]["step"] == best and document["select"] == "highest dino"
    assert document["exports"] == {"final": "final", "best": "exports/best", "best_step": best, "served": "final"}
    assert [row["step"] for row in document["steps"] if row["kept"]] == [best, STEPS]

    # keep_last 1 kept the best beside the newest; the other went.
    assert complete_checkpoints(out) == [checkpoint_key(best), checkpoint_key(STEPS)]

    # exports/best/ is that checkpoint's weights, laid out as final/ (complete: its dreambooth.json is there).
    assert out.exists("exports/best/model_index.json") and out.exists("exports/best/dreambooth.json")
    exported, final = load(out.read_bytes(f"exports/best/{UNET}")), load(out.read_bytes(f"final/{UNET}"))
    assert exported_matches_checkpoint(out, "exports/best", best)
    assert any(not torch.equal(exported[name], final[name]) for name in exported), "best is not the final model"

    # report.html: self-contained (images inline, nothing fetched), the best checkpoint marked.
    report = out.read_text("report.html")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", report)
    assert report.count("data:image/png;base64,") >= 4 + 4, "the photos and the prompt grids are inline"
    assert f'class="ckpt best" data-step="{best}"' in report
    assert out.read_text("final/report.html") == report and out.exists("exports/best/report.html")
    assert io.BytesIO(out.read_bytes("samples/prompts-final.png")).read(8) == b"\x89PNG\r\n\x1a\n"


def exported_matches_checkpoint(out, prefix: str, step: int) -> bool:
    exported = load(out.read_bytes(f"{prefix}/{UNET}"))
    state = load_checkpoint_state(out, checkpoint_key(step), 0, 1)["state_dict"]
    trained = {name.split(".", 1)[1]: tensor for name, tensor in state.items() if name.startswith(("denoiser.", "unet."))}
    return bool(trained) and all(torch.equal(exported[name], tensor.to(exported[name].dtype)) for name, tensor in trained.items() if name in exported)


def test_a_served_step_is_exported_and_kept_without_any_scores(tmp_path: Path) -> None:
    from dreambooth_trainer.config import config_from_dict
    from dreambooth_trainer.train import run_training

    uri = str(tmp_path / "out")
    data = tiny_config_dict(uri, training={"max_steps": 4, "learning_rate": 0.1}, checkpointing={"every_n_steps": 2, "keep_last": 1},
                            validation={"fidelity": {"enabled": False}})
    data["output"]["serve"] = "step-2"
    cfg = config_from_dict(data)
    assert run_training(cfg) == 0
    out = open_storage(uri)
    assert complete_checkpoints(out) == [checkpoint_key(2), checkpoint_key(4)], "keep_last 1 kept the served step"
    assert out.exists("exports/step-00000002/dreambooth.json") and not out.exists("exports/best/model_index.json")
    assert exported_matches_checkpoint(out, "exports/step-00000002", 2)
    assert json.loads(out.read_text("fidelity.json"))["exports"]["served"] == "exports/step-00000002"

    # serving.checkpoint changed after success: `dreambooth export` (the operator's export Job) exports another kept step.
    from dreambooth_trainer.reexport import export_for_serving

    assert export_for_serving(cfg, "step-4") == out.describe("exports/step-00000004")
    assert exported_matches_checkpoint(out, "exports/step-00000004", 4)
    metadata = tmp_path / "out" / "exports" / "step-00000004" / "dreambooth.json"
    written = metadata.stat().st_mtime_ns
    assert export_for_serving(cfg, "step-4") == out.describe("exports/step-00000004") and metadata.stat().st_mtime_ns == written, "once"
    config = write_config(tmp_path / "config.yaml", data)
    for checkpoint, message in (("best", "serving.checkpoint best: this run scored no checkpoint"),
                                ("step-6", "checkpoints/step-00000006 is no longer stored (checkpointing.keepLast=1 pruned it; kept: step-2, step-4)"),
                                ("latest", "--checkpoint 'latest': expected best or step-N")):
        refused = run_cli(["export", str(config), "--checkpoint", checkpoint])
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]


def test_a_served_step_that_is_no_checkpoint_is_refused_before_training(tmp_path: Path) -> None:
    from dreambooth_trainer.config import config_from_dict
    from dreambooth_trainer.errors import UserInputError
    from dreambooth_trainer.train import run_training

    uri = str(tmp_path / "out")
    data = tiny_config_dict(uri, training={"max_steps": 4}, checkpointing={"every_n_steps": 2})
    data["output"]["serve"] = "step-3"
    cfg = config_from_dict(data)
    with pytest.raises(UserInputError, match="output.serve step-3"):
        run_training(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_eval_prints_the_papers_table_for_any_model(tmp_path: Path) -> None:
    from PIL import Image

    from dreambooth_trainer.fidelity import load_backbones, real_image_scores

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} {class} in the snow\na red {token} {class}\n")
    result = run_cli(["eval", "--model", "tiny", "--photos", str(SUBJECT), "--class-noun", "toy", "--dino", "tiny", "--clip", "tiny",
                      "--prompts", str(prompts), "--steps", "1", "--images-per-prompt", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    table = dict(re.findall(r"^(.+?)\s{2,}(-?\d\.\d{3}.*)$", result.stdout, re.M))
    assert table["DreamBooth (Stable Diffusion), paper"].split() == ["0.668", "0.803", "0.305"]
    dino, clip_i, clip_t = (float(x) for x in table["tiny"].split())
    assert all(-1.0 <= x <= 1.0 for x in (dino, clip_i, clip_t))
    real = real_image_scores(load_backbones({"dino": "tiny", "clip": "tiny"}),
                             [Image.open(p).convert("RGB") for p in sorted(SUBJECT.glob("*.png"))])
    assert table["Real images (these photos)"].split()[:2] == [f"{real['fidelity/dino']:.3f}", f"{real['fidelity/clip_i']:.3f}"]
    assert "2 prompts (the job's own) x 2 images, 4 photos" in result.stdout and "tiny-backbones-1" in result.stdout

    refused = run_cli(["eval", "--model", "tiny", "--photos", str(SUBJECT), "--class-noun", "toy"])
    assert refused.returncode == 2 and "--dino" in refused.stderr
