from pathlib import Path

import pytest

from dreambooth_trainer.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def minimal(**changes: dict) -> dict:
    data = {
        "data": {"instance_uri": "photos", "instance_prompt": "a photo of sks dog"},
        "prior": {"class_prompt": "a photo of dog"},
        "output": {"uri": "out"},
    }
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return data


def test_example_config_loads_with_overrides() -> None:
    cfg = load_config(REPO / "examples/train-tiny.yaml",
                      ["training.max_steps=6", "checkpointing.every_n_steps=3", "output.uri=/tmp/x"])
    assert (cfg.training.max_steps, cfg.checkpointing.every_n_steps, cfg.output.uri) == (6, 3, "/tmp/x")
    assert cfg.model.source == "tiny"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"training": {"max_stepz": 3}}, "training.max_stepz: unknown key"),
        ({"training": {"max_steps": "many"}}, "training.max_steps"),
        ({"training": {"max_steps": 0}}, "training.max_steps"),
        ({"checkpointing": {"every_n_steps": -1}}, "checkpointing.every_n_steps"),
        ({"data": {"resolution": 500}}, "data.resolution: must be a multiple of 8"),
        ({"training": {"mixed_precision": "fp8"}}, "training.mixed_precision"),
        ({"model": {"source": "hf:/broken"}}, "model.source"),
        ({"surprise": {"x": 1}}, "surprise: unknown key"),
        ({"training": {"lora": {"rank": 0}}}, "training.lora.rank"),
    ],
)
def test_bad_values_are_refused_with_the_dotted_key(changes: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_dict(minimal(**changes))


def test_instance_prompt_must_hold_the_token() -> None:
    with pytest.raises(ConfigError, match="data.instance_prompt .* must contain the token 'sks'"):
        config_from_dict(minimal(data={"instance_prompt": "a photo of a dog"}))


def test_class_prompt_must_not_hold_the_token() -> None:
    with pytest.raises(ConfigError, match="prior.class_prompt .* must not contain the token"):
        config_from_dict(minimal(prior={"class_prompt": "a sks dog"}))


def test_token_must_not_be_an_ordinary_word() -> None:
    with pytest.raises(ConfigError, match="data.token 'dog'"):
        config_from_dict(minimal(data={"token": "dog", "instance_prompt": "a photo of dog"}))


def test_token_is_matched_as_a_word_not_a_substring() -> None:
    with pytest.raises(ConfigError, match="must contain the token"):
        config_from_dict(minimal(data={"instance_prompt": "a photo of sksdog"}))


def test_model_sources_of_every_kind_are_accepted() -> None:
    for source in ["tiny", "hf://runwayml/stable-diffusion-v1-5", "hf://org/name@main", "s3://models/sd15", "/models/sd15"]:
        assert config_from_dict(minimal(model={"source": source})).model.source == source


def test_camel_case_spelling_validates_too() -> None:
    data = minimal()
    data["training"] = {"maxSteps": 7, "gradientAccumulationSteps": 2}
    cfg = config_from_dict(data)
    assert (cfg.training.max_steps, cfg.training.gradient_accumulation_steps) == (7, 2)


def test_override_must_be_dotted_key_equals_value(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {instance_uri: p, instance_prompt: a sks dog}\nprior: {class_prompt: a dog}\noutput: {uri: o}\n")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(path, ["training.max_steps"])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_cache_latents_needs_center_crop() -> None:
    with pytest.raises(ConfigError, match="training.cache_latents needs data.center_crop"):
        config_from_dict(minimal(training={"cache_latents": True}, data={"center_crop": False}))
