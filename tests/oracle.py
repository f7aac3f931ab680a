"""An oracle segmenter: given maps stand in for the model's (presence, instances and front-end tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.segmenter import Segmenter, _ImageState, _KnownTerms


class OracleSegmenter(Segmenter):
    """``predict`` on ``maps`` (term -> float [H, W]) as if the model had made them; a term without a
    map gets zeros. ``zero_shot`` picks the presence rule."""

    def __init__(self, maps: dict[str, Tensor], zero_shot: bool = False):
        super().__init__(backbone=None)
        self.maps = maps
        self.oracle_zero_shot = zero_shot
        height, width = next(iter(maps.values())).shape
        self._image = _ImageState(np.zeros((height, width, 3), np.uint8), torch.zeros(1), None, (width, height),
                                  (0, 0, width, height))

    @property
    def zero_shot(self) -> bool:
        return self.oracle_zero_shot

    def predict_images(self, images: Sequence, expression, options=MaskOptions(), max_pixels: int = 0) -> list:
        """The oracle's prediction once per image (the images themselves are not read)."""
        return [self.predict(expression, options) for _ in images]

    def _compute(self, states: list[_ImageState], todo: list[str], known: list[_KnownTerms]) -> None:
        """The oracle's maps (zeros for a term without one) stand in for the model's, at the image's size."""
        for state, terms in zip(states, known):
            for term in todo:
                terms.maps[term] = self.maps[term] if term in self.maps else torch.zeros(state.image.shape[:2])

    def _upsample(self, state: _ImageState, maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: m.clone() for t, m in maps.items()}
