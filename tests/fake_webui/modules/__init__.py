"""Fake ``modules`` package of AUTOMATIC1111 v1.10.1: only what ldznet_ext.webui touches."""
