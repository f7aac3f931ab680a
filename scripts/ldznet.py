"""LD-ZNet for the AUTOMATIC1111 / Forge WebUI: text-prompted inpainting masks.

The host puts this extension's folder on sys.path while it loads this file; all code lives in
ldznet_ext.webui.
"""

from ldznet_ext.webui.register import register
from ldznet_ext.webui.script import LdznetScript  # noqa: F401  (the host finds Script subclasses here)

register()
