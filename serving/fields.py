"""Field types the HTTP bodies share: JSON integers with bounds, seeds, sizes, steps."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from .settings import MAX_SEED, MAX_SIDE


def integral_number(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; strings and booleans still fail the strict check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An int with bounds; the bounds come before the validator so the JSON schema keeps them."""
    return Annotated[int, Field(**bounds), BeforeValidator(integral_number)]


Seed = json_int(ge=0, le=MAX_SEED)
Side = json_int(ge=8, le=MAX_SIDE, multiple_of=8)
StepCount = json_int(ge=1, le=150)
GuidanceScale = Annotated[float, Field(ge=0, le=30)]
