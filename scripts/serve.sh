#!/usr/bin/env bash
# The main command (README): provision, then run ComfyUI with Prompt Anatomy loaded.
#   bash scripts/serve.sh [extra ComfyUI args]      PORT=8188 LISTEN=127.0.0.1 by default
# Runs scripts/setup.sh and scripts/make_sd15_checkpoint.py (random SD1.5 checkpoint + LoRA, so
# the example workflows run without downloading a model), then starts .comfyui/main.py --cpu in the
# foreground and prints the URL as soon as the server answers. Ctrl-C stops it.
# The pack's demo model (models/prompt_anatomy_mini, trained here, in the repo) needs nothing: open
# the template browser and load demo_tour, which runs every node of the pack on it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PORT="${PORT:-8188}"
LISTEN="${LISTEN:-127.0.0.1}"
PY="$ROOT/.venv/bin/python"

bash scripts/setup.sh
"$PY" scripts/make_sd15_checkpoint.py

URL="http://127.0.0.1:$PORT"
[ "$LISTEN" = "127.0.0.1" ] || [ "$LISTEN" = "0.0.0.0" ] || URL="http://$LISTEN:$PORT"
# Watcher: polls the server (which replaces this shell below, keeping its PID) and prints the URL.
SERVER_PID=$$
"$PY" - "$URL" "$SERVER_PID" <<'PYEOF' &
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(0)
    try:
        with urllib.request.urlopen(url + "/object_info", timeout=10) as r:
            if r.status == 200:
                print(f"\n==> Prompt Anatomy is running: {url}  (Ctrl-C to stop)\n"
                      "==> Start with the demo tour: Workflow > Browse Templates > Prompt Anatomy > demo_tour\n"
                      "    (every node of the pack on the demo model; demo_* are the other workflows on it)\n",
                      file=sys.stderr, flush=True)
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
print(f"==> server did not answer at {url} within 600 s", file=sys.stderr)
PYEOF
# PROMPT_ANATOMY_COMFYUI=/path/to/ComfyUI serves that tree, with the pack and models from .comfybase/;
# PROMPT_ANATOMY_FRONTEND_ROOT=<static folder> serves that frontend (scripts/comfy_path.py)
COMFY="$("$PY" scripts/comfy_path.py comfy_dir)"
EXTRA=()
[ "$("$PY" scripts/comfy_path.py is_external)" = 1 ] && EXTRA+=(--base-directory "$("$PY" scripts/comfy_path.py base_dir)")
[ -n "${PROMPT_ANATOMY_FRONTEND_ROOT:-}" ] && EXTRA+=(--front-end-root "$PROMPT_ANATOMY_FRONTEND_ROOT")
if ! "$PY" -c "import torchaudio" 2>/dev/null; then
  echo "==> Note: ComfyUI will print 'IMPORT FAILED' for its audio nodes (nodes_audio, ...): no torchaudio build" \
       "matches the pinned torch here. Prompt Anatomy does not use them; everything else works." >&2
fi
cd "$COMFY"
exec "$PY" main.py --cpu --listen "$LISTEN" --port "$PORT" --disable-auto-launch "${EXTRA[@]}" "$@"
