"""Backbones: what the segmenter runs on (our SD v1, a WebUI host's model), their model families and
the seeded posterior sampler they share. The A1111 and Forge adapters take the host's model as an
argument; nothing here imports the WebUI's ``modules`` (``webui/host.py`` does that)."""
