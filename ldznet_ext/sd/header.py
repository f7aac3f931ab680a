"""A checkpoint file's model family from its safetensors header alone: names and shapes, no tensor data.

Cheap enough to run over every checkpoint a WebUI lists. Pickle-based files (.ckpt) cannot be read
without unpickling them, so they are reported as :data:`PICKLE_FAMILY` and left out.
"""

from __future__ import annotations

import os

from ..backbones.family import CheckpointInfo, classify
from ..checkpoint_io import read_metadata, read_tensor_shapes

PICKLE_FAMILY = "unknown (pickle)"


def classify_file(path: str | os.PathLike) -> CheckpointInfo:
    """The family of the checkpoint at ``path`` (see ``backbones.family.classify``) from its header;
    ``PICKLE_FAMILY`` with a problem for a pickle-based file. CheckpointError for an unreadable header."""
    shapes = read_tensor_shapes(path)
    if shapes is None:
        return CheckpointInfo(PICKLE_FAMILY, "a pickle-based file; its family is not read without loading it "
                              "(convert it to .safetensors to have it listed)")
    return classify(shapes, read_metadata(path))
