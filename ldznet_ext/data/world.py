"""Micro-world scenes as a data source (spec ``world:SPLIT:N`` or ``world:FILE.npz``)."""

from __future__ import annotations

from ..world.data import SceneSet
from ..world.scenes import VOCABULARY
from .examples import Example


class WorldSource:
    """Micro-world scenes from a pre-rendered ``SceneSet`` (masks are rebuilt from its label maps).

    ``domain`` is the one domain the set was painted in (None: by seed parity, the default).
    """

    def __init__(self, scenes: SceneSet, description: str, domain: str | None = None):
        self.scenes = scenes
        self.description = description
        self.domain = domain

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> Example:
        seed = int(self.scenes.seeds[index])
        domain = self.domain or VOCABULARY.domains[seed % 2]
        pairs = tuple((phrase, self.scenes.mask(index, phrase)) for phrase in self.scenes.phrases[index])
        return Example(f"world:{seed}:{domain}:{self.scenes.size}", self.scenes.images[index], pairs)
