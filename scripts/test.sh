#!/usr/bin/env bash
# The test command (README; CI runs it through .ci/run):
#   bash scripts/test.sh [extra pytest args]
# 1. provisions everything: scripts/setup.sh (venv + ComfyUI 0.3.75), scripts/install_browser.sh
#    (Debian chromium), scripts/make_sd15_checkpoint.py (random SD1.5 checkpoint + LoRA);
# 2. runs the unit tier (tests/unit), then the server and browser tiers (tests/server,
#    tests/browser) in one pytest session, so they share one real ComfyUI server (the pinned
#    frontend, i.e. the venv's comfyui-frontend-package);
# 3. runs the browser tier again against the newest comfyui-frontend-package on PyPI
#    (scripts/newest_frontend.py; served with --front-end-root; one more server).
# Each browser run covers both renderers, the classic canvas and Nodes 2.0, on its one server.
# Extra arguments go to every pytest run. TEST_TIERS picks tiers (default "unit server browser"),
# e.g. TEST_TIERS=unit bash scripts/test.sh  skips the browser install and the checkpoint.
# TEST_FRONTENDS picks the browser runs (default "pinned newest"); PROMPT_ANATOMY_RENDERERS the
# renderers ("classic vue"); PROMPT_ANATOMY_FRONTEND_ROOT=<static folder> replaces "pinned" by that
# frontend. PROMPT_ANATOMY_COMFYUI=/path/to/ComfyUI runs everything against that ComfyUI tree
# (scripts/comfy_path.py; nothing is downloaded for it and nothing is written into it).
# Exit code: the first failing pytest exit code; "no tests collected" (5) counts as a failure
# unless extra arguments were given (a -k/-m filter may legitimately empty one tier).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TIERS=" ${TEST_TIERS:-unit server browser} "
FRONTENDS=" ${TEST_FRONTENDS:-pinned newest} "
PY="$ROOT/.venv/bin/python"
has_tier() { [[ "$TIERS" == *" $1 "* ]]; }

SUMMARY=()
START_ALL=$SECONDS
phase() {  # phase NAME CMD... : run, time, remember; returns the command's exit code
  local name="$1"; shift
  local t0=$SECONDS rc=0
  echo "=== [test.sh] $name: $*" >&2
  "$@" || rc=$?
  local dt=$((SECONDS - t0))
  SUMMARY+=("$(printf '%-28s %5ds  rc=%s' "$name" "$dt" "$rc")")
  echo "=== [test.sh] $name finished in ${dt}s (rc=$rc)" >&2
  return $rc
}
report() {
  echo "=== [test.sh] phase durations" >&2
  for line in "${SUMMARY[@]}"; do echo "    $line" >&2; done
  echo "    $(printf '%-28s %5ds' total $((SECONDS - START_ALL)))" >&2
}
die() { report; echo "=== [test.sh] FAILED: $*" >&2; exit "${2:-1}"; }

phase "setup" bash scripts/setup.sh || die "scripts/setup.sh"
if has_tier browser; then
  phase "install browser" bash scripts/install_browser.sh || die "scripts/install_browser.sh"
fi
if has_tier server || has_tier browser; then
  phase "sd15 checkpoint + lora" "$PY" scripts/make_sd15_checkpoint.py || die "scripts/make_sd15_checkpoint.py"
fi

# pytest exit code -> ours (5 = nothing collected)
judge() {
  local tier="$1" rc="$2"
  if [ "$rc" -eq 5 ]; then
    if [ "$#" -gt 2 ] && [ "$3" -gt 0 ]; then
      echo "=== [test.sh] $tier: no tests selected by the extra arguments" >&2; echo 0; return
    fi
    echo "=== [test.sh] $tier: NO TESTS COLLECTED - treated as a failure" >&2
  fi
  echo "$rc"
}

echo "=== [test.sh] $("$PY" - <<'PYEOF'
import sys
sys.path.insert(0, "scripts")
import comfy_path as c
where = "$PROMPT_ANATOMY_COMFYUI" if c.is_external() else "pinned"
print(f"ComfyUI {c.comfy_version()} at {c.comfy_dir()} ({where}); frontend {c.frontend_version()}")
PYEOF
)" >&2

FINAL=0
if has_tier unit; then
  rc=0; phase "pytest unit" "$PY" -m pytest tests/unit "$@" || rc=$?
  rc=$(judge unit "$rc" "$#")
  [ "$FINAL" -eq 0 ] && FINAL=$rc
fi
INTEG=()
has_tier server && INTEG+=(tests/server)
has_tier browser && [[ "$FRONTENDS" == *" pinned "* ]] && INTEG+=(tests/browser)
if [ "${#INTEG[@]}" -gt 0 ]; then
  label="pytest ${INTEG[*]#tests/}"
  has_tier browser && [[ "$FRONTENDS" == *" pinned "* ]] && label="$label (frontend $("$PY" scripts/comfy_path.py frontend_version))"
  rc=0; phase "$label" "$PY" -m pytest "${INTEG[@]}" "$@" || rc=$?
  rc=$(judge "${INTEG[*]}" "$rc" "$#")
  [ "$FINAL" -eq 0 ] && FINAL=$rc
  if [ "$rc" -ne 0 ]; then
    echo "=== [test.sh] server log: $ROOT/tests/_artifacts/comfyui-server*.log; screenshots: $ROOT/tests/_artifacts/browser/" >&2
  fi
fi
if has_tier browser && [[ "$FRONTENDS" == *" newest "* ]]; then
  rc=0; NEWEST="$("$PY" scripts/newest_frontend.py)" || rc=$?
  if [ "$rc" -ne 0 ] || [ -z "$NEWEST" ]; then
    # offline with nothing cached: the pinned run above still counts; say so loudly instead of failing
    echo "=== [test.sh] newest frontend: SKIPPED - none could be resolved, installed or found in .cache/ (offline?)" >&2
    SUMMARY+=("$(printf '%-28s %5s  %s' "pytest browser (newest)" "-" "SKIPPED: no newest frontend available")")
  else
    version="$(PROMPT_ANATOMY_FRONTEND_ROOT="$NEWEST" "$PY" scripts/comfy_path.py frontend_version)"
    rc=0; PROMPT_ANATOMY_FRONTEND_ROOT="$NEWEST" phase "pytest browser (frontend $version)" \
        "$PY" -m pytest tests/browser "$@" || rc=$?
    rc=$(judge "tests/browser (frontend $version)" "$rc" "$#")
    [ "$FINAL" -eq 0 ] && FINAL=$rc
  fi
fi
report
if [ "$FINAL" -eq 0 ]; then echo "=== [test.sh] ALL TIERS PASSED" >&2; else echo "=== [test.sh] FAILED (exit $FINAL)" >&2; fi
exit "$FINAL"
