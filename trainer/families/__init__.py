"""Model families: how SD1/SD2, SDXL, SD3 and Flux differ, behind one small interface.

`family_for(source, folder)` picks the family from the built-in tiny name or the model folder's
`model_index.json` (`_class_name`); `resolve_family(choice, detected)` applies `model.family`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserInputError
from .base import Components, FlowSettings, ModelFamily, Noised, StepMeta
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}
TINY_SOURCES = {family.tiny_source: family for family in FAMILIES.values()}

__all__ = ["FAMILIES", "TINY_SOURCES", "Components", "FlowSettings", "ModelFamily", "Noised", "StepMeta",
           "family_for", "family_of_pipeline", "family_from_class_name", "resolve_family"]


def family_from_class_name(class_name: str) -> ModelFamily:
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    known = ", ".join(name for family in FAMILIES.values() for name in family.pipeline_classes)
    raise UserInputError(f"model pipeline {class_name!r} is not a supported family (known: {known})")


def family_of_folder(folder: Path) -> ModelFamily:
    index = folder / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as error:
        raise UserInputError(f"{index} is not readable JSON ({error})") from None
    return family_from_class_name(class_name)


def family_of_pipeline(pipeline: object) -> ModelFamily:
    return family_from_class_name(type(pipeline).__name__)


def resolve_family(choice: str, detected: ModelFamily, source: str) -> ModelFamily:
    """`model.family`: auto takes the detected family; an explicit one must match the model."""
    if choice in ("auto", detected.name):
        return detected
    raise UserInputError(f"model.family is {choice!r} but model {source} is a {detected.name!r} model "
                         f"({detected.pipeline_classes[0]}); set model.family to {detected.name} or auto")
