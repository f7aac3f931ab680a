"""modules.api: the host's HTTP API."""
