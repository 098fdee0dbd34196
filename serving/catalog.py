"""Every model name a server answers to: its base model and its adapters (fixed or registered)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .batcher import BASE
from .registry import RegistryChange, RegistryFile, registered_seconds


class UnknownModel(LookupError):
    """A request named a model this server does not serve."""

    def __init__(self, model: str, known: list[str]):
        self.model = model
        shown = ", ".join(known[:10]) + (", …" if len(known) > 10 else "")
        super().__init__(f"the model {model!r} does not exist on this server; it serves: {shown} (GET /v1/models)")


@dataclass(frozen=True)
class ModelCard:
    id: str
    created: int
    owned_by: str


class ModelCatalog:
    def __init__(self, base: str, fixed: dict[str, str], registry: Path | None = None):
        clash = base if base in fixed else None
        if clash:
            raise ValueError(f"--adapter {clash}: the base model already has that name (--model-name)")
        self.base = base
        self.fixed = dict(fixed)
        self.file = RegistryFile(registry) if registry else None
        self.started = int(time.time())

    def refresh(self) -> RegistryChange:
        if self.file is None:
            return RegistryChange()
        return self.file.refresh()

    def registered(self) -> dict[str, str]:
        """Registered adapters by name (a fixed adapter or the base model wins a name clash)."""
        entries = self.file.adapters() if self.file else {}
        return {name: entry.uri for name, entry in entries.items() if name != self.base and name not in self.fixed}

    def uri(self, model: str) -> str | None:
        return self.fixed.get(model) or self.registered().get(model)

    def uris(self) -> set[str]:
        """The weights some name points at now (fixed or registered)."""
        return set(self.fixed.values()) | set(self.registered().values())

    def resolve(self, model: str | None) -> str:
        """The adapter name to run for `model` (BASE for the base model); UnknownModel otherwise.
        A name not known yet makes the registry be read again first (it may have just arrived)."""
        if model is None or model == self.base:
            return BASE
        if self.uri(model) is None:
            self.refresh()
        if self.uri(model) is None:
            raise UnknownModel(model, [card.id for card in self.cards()])
        return model

    def cards(self) -> list[ModelCard]:
        cards = [ModelCard(self.base, self.started, "dreambooth")]
        cards += [ModelCard(name, self.started, "dreambooth") for name in sorted(self.fixed)]
        entries = self.file.adapters() if self.file else {}
        cards += [ModelCard(name, registered_seconds(entries[name]) or self.started, "dreambooth") for name in sorted(self.registered())]
        return cards
