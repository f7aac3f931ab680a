"""Hook the extension into the host: settings, callbacks, tab, API routes (called by scripts/ldznet.py).

The host clears all callbacks when it reloads scripts (Reload UI) and runs scripts/ldznet.py again,
so registering on every load is right (adding an option again replaces it, keeping its value); the
cached head and the separate SD 1.x mask model are unloaded on unload.
"""

from __future__ import annotations

import os
import sys

from . import api, host, script, settings, tab, ui, xyz


def guard_generation(payload, is_img2img: bool) -> None:
    """The API guard's check of a generation request (ApiError): our script args and the prompt's mask
    line, then what its mask needs, judged with the LD-ZNet settings the request overrides for its job
    and, when it names a checkpoint, without judging the model loaded now."""
    overrides, model_may_change = api.setting_overrides(payload, settings.checked), api.names_a_checkpoint(payload)
    api.check_generation(payload, is_img2img, lambda job: host.check_ready(job, overrides, model_may_change))


def guard_options(payload) -> None:
    """The API guard's check of POST /sdapi/v1/options (ApiError 422 for a bad LD-ZNet setting)."""
    api.check_options(payload, settings.check_options)


def add_routes(demo, app) -> None:
    """on_app_started: the ApiGuard middleware (checks of our generation args and of LD-ZNet settings
    sent to /sdapi/v1/options) and, with --api/--nowebui, the /ldznet/v1 routes (mask, version, schema)."""
    from modules import shared
    from starlette.middleware import Middleware

    cmd_opts = shared.cmd_opts
    guard = Middleware(api.ApiGuard, check_generation=guard_generation, check_options=guard_options,
                       credentials=api.parse_credentials(getattr(cmd_opts, "api_auth", None)))
    # Ours outermost, and the rebuilt stack swapped in by one assignment: the server already answers
    # (a client polling for readiness), and a request arriving between resetting the stack to None and
    # add_middleware rebuilt it, so add_middleware raised and neither the guard nor the routes existed.
    app.user_middleware.insert(0, guard)
    app.middleware_stack = app.build_middleware_stack()
    if not (getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False)):
        return
    from fastapi import Body
    from fastapi.responses import JSONResponse

    def compute(image, request, brush):
        with host.gpu_job("ldznet api"):
            return host.compute(image, request, brush)

    def mask(payload: dict = Body(...)):
        try:
            return api.mask_response(payload, compute, host.check_ready)
        except api.ApiError as error:
            return JSONResponse(status_code=error.status, content=error.content())

    def version():
        name = "forge" if host.is_forge() else "a1111"
        return api.version_response(name, host.engine().list_heads(), host.engine_options().head)

    app.add_api_route(api.MASK_ROUTE, mask, methods=["POST"])
    app.add_api_route(api.VERSION_ROUTE, version, methods=["GET"])
    app.add_api_route(api.SCHEMA_ROUTE, api.schema_response, methods=["GET"])


def install_problem(folder: str) -> str | None:
    """Why the host would not apply metadata.ini's script order to the extension in ``folder`` (as the
    host found it), or None: the order's section names the folder ``ldznet``, and the host names a
    linked extension's callbacks ``base/...`` (modules/script_callbacks.add_callback resolves links)."""
    if os.path.basename(folder).lower() != "ldznet":
        return f"its folder is named {os.path.basename(folder)!r}, not 'ldznet'"
    if os.path.realpath(folder) != os.path.abspath(folder):
        return "it is installed through a link"
    return None


def register() -> None:
    """Register every callback of the extension with ``modules.script_callbacks``."""
    from modules import script_callbacks

    problem = install_problem(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if problem:
        print(f"LD-ZNet: {problem}, so the host does not run its mask step before Soft Inpainting's and "
              "ControlNet's, and they miss a mask typed as text; install it as extensions/ldznet", file=sys.stderr)

    # Now rather than on_ui_settings: with --nowebui the host builds its API's options model (the
    # keys GET /sdapi/v1/options returns) from the options it knows before those callbacks run.
    settings.add_settings()
    script_callbacks.on_after_component(ui.remember_component)
    script_callbacks.on_ui_tabs(tab.build_tab)
    script_callbacks.on_before_ui(xyz.add_axes)
    script_callbacks.on_app_started(add_routes)
    script_callbacks.on_model_loaded(host.model_loaded)
    script_callbacks.on_script_unloaded(host.unload)
    script_callbacks.on_image_saved(script.save_pending_mask)
