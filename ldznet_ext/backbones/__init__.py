"""Backbones: what the segmenter runs on (our SD v1, a WebUI host's model), their model families and
the seeded posterior sampler they share. Nothing here imports the WebUI's ``modules``."""
