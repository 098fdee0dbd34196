"""Reading DreamboothJobs as the cluster stores them: leniently.

Admission (the CRD's schema and CEL rules, `parse_spec` for the client) is strict. A stored
object is another matter: it was accepted by the API server under some version of the CRD, which
may be newer than this code (a `helm upgrade` applies the new CRD first, and the old operator's
standby takes over during the rollout) or older (a rule tightened since). So:

- fields this version does not know are dropped and named, never an error (controller-runtime
  decodes the same way);
- a spec this version refuses for another reason is reported as such; the caller decides (the
  operator refuses a job it has not accepted yet, and holds one it has).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .sections import ConfigError
from .spec import DreamboothJobSpec, format_spec_error

# Unknown fields are dropped this many rounds at most (each round drops every one pydantic names).
_ROUNDS = 8


@dataclass(frozen=True)
class StoredSpec:
    spec: DreamboothJobSpec
    ignored: tuple[str, ...] = ()  # dotted paths (spec.runPolicy.newField) this version does not know


def read_stored_spec(data: dict[str, Any]) -> StoredSpec:
    """The spec of a stored DreamboothJob, ignoring fields a newer CRD added (named in `ignored`).

    ConfigError when it is refused for anything else (the message names the field)."""
    current = copy.deepcopy(data)
    ignored: list[str] = []
    for _ in range(_ROUNDS):
        try:
            return StoredSpec(DreamboothJobSpec.model_validate(current), tuple(ignored))
        except ValidationError as error:
            unknown = [tuple(item["loc"]) for item in error.errors() if item["type"] == "extra_forbidden"]
            if not unknown or not _drop_all(current, unknown, ignored):
                suffix = f" (ignored, unknown to this version: {', '.join(ignored)})" if ignored else ""
                raise ConfigError(format_spec_error(error) + suffix) from None
    raise ConfigError(f"spec: more unknown fields than {_ROUNDS} rounds could drop ({', '.join(ignored[:5])} ...)")


def _drop_all(data: Any, locations: list[tuple[Any, ...]], ignored: list[str]) -> bool:
    """Remove each location from `data`; True when anything was removed."""
    removed = False
    for location in locations:
        parent = data
        for part in location[:-1]:
            if isinstance(parent, dict) and part in parent:
                parent = parent[part]
            elif isinstance(parent, list) and isinstance(part, int) and part < len(parent):
                parent = parent[part]
            else:
                parent = None
                break
        if isinstance(parent, dict) and location[-1] in parent:
            del parent[location[-1]]
            ignored.append("spec." + ".".join(str(part) for part in location))
            removed = True
    return removed
