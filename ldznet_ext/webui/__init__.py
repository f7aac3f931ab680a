"""The AUTOMATIC1111 / Forge WebUI extension: everything that touches the host's ``modules``.

The repository root is the extension folder (``scripts/ldznet.py`` is its entry point). Modules
here import the host lazily, inside functions, so the pure parts (``request``, ``combine``) import
and test without a WebUI. Nothing in the core ``ldznet_ext`` imports this package.

- ``request``: the WebUI side of a mask job (``ldznet_ext.job``): script args, infotext, ``mask:`` prompt lines
- ``a1111`` / ``forge``: Backbone adapters over the host's loaded model; ``host`` picks one
- ``engine``: heads cache + Segmenter per call, under the host's locks and devices
- ``script``: the always-visible img2img/txt2img script; ``ui``, ``tab``, ``settings``, ``api``
- ``install_model``: ``ldznet webui install-model`` (an SD file + its YAML + offline CLIP files)
"""
