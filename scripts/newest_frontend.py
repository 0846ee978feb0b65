"""Install the newest comfyui-frontend-package from PyPI into its own folder and print its static folder.

    .venv/bin/python scripts/newest_frontend.py        # -> .../.cache/frontend-<version>/comfyui_frontend_package/static

The browser tier runs against it through ComfyUI's --front-end-root ($PROMPT_ANATOMY_FRONTEND_ROOT, see
scripts/comfy_path.py); the pinned frontend stays in the venv. "Newest" is resolved with pip each time
(`pip index versions`), installed once per version with `pip install --no-deps --target` (cached in
.cache/frontend-<version>/). Offline, or when pip cannot answer, the newest version already in .cache/ is used;
with none cached the script exits 1. $PROMPT_ANATOMY_NEWEST_FRONTEND=<version> pins the choice instead.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
PACKAGE = "comfyui-frontend-package"
PIN_ENV = "PROMPT_ANATOMY_NEWEST_FRONTEND"


def log(msg: str) -> None:
    print(f"[newest_frontend] {msg}", file=sys.stderr, flush=True)


def _key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.+-]", version))


def static_dir(version: str) -> Path:
    return CACHE / f"frontend-{version}" / "comfyui_frontend_package" / "static"


def cached_versions() -> list[str]:
    found = [p.name.removeprefix("frontend-") for p in CACHE.glob("frontend-*")
             if (static_dir(p.name.removeprefix("frontend-")) / "index.html").is_file()]
    return sorted(found, key=_key)


def resolve_newest(python: str) -> str | None:
    """The newest version pip sees on the index, or None (offline, or pip cannot say)."""
    try:
        out = subprocess.run([python, "-m", "pip", "index", "versions", PACKAGE], capture_output=True, text=True,
                             timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"pip index failed: {exc}")
        return None
    m = re.search(rf"^{re.escape(PACKAGE)} \(([^)]+)\)", out.stdout, re.M)
    if not m:
        log(f"pip index gave no version (rc {out.returncode}): {out.stderr.strip()[-300:]}")
        return None
    return m.group(1)


def install(python: str, version: str) -> bool:
    target = CACHE / f"frontend-{version}"
    if (static_dir(version) / "index.html").is_file():
        return True
    tmp = CACHE / f".frontend-{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"installing {PACKAGE}=={version} into {target}")
    rc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(tmp),
                         f"{PACKAGE}=={version}"], env=dict(os.environ, PIP_CACHE_DIR=str(CACHE / "pip"))).returncode
    if rc != 0 or not (tmp / "comfyui_frontend_package" / "static" / "index.html").is_file():
        log(f"pip install {PACKAGE}=={version} failed (rc {rc})")
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return True


def main() -> int:
    python = sys.executable
    CACHE.mkdir(parents=True, exist_ok=True)
    wanted = os.environ.get(PIN_ENV, "").strip() or resolve_newest(python)
    if wanted and install(python, wanted):
        log(f"newest {PACKAGE}: {wanted}")
        print(static_dir(wanted))
        return 0
    cached = cached_versions()
    if cached:
        log(f"could not resolve/install the newest {PACKAGE}; using the newest cached one: {cached[-1]}")
        print(static_dir(cached[-1]))
        return 0
    log(f"no {PACKAGE} could be resolved or installed, and none is cached in {CACHE}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
