"""The AUTOMATIC1111 / Forge WebUI extension: everything that touches the host's ``modules``.

The repository root is the extension folder (``scripts/ldznet.py`` is its entry point). Modules
here import the host lazily, inside functions, so the pure parts (``request``, ``api``'s request
checks) import and test without a WebUI. Nothing in the core ``ldznet_ext`` imports this package.

- ``request``: the WebUI side of a mask job (``ldznet_ext.job``): script args, infotext, ``mask:`` prompt lines
- ``host``: the host's loaded model as a Backbone (adapters in ``ldznet_ext.backbones``: ``a1111``,
  ``a1111_sdxl``, ``forge``, ``forge_sdxl``), its settings, locks and devices; ``mask_model``: the
  separate SD 1.x model a head runs on beside an SDXL or SD 2.x host
- ``engine``: heads cache + Segmenter per call
- ``script``: the always-visible img2img/txt2img script; ``detail_pass``: its per-instance inpainting;
  ``ui``, ``tab``, ``settings``, ``api``, ``xyz``; ``register``: the host callbacks that add them
- ``install_model``: ``ldznet webui install-model`` (an SD file + its YAML + offline CLIP files)
"""
