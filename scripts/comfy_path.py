"""Which ComfyUI tree and which frontend the scripts and the test suite use: one place for that choice.

* ``PROMPT_ANATOMY_COMFYUI=/path/to/ComfyUI`` — any ComfyUI source tree (the folder with ``main.py``). Unset: the
  pinned 0.3.75 that scripts/setup.sh extracts into ``.comfyui/``. The given tree is never written to: the pack
  is linked into a base directory of this checkout (``.comfybase/``, passed with ``--base-directory``) and the
  random test models are made there too, so the tree's own ``custom_nodes/`` and ``models/`` stay as they are.
* ``PROMPT_ANATOMY_FRONTEND_ROOT=/path/to/static`` — a frontend build (the ``static`` folder of a
  ``comfyui-frontend-package``), handed to ComfyUI as ``--front-end-root``. Unset: the frontend installed in the
  venv (the pinned one, or whatever the tree's requirements pinned).

Imported by file location or with ``scripts/`` on sys.path (never the checkout root: its ``nodes/`` would
shadow ComfyUI's). Only the standard library; nothing here compares version strings.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_ENV = "PROMPT_ANATOMY_COMFYUI"
FRONTEND_ENV = "PROMPT_ANATOMY_FRONTEND_ROOT"
PINNED_DIR = ROOT / ".comfyui"  # scripts/setup.sh extracts ComfyUI 0.3.75 here
EXTERNAL_BASE = ROOT / ".comfybase"  # base directory for a tree given by PROMPT_ANATOMY_COMFYUI
PACK_NAME = "comfyui-prompt-anatomy"


def comfy_dir() -> Path:
    """The ComfyUI source tree: $PROMPT_ANATOMY_COMFYUI, else the checkout's pinned .comfyui/."""
    given = os.environ.get(COMFY_ENV, "").strip()
    return Path(given).expanduser().resolve() if given else PINNED_DIR


def is_external() -> bool:
    """True when the tree comes from $PROMPT_ANATOMY_COMFYUI (a tree this project must not write into)."""
    return comfy_dir().resolve() != PINNED_DIR.resolve()


def base_dir() -> Path:
    """Where the server finds custom_nodes/ and models/: the pinned tree itself, or .comfybase/ for a given one."""
    return EXTERNAL_BASE if is_external() else PINNED_DIR


def models_dir() -> Path:
    """Where the random test checkpoints/LoRAs are made and looked for."""
    return base_dir() / "models"


def frontend_root() -> Path | None:
    """$PROMPT_ANATOMY_FRONTEND_ROOT (a frontend's static folder), or None for the frontend installed in the venv."""
    given = os.environ.get(FRONTEND_ENV, "").strip()
    return Path(given).expanduser().resolve() if given else None


def comfy_version(tree: Path | None = None) -> str:
    """The tree's version as written in its comfyui_version.py (for reports only, never for decisions)."""
    path = (tree or comfy_dir()) / "comfyui_version.py"
    try:
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", path.read_text())
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


def frontend_version(static: Path | None = None) -> str:
    """The frontend's version: from the dist-info next to a ``--target`` install of comfyui-frontend-package, or
    the venv's installed package; "unknown" if neither says (the page's __COMFYUI_FRONTEND_VERSION__ does)."""
    static = static if static is not None else frontend_root()
    if static is not None:
        for info in sorted(static.parent.parent.glob("comfyui_frontend_package-*.dist-info")):
            return info.name.removesuffix(".dist-info").split("-")[1]
        return "unknown"
    try:
        from importlib.metadata import version

        return version("comfyui-frontend-package")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def bootstrap_comfy() -> None:
    """Make ``import comfy`` work in a plain Python process (CPU, no CLI args of ours), from comfy_dir()."""
    tree = str(comfy_dir())
    if tree not in sys.path:
        sys.path.insert(0, tree)
    if "comfy.cli_args" in sys.modules:
        return
    saved = sys.argv
    sys.argv = [saved[0] if saved else "python", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses --cpu now)
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = saved


if __name__ == "__main__":  # used by the shell scripts: python scripts/comfy_path.py comfy_dir|base_dir|...
    what = sys.argv[1] if len(sys.argv) > 1 else "comfy_dir"
    value = {"comfy_dir": comfy_dir, "base_dir": base_dir, "models_dir": models_dir, "comfy_version": comfy_version,
             "frontend_version": frontend_version, "is_external": lambda: int(is_external())}[what]()
    print(value)
