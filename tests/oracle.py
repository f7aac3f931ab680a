"""An oracle segmenter: given maps stand in for the model's (presence, instances and front-end tests)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.segmenter import Segmenter, _ImageState


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

    def _fill_cache(self, states: list[_ImageState], terms: Sequence[str]) -> None:
        """Nothing to compute."""

    def _upsample(self, state: _ImageState, terms: Sequence[str]) -> dict[str, Tensor]:
        shape = state.image.shape[:2]
        return {t: self.maps[t].clone() if t in self.maps else torch.zeros(shape) for t in terms}
