"""A faithful fake of the WebUI surface ldznet_ext.webui uses (A1111 v1.10.1 semantics), for tests
without a WebUI: put this folder on sys.path and ``import modules``."""
