"""Run by the WebUI before it starts (not with --skip-install): install what LD-ZNet needs and the
host lacks. Packages the host owns (torch, gradio, transformers, OpenCV) are never installed,
upgraded or replaced here; a missing one is reported instead."""

import importlib.util

import launch

# (distribution, pip requirement): light pure-Python or wheel-only packages the core imports.
NEEDED = (("safetensors", "safetensors>=0.3"), ("ftfy", "ftfy>=6.0"), ("regex", "regex"), ("tqdm", "tqdm>=4.60"))
HOST_OWNED = (("torch", "torch"), ("transformers", "transformers"), ("gradio", "gradio"), ("cv2", "OpenCV (cv2)"))


def main() -> None:
    if getattr(launch.args, "skip_install", False):
        return
    for distribution, requirement in NEEDED:
        if not launch.is_installed(distribution):
            launch.run_pip(f'install "{requirement}"', f"LD-ZNet requirement: {requirement}")
    missing = [name for module, name in HOST_OWNED if importlib.util.find_spec(module) is None]
    if missing:
        print(f"LD-ZNet: {', '.join(missing)} missing from the WebUI's environment; LD-ZNet will not load "
              "until the WebUI's own installation provides them")


main()
