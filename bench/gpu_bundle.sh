#!/usr/bin/env bash
# Assembles .gpu/ (ignored through .git/info/exclude, never committed): what a bare GPU machine (python3 3.12 with
# torch, torchvision, torchaudio, numpy, safetensors, transformers, ... but no ComfyUI and none of ComfyUI's own
# extra requirements) needs to run bench/bench_capture_dit.py and bench/bench_capture_wan.py from the repo root:
#   .gpu/comfyui/  ComfyUI's code from .comfyui (or $PROMPT_ANATOMY_COMFYUI): no models, tests, API nodes, frontend,
#                  no file over 1 MiB (the big tokenizer vocabularies; the benchmarks use random conditioning)
#   .gpu/whl/      the wheels the benchmarks' imports need and that machine lacks: torchsde + trampoline
#                  (comfy.k_diffusion), kornia + kornia_rs (the pack's attention viewer), cp312 manylinux x86_64
#   .gpu/stubs/av  a stand-in for PyAV (its wheel is 36 MB): comfy_api imports av, av.container.InputContainer and
#                  av.subtitles.stream.SubtitleStream at module level and uses them only for video files; every
#                  other use raises ImportError naming the stub
# ComfyUI is found through PROMPT_ANATOMY_COMFYUI (scripts/comfy_path.py); nothing is written into that tree.
#
# Device command (the device tool's `run`, carry [".gpu"], timeout_s 420; about 3 minutes on an H200):
#   nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c 'import torch;print(torch.__version__)'; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.gpu/stubs PROMPT_ANATOMY_COMFYUI=$PWD/.gpu/comfyui PYTHONUNBUFFERED=1 || exit 1; set -o pipefail; { timeout 150 python3 bench/bench_capture_dit.py --json; timeout 150 python3 bench/bench_capture_wan.py --json; timeout 90 python3 bench/bench_capture_dit.py --family qwen_image --json; } 2>&1 | grep -v 'torchaudio missing' | tee $OUT/bench.log
#
# Usage: bash bench/gpu_bundle.sh        (from anywhere; needs PyPI for the wheels)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}  # any Python with pip: it only downloads (the wheels' tags are given explicitly)
COMFY=${PROMPT_ANATOMY_COMFYUI:-$ROOT/.comfyui}
WHEELS=(torchsde==0.2.6 trampoline==0.1.2 kornia==0.9.0 kornia_rs==0.2.0)
[ -f "$COMFY/comfy/model_base.py" ] || { echo "no ComfyUI tree at $COMFY (run scripts/setup.sh)" >&2; exit 1; }

grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu
mkdir -p .gpu/comfyui .gpu/whl .gpu/stubs

# 1. ComfyUI's code, without what the benchmarks never read
(cd "$COMFY" && find . \( -name .git -o -name __pycache__ -o -path ./models -o -path ./temp -o -path ./input \
    -o -path ./output -o -path ./user -o -path ./custom_nodes -o -path ./tests -o -path ./tests-unit \
    -o -path ./comfy_api_nodes -o -path ./script_examples -o -path ./.github -o -path ./.ci \) -prune \
    -o -type f -size -1024k -print0 | tar --null -T - -cf -) | tar -xf - -C .gpu/comfyui
mkdir -p .gpu/comfyui/custom_nodes .gpu/comfyui/models

# 2. the missing wheels (no dependencies: each one's needs are either listed here or on the machine)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "${WHEELS[@]}"

# 3. the PyAV stand-in
mkdir -p .gpu/stubs/av/subtitles
cat > .gpu/stubs/av/__init__.py <<'EOF'
"""Stand-in for PyAV on the benchmark GPU machine (bench/gpu_bundle.sh): ComfyUI's comfy_api imports av at module
level for its video types; the benchmarks never touch video files. Any attribute is a class that refuses use."""


def _missing(name):
    def refuse(*_a, **_k):
        raise ImportError(f"av.{name}: PyAV is a stand-in here (bench/gpu_bundle.sh); install the real av")
    return type(name, (), {"__init__": refuse, "__init_subclass__": classmethod(lambda cls, **k: None)})


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


def open(*_a, **_k):  # noqa: A001 - PyAV's name
    raise ImportError("av.open: PyAV is a stand-in here (bench/gpu_bundle.sh); install the real av")
EOF
for mod in container subtitles/__init__ subtitles/stream; do
    printf 'from av import __getattr__  # noqa: F401  (stand-in, see av/__init__.py)\n' > ".gpu/stubs/av/$mod.py"
done

echo "bundle: $(du -sh .gpu | cut -f1) in .gpu ($(du -sh .gpu/comfyui | cut -f1) ComfyUI code, $(du -sh .gpu/whl | cut -f1) wheels)"
ls .gpu/whl
