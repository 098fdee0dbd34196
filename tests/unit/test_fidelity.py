"""Subject-fidelity scores on the built-in random backbones, the prompt set, and the choice of the
best checkpoint (validation.fidelity.select)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_trainer.config import ConfigError, config_from_dict
from dreambooth_trainer.errors import UserInputError
from dreambooth_trainer.fidelity import (
    Backbones, backbone_sources, load_backbones, prompt_set, real_image_scores, subject_scores, tiny_clip, tiny_dino,
)
from dreambooth_trainer.selection import FidelityLedger, Rule, best_checkpoint, resolve_rule

REPO = Path(__file__).resolve().parents[2]
SUBJECT = REPO / "examples" / "tiny-subject"


def photos() -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(SUBJECT.glob("*.png"))]


def noise(count: int, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def backbones() -> Backbones:
    return load_backbones({"dino": "tiny", "clip": "tiny"})


def test_an_image_scored_against_itself_is_1_on_dino_and_clip_i(backbones: Backbones) -> None:
    photo = photos()[:1]
    scores = subject_scores(backbones, photo, ["a toy"], photo, [])
    assert scores["fidelity/dino"] == pytest.approx(1.0, abs=1e-5)
    assert scores["fidelity/clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scores["fidelity/clip_t"] <= 1.0


def test_the_photos_score_closer_to_themselves_than_noise_does(backbones: Backbones) -> None:
    subject = photos()
    copy = subject_scores(backbones, subject, ["a toy"] * len(subject), subject, noise(4))
    other = subject_scores(backbones, noise(len(subject)), ["a toy"] * len(subject), subject, subject)
    assert copy["fidelity/dino"] > other["fidelity/dino"] and copy["fidelity/clip_i"] > other["fidelity/clip_i"]
    # Prior drift: class images that are the subject itself sit closer to it than noise does.
    assert other["fidelity/prior_similarity"] > copy["fidelity/prior_similarity"]
    assert copy["fidelity/prior_diversity"] > other["fidelity/prior_diversity"], "noise varies more than four photos of one toy"


def test_the_real_images_row_is_the_photos_against_each_other(backbones: Backbones) -> None:
    subject = photos()
    row = real_image_scores(backbones, subject)
    assert 0.0 < row["fidelity/dino"] < 1.0 and 0.0 < row["fidelity/clip_i"] < 1.0


def test_the_random_backbones_are_the_same_every_time_and_say_what_they_are() -> None:
    first, again = tiny_dino(), tiny_dino()
    image = photos()[:1]
    assert np.allclose(first.embed_images(image), again.embed_images(image))
    assert not np.allclose(tiny_clip().embed_images(image)[:, :8], first.embed_images(image)[:, :8])
    infos = Backbones(first, tiny_clip()).infos()
    assert set(infos) == {"dino", "clip"}
    assert infos["dino"]["revision"] == infos["clip"]["revision"] == "tiny-backbones-1" and infos["dino"]["scale"] == 1.0


def test_a_folder_without_a_model_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"validation.fidelity.models.dino .*no config.json"):
        load_backbones({"dino": str(tmp_path)})


def test_backbones_default_to_the_random_ones_for_the_tiny_models_only() -> None:
    fidelity = config_from_dict(minimal()).validation.fidelity
    assert backbone_sources(fidelity, None, tiny_base=True) == {"dino": "tiny", "clip": "tiny"}
    assert backbone_sources(fidelity, None, tiny_base=False) == {}
    assert backbone_sources(fidelity, "hf://openai/clip-vit-base-patch32", tiny_base=False) == {"clip": "hf://openai/clip-vit-base-patch32"}


def test_the_default_prompt_set_is_the_papers_25_with_the_class_noun() -> None:
    objects = prompt_set([], "sks", "toy")
    assert len(objects.prompts) == 25 and objects.prompts[0] == "a sks toy in the jungle"
    assert objects.texts[0] == "a toy in the jungle", "CLIP-T reads the prompt without the identifier"
    assert "object" in objects.source
    live = prompt_set([], "sks", "dog")
    assert len(live.prompts) == 25 and "live-subject" in live.source and live.prompts != objects.prompts
    assert all("sks dog" in prompt for prompt in live.prompts)
    own = prompt_set(["{token} {class} on the moon"], "sks", "dog")
    assert own.prompts == ["sks dog on the moon"] and own.texts == ["dog on the moon"]


@pytest.mark.parametrize(("templates", "noun", "named"), [
    ([], None, "class noun"),
    (["a {thing} {class}"], "dog", "validation.fidelity.prompts"),
    (["a {class}"], None, "validation.fidelity.prompts"),
])
def test_bad_prompt_sets_are_refused_by_name(templates: list[str], noun: str | None, named: str) -> None:
    with pytest.raises(UserInputError, match=named):
        prompt_set(templates, "sks", noun)


# -- selection ---------------------------------------------------------------------------------

# A run whose last checkpoint copies the photos: DINO and CLIP-I highest, the prompts ignored (CLIP-T falls).
RUN = [
    {"step": 0, "fidelity/dino": 0.30, "fidelity/clip_i": 0.50, "fidelity/clip_t": 0.32, "fidelity/instance_distance": 0.40},
    {"step": 100, "fidelity/dino": 0.60, "fidelity/clip_i": 0.78, "fidelity/clip_t": 0.31, "fidelity/instance_distance": 0.20},
    {"step": 200, "fidelity/dino": 0.66, "fidelity/clip_i": 0.80, "fidelity/clip_t": 0.29, "fidelity/instance_distance": 0.15},
    {"step": 300, "fidelity/dino": 0.90, "fidelity/clip_i": 0.95, "fidelity/clip_t": 0.18, "fidelity/instance_distance": 0.05},
]


def test_a_copy_of_the_photos_wins_on_dino_alone_but_not_under_a_clip_t_floor() -> None:
    assert best_checkpoint(RUN, Rule("dino")).step == 300
    floored = best_checkpoint(RUN, Rule("dino", min_clip_t=0.25))
    assert floored.step == 200 and floored.floor_met


def test_pixel_distance_is_lower_is_better_and_the_base_model_is_never_a_checkpoint() -> None:
    assert best_checkpoint(RUN, Rule("pixel")).step == 300
    assert best_checkpoint(RUN, Rule("clip-t")).step == 100, "step 0 scores higher but is the base model"


def test_when_no_checkpoint_meets_the_floor_the_closest_is_chosen_and_marked() -> None:
    choice = best_checkpoint(RUN, Rule("dino", min_clip_t=0.5))
    assert choice.step == 100 and not choice.floor_met


def test_ties_go_to_the_earlier_checkpoint_and_candidates_limit_the_choice() -> None:
    rows = [{"step": 2, "fidelity/dino": 0.5}, {"step": 4, "fidelity/dino": 0.5}, {"step": 6, "fidelity/dino": 0.4}]
    assert best_checkpoint(rows, Rule("dino")).step == 2
    assert best_checkpoint(rows, Rule("dino"), candidates={4, 6}).step == 4


def test_auto_picks_what_the_backbones_allow_and_a_missing_backbone_is_refused_by_name() -> None:
    select = config_from_dict(minimal()).validation.fidelity.select
    assert resolve_rule(select, has_dino=True, has_clip=True).score == "dino"
    assert resolve_rule(select, has_dino=False, has_clip=True).score == "clip-i"
    assert resolve_rule(select, has_dino=False, has_clip=False).score == "pixel"
    clip_t = config_from_dict(minimal(validation={"fidelity": {"select": {"score": "clip-t"}}})).validation.fidelity.select
    with pytest.raises(UserInputError, match="validation.fidelity.models.clip"):
        resolve_rule(clip_t, has_dino=True, has_clip=False)


def test_the_ledger_protects_the_best_checkpoint_and_summarises_for_status() -> None:
    ledger = FidelityLedger(Rule("dino", 0.25), checkpoint_every=100, max_steps=300,
                            backbones={"dino": {"name": "tiny-dino", "revision": "r1", "scale": 1.0}})
    for row in RUN:
        ledger.add(row["step"], {k: v for k, v in row.items() if k != "step"})
    assert ledger.protected_steps() == {200}
    summary = ledger.summary()
    assert summary["best"]["step"] == 200 and summary["latest"]["step"] == 300
    assert summary["summary"] == "dino 0.660 @200" and summary["backbones"]["dino"] == "tiny-dino@r1 (scale 1)"
    assert summary["best"]["clipT"] == 0.29 and summary["select"] == "highest dino, CLIP-T >= 0.25"


# -- the config ----------------------------------------------------------------------------------

def minimal(**sections: dict) -> dict:
    base = {"model": {"source": "tiny"},
            "data": {"instance_uri": "/data", "instance_prompt": "a photo of sks toy"},
            "prior": {"class_prompt": "a photo of toy"},
            "output": {"uri": "/out"}}
    return {**base, **sections}


def test_the_older_boolean_form_reads_as_enabled() -> None:
    assert config_from_dict(minimal(validation={"fidelity": False})).validation.fidelity.enabled is False
    assert config_from_dict(minimal()).validation.fidelity.enabled is True


@pytest.mark.parametrize(("fidelity", "named"), [
    ({"models": {"dino": "hf:/facebook/dino-vits16"}}, "validation.fidelity.models.dino"),
    ({"select": {"score": "lpips"}}, "validation.fidelity.select.score"),
    ({"select": {"min_clip_t": 2}}, "validation.fidelity.select.min_clip_t"),
    ({"images_per_prompt": 0}, "validation.fidelity.images_per_prompt"),
])
def test_bad_fidelity_settings_are_refused_naming_the_field(fidelity: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_dict(minimal(validation={"fidelity": fidelity}))


def test_the_trainers_summary_becomes_status_fidelity_and_fits_the_crd() -> None:
    from dreambooth_api.v1alpha1.spec import DreamboothJobStatus
    from dreambooth_operator.conditions import fidelity_status

    ledger = FidelityLedger(Rule("dino", 0.25), checkpoint_every=100, max_steps=300,
                            backbones={"dino": {"name": "tiny-dino", "revision": "r1", "scale": 1.0}})
    for row in RUN:
        ledger.add(row["step"], {k: v for k, v in row.items() if k != "step"})
    status = fidelity_status({"step": 300, "fidelity": ledger.summary()}, "exports/best")
    assert status["summary"] == "dino 0.660 @200" and status["served"] == "exports/best"
    assert fidelity_status({"step": 3}, "final") is None
    model = DreamboothJobStatus.model_validate({"fidelity": status})
    # Nothing of it is dropped: the model (the CRD's schema) knows every key the operator writes.
    assert model.model_dump(mode="json", by_alias=True, exclude_none=True)["fidelity"] == status


def test_jobs_checkpoints_prints_each_scored_step_with_the_best_and_the_pruned_marked() -> None:
    from dreambooth_client.commands import checkpoint_rows

    document = {"select": "highest dino", "best": {"step": 200}, "exports": {"served": "exports/best"},
                "backbones": {"dino": {"name": "tiny-dino", "revision": "r1", "scale": 1.0}},
                "steps": [{**row, "kept": row["step"] in (200, 300)} for row in RUN]}
    lines = checkpoint_rows(document)
    assert lines[0].split() == ["STEP", "DINO", "CLIP-I", "CLIP-T", "PIXEL", "PRIOR-SIM", "NOTE"]
    by_step = {line.split()[0]: line for line in lines[1:5]}
    assert by_step["200"].split()[1] == "0.6600" and by_step["200"].endswith("best")
    assert by_step["100"].endswith("pruned") and "base model" in by_step["0"]
    assert "served: exports/best" in lines[5] and lines[6] == "dino: tiny-dino@r1 (scale 1)"


def test_without_prior_preservation_the_class_noun_is_the_instance_prompts_last_word() -> None:
    from dreambooth_trainer.fidelity import class_noun_of

    assert class_noun_of(None, None, "a photo of sks toy", "sks") == "toy"
    assert class_noun_of("a photo of a dog", None, "a photo of sks toy", "sks") == "dog", "the class prompt comes first"
    assert class_noun_of(None, "cat", "a photo of sks toy", "sks") == "cat", "a named noun wins"
    assert class_noun_of(None, None, "sks", "sks") is None, "nothing after the token: no noun (the paper's prompts are refused by name)"
