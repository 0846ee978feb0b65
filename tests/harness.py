"""Shared helpers for the server and browser test tiers: run the real ComfyUI, talk to its API.

Imported as a plain top-level module ``harness``: tests/conftest.py puts the ``tests/`` folder (never
the checkout root, whose ``nodes/`` package would shadow ComfyUI's ``nodes`` module) on sys.path, so
both tiers share one module object and therefore one server process per pytest session (see
``acquire_server`` and the shared fixtures in tests/conftest.py).

The server is the real ``main.py`` of the ComfyUI tree that scripts/comfy_path.py names (the pinned
``.comfyui/`` 0.3.75, or any tree given by $PROMPT_ANATOMY_COMFYUI), started from the project venv with
``--cpu`` and ``--base-directory`` a per-session temporary folder: its ``custom_nodes/`` holds only a
link to this checkout, its ``models/`` links to the folder with the random test models
(scripts/make_sd15_checkpoint.py), and input/output/temp/user are fresh, so tests never write into a
ComfyUI tree and no other custom node pack is loaded. $PROMPT_ANATOMY_FRONTEND_ROOT (a frontend's static
folder) is passed as ``--front-end-root``. Its stdout/stderr go to ``tests/_artifacts/comfyui-server*.log``.

Set ``PROMPT_ANATOMY_SERVER_URL=http://127.0.0.1:8188`` to run the tests against a server you
started yourself (e.g. scripts/serve.sh) instead of starting one.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

LOG = logging.getLogger("prompt_anatomy.tests.harness")

ROOT = Path(__file__).resolve().parent.parent


def _load_comfy_path():
    """scripts/comfy_path.py, by file location (scripts/ is not on sys.path in the server/browser tiers)."""
    if "comfy_path" in sys.modules:
        return sys.modules["comfy_path"]
    spec = importlib.util.spec_from_file_location("comfy_path", ROOT / "scripts" / "comfy_path.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_path"] = module
    spec.loader.exec_module(module)
    return module


comfy_path = _load_comfy_path()
COMFY_DIR = comfy_path.comfy_dir()  # the ComfyUI tree ($PROMPT_ANATOMY_COMFYUI or the pinned .comfyui/)
MODELS_DIR = comfy_path.models_dir()  # the random test models (never inside a tree given from outside)
FRONTEND_ROOT = comfy_path.frontend_root()  # --front-end-root, or None for the venv's frontend package
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
ARTIFACTS = ROOT / "tests" / "_artifacts"
WORKFLOWS_DIR = ROOT / "workflows"

PACK_NAME = "comfyui-prompt-anatomy"  # folder name under custom_nodes (symlink made by setup.sh)
PACK_MODULE_PREFIX = "custom_nodes." + PACK_NAME
PACK_CATEGORY_PREFIX = "prompt_anatomy/"
CHECKPOINT_NAME = "prompt_anatomy_random_sd15.safetensors"
LORA_NAME = "prompt_anatomy_random_lora.safetensors"
CHECKPOINT_PATH = MODELS_DIR / "checkpoints" / CHECKPOINT_NAME
LORA_PATH = MODELS_DIR / "loras" / LORA_NAME
TRAINED_LORA_DIR = "text_layers"  # where the workflows' TextLayerLoraTrain nodes save (its default subfolder)

SDXL_CHECKPOINT_NAME = "prompt_anatomy_random_sdxl.safetensors"
# Models a shipped workflow may use that the test machines do not make: such a workflow must still load
# cleanly in the frontend, and runs wherever the file is present ({(folder, file): why it is not made}).
OPTIONAL_MODELS = {
    ("checkpoints", SDXL_CHECKPOINT_NAME): "a random SDXL checkpoint is 6.9 GB and needs about 14 GB of RAM to "
                                           "load, too heavy for CI; make it with scripts/make_sdxl_checkpoint.py",
}
# the model-family workflows (workflows/flux_*, qwen_image_*, zimage_*, wan2*_*): ComfyUI's standard file names
_FAMILY_FILES = {
    "Flux.1 (or Z-Image)": [("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                            ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")],
    "Qwen-Image": [("diffusion_models", "qwen_image_fp8_e4m3fn.safetensors"),
                   ("text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors"), ("vae", "qwen_image_vae.safetensors")],
    "Z-Image": [("diffusion_models", "z_image_turbo_bf16.safetensors"), ("text_encoders", "qwen_3_4b.safetensors")],
    "Wan 2.1 / 2.2": [("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"),
                      ("diffusion_models", "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
                      ("diffusion_models", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
                      ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), ("vae", "wan_2.1_vae.safetensors")],
}
OPTIONAL_MODELS.update({key: f"not provisioned: no {family} checkpoint can be downloaded here"
                        for family, keys in _FAMILY_FILES.items() for key in keys})

SERVER_URL_ENV = "PROMPT_ANATOMY_SERVER_URL"
RENDERERS_ENV = "PROMPT_ANATOMY_RENDERERS"
# the frontend setting that switches Nodes 2.0 (Vue-rendered nodes) on; read from the frontends' bundled
# settings list: id "Comfy.VueNodes.Enabled", name "Modern Node Design (Nodes 2.0)", versionAdded 1.27.1
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
RENDERERS = ("classic", "vue")
STARTUP_TIMEOUT_S = float(os.environ.get("PROMPT_ANATOMY_SERVER_STARTUP_TIMEOUT", "180"))
PROMPT_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """The ComfyUI server did not start, died, or answered unexpectedly."""


class PromptRejected(RuntimeError):
    """POST /prompt refused the prompt (validation failed); ``.response`` holds the JSON body."""

    def __init__(self, message: str, response: dict | None = None):
        super().__init__(message)
        self.response = response or {}


class PromptFailed(RuntimeError):
    """The prompt was accepted but its execution failed; ``.entry`` holds the /history entry."""

    def __init__(self, message: str, entry: dict | None = None):
        super().__init__(message)
        self.entry = entry or {}


# ---------------------------------------------------------------------------------------------
# HTTP helpers (stdlib only)
# ---------------------------------------------------------------------------------------------
def workflow_spec(name: str) -> dict:
    """The API prompt of scripts/workflow_specs/<name>.json (base specs; the "_ui" key is the builder's)."""
    spec = json.loads((ROOT / "scripts" / "workflow_specs" / f"{name}.json").read_text())
    return {k: v for k, v in spec.items() if k != "_ui"}


def http_request(base_url: str, path: str, data: bytes | None = None, method: str | None = None,
                 headers: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes, dict]:
    """Return (status, body, headers); HTTP error statuses are returned, not raised."""
    url = base_url.rstrip("/") + path
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers or {})


def get_json(base_url: str, path: str, timeout: float = 30.0):
    status, body, _ = http_request(base_url, path, timeout=timeout)
    if status != 200:
        raise ServerError(f"GET {path} -> HTTP {status}: {body[:500]!r}")
    return json.loads(body)


def post_json(base_url: str, path: str, payload, timeout: float = 30.0) -> tuple[int, object]:
    data = json.dumps(payload).encode()
    status, body, _ = http_request(base_url, path, data=data, method="POST",
                                   headers={"Content-Type": "application/json"}, timeout=timeout)
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body.decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def submit_prompt(base_url: str, prompt: dict, client_id: str | None = None,
                  extra_data: dict | None = None) -> str:
    """POST an API-format prompt to /prompt and return its prompt_id (raises PromptRejected)."""
    payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
    if extra_data:
        payload["extra_data"] = extra_data
    status, body = post_json(base_url, "/prompt", payload)
    if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
        raise PromptRejected(f"POST /prompt -> HTTP {status}: {format_rejection(body)}",
                             body if isinstance(body, dict) else None)
    if body.get("node_errors"):
        raise PromptRejected(f"POST /prompt node_errors: {format_rejection(body)}", body)
    return body["prompt_id"]


def format_rejection(body) -> str:
    """Readable text from a /prompt 400 response ({"error": {...}, "node_errors": {...}})."""
    if not isinstance(body, dict):
        return str(body)[:2000]
    parts = []
    err = body.get("error")
    if isinstance(err, dict):
        parts.append(f"{err.get('type')}: {err.get('message')} {err.get('details') or ''}".strip())
    elif err:
        parts.append(str(err))
    for node_id, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(parts) or json.dumps(body)[:2000]


def upload_input(base_url: str, name: str, data: bytes, overwrite: bool = True) -> str:
    """POST /upload/image (multipart) so LoadImage finds ``name`` in the server's input folder;
    returns the name the server stored it under."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n")
    tail = (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\n"
            f"{'true' if overwrite else 'false'}\r\n--{boundary}--\r\n")
    status, body, _ = http_request(base_url, "/upload/image", data=head.encode() + data + tail.encode(),
                                   method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if status != 200:
        raise ServerError(f"POST /upload/image -> HTTP {status}: {body[:300]!r}")
    return json.loads(body).get("name", name)


def history_entry(base_url: str, prompt_id: str) -> dict | None:
    data = get_json(base_url, f"/history/{urllib.parse.quote(prompt_id)}")
    return data.get(prompt_id)


def execution_error_text(entry: dict) -> str:
    """The execution_error (or interruption) message of a /history entry, with its traceback."""
    status = entry.get("status") or {}
    texts = []
    for msg in status.get("messages") or []:
        if not (isinstance(msg, (list, tuple)) and len(msg) == 2):
            continue
        kind, data = msg
        if kind == "execution_error":
            tb = "".join(data.get("traceback") or [])
            texts.append(f"node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}".rstrip())
        elif kind == "execution_interrupted":
            texts.append(f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    return "\n".join(texts) or f"status {status.get('status_str')!r}, messages {status.get('messages')!r}"


def wait_for_prompt(base_url: str, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S,
                    poll: float = 0.5, server: ComfyServer | None = None) -> dict:
    """Poll /history/<prompt_id> until the prompt finished; return the entry or raise PromptFailed.

    Success means status_str == "success" and completed is True. The server process (``server``,
    by default the session's server when base_url is its URL) dying is reported at once with the
    log tail instead of waiting for the timeout.
    """
    if server is None and _server is not None and _server.base_url == base_url.rstrip("/"):
        server = _server  # the session's server: watch its process too
    deadline = time.monotonic() + timeout
    while True:
        try:
            entry = history_entry(base_url, prompt_id)
        except OSError as exc:  # connection refused/reset: say whether the server died
            if server is not None and server.proc is not None and server.proc.poll() is not None:
                raise ServerError(f"server exited (rc {server.proc.returncode}) while running prompt "
                                  f"{prompt_id}\n{server.log_tail()}") from exc
            raise
        if entry is not None:
            status = entry.get("status") or {}
            if status.get("status_str") == "success" and status.get("completed"):
                return entry
            if status.get("status_str") == "error" or status.get("completed") is False:
                raise PromptFailed(f"prompt {prompt_id} failed:\n{execution_error_text(entry)}", entry)
        if server is not None and server.proc is not None and server.proc.poll() is not None:
            raise ServerError(f"server exited (rc {server.proc.returncode}) while running prompt "
                              f"{prompt_id}\n{server.log_tail()}")
        if time.monotonic() > deadline:
            queue = get_json(base_url, "/queue")
            raise PromptFailed(f"prompt {prompt_id} not finished after {timeout:.0f} s; queue: "
                               f"{len(queue.get('queue_running', []))} running, "
                               f"{len(queue.get('queue_pending', []))} pending")
        time.sleep(poll)


def queue_api_prompt(base_url: str, prompt_dict: dict, timeout: float = PROMPT_TIMEOUT_S,
                     client_id: str | None = None, server: ComfyServer | None = None) -> dict:
    """Queue an API-format prompt, wait until it finished and return its /history entry.

    Raises PromptRejected when validation refuses it and PromptFailed (with the execution error
    message and traceback from the history) when it fails while running.
    """
    prompt_id = submit_prompt(base_url, prompt_dict, client_id=client_id)
    entry = wait_for_prompt(base_url, prompt_id, timeout=timeout, server=server)
    entry.setdefault("prompt_id", prompt_id)
    return entry


def reset_execution_cache(base_url: str) -> None:
    """POST /free {"free_memory": true}: the server drops its cached node outputs (and unloads models) before its
    next prompt, so the next run of a graph executes every node again and sends every node's UI output (a fully
    cached node sends none). Used when the browser tier switches renderer on the same server."""
    status, body = post_json(base_url, "/free", {"free_memory": True})
    if status != 200:
        raise ServerError(f"POST /free -> HTTP {status}: {body}")


def output_images(entry: dict) -> list[dict]:
    """All image records ({filename, subfolder, type}) in the outputs of a /history entry."""
    images = []
    for node_out in (entry.get("outputs") or {}).values():
        images.extend(node_out.get("images") or [])
    return images


def fetch_image(base_url: str, image: dict) -> bytes:
    """GET /view for one image record from output_images()."""
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
    status, body, _ = http_request(base_url, f"/view?{query}")
    if status != 200:
        raise ServerError(f"GET /view?{query} -> HTTP {status}")
    return body


def sd15_txt2img_prompt(ckpt_name: str = CHECKPOINT_NAME, steps: int = 2, size: int = 64,
                        seed: int = 1, positive: str = "a photo of a red cube on a wooden table",
                        negative: str = "blurry", save: bool = False, lora_name: str | None = None,
                        lora_strength: float = 1.0) -> dict:
    """Core-node API prompt: checkpoint → (LoRA) → 2× CLIPTextEncode → empty latent → KSampler →
    VAEDecode → PreviewImage (or SaveImage). Node ids are stable strings, handy for edits."""
    model, clip = ["1", 0], ["1", 1]
    prompt: dict = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
    }
    if lora_name:
        prompt["10"] = {"class_type": "LoraLoader",
                        "inputs": {"model": model, "clip": clip, "lora_name": lora_name,
                                   "strength_model": lora_strength, "strength_clip": lora_strength}}
        model, clip = ["10", 0], ["10", 1]
    prompt.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
                         "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    })
    if save:
        prompt["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "pa_test"}}
    else:
        prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    return prompt


# ---------------------------------------------------------------------------------------------
# pack introspection
# ---------------------------------------------------------------------------------------------
def pack_nodes(object_info: dict) -> dict:
    """The /object_info entries that belong to this pack (python_module under custom_nodes/<pack>)."""
    return {name: info for name, info in object_info.items()
            if str(info.get("python_module", "")).startswith(PACK_MODULE_PREFIX)}


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_default(entry) -> object:
    """Default value of an /object_info input entry that is a widget (combo: its default or first option)."""
    kind, opts = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
    if isinstance(kind, list):
        return opts.get("default", kind[0])
    if kind == "COMBO":
        return opts.get("default", (opts.get("options") or [None])[0])
    if "default" in opts:
        return opts["default"]
    return {"INT": opts.get("min", 0), "FLOAT": opts.get("min", 0.0), "STRING": "", "BOOLEAN": False}[kind]


def model_patch_nodes(object_info: dict, exclude=()) -> dict[str, dict]:
    """The pack's MODEL -> MODEL patch nodes (a single MODEL input plus widgets, MODEL as first output) except
    ``exclude``, each with its default widget values and the MODEL input set to None: nodes that can be
    chained in front of any sampler in a composition test."""
    out = {}
    for name, info in sorted(pack_nodes(object_info).items()):
        if name in exclude or not info.get("output") or info["output"][0] != "MODEL":
            continue
        required = (info.get("input") or {}).get("required") or {}
        inputs, ok = {}, True
        for key, entry in required.items():
            if entry[0] == "MODEL":
                inputs[key] = None
            elif isinstance(entry[0], list) or entry[0] in WIDGET_TYPES:
                inputs[key] = widget_default(entry)
            else:
                ok = False
        if ok and list(inputs.values()).count(None) == 1:
            out[name] = inputs
    return out


def remove_trained_loras(since: float | None) -> None:
    """Delete the LoRAs that TextLayerLoraTrain wrote under the test models' loras/text_layers/ since ``since``
    (the shipped workflows train into that subfolder; it never holds a file the tests need)."""
    folder = MODELS_DIR / "loras" / TRAINED_LORA_DIR
    if since is None or not folder.is_dir():
        return
    for f in folder.glob("*.safetensors"):
        if f.stat().st_mtime >= since - 1:
            f.unlink()
            LOG.info("removed the trained LoRA %s", f)


def missing_optional_models(base_url: str, values) -> list[str]:
    """'folder/file: why' for every OPTIONAL_MODELS file named among ``values`` (a workflow's widget values or
    a prompt's inputs) that the server does not have (GET /models/<folder>)."""
    named = {v for v in values if isinstance(v, str)}
    out = []
    for (folder, file), why in OPTIONAL_MODELS.items():
        if file in named and file not in get_json(base_url, f"/models/{folder}"):
            out.append(f"{folder}/{file}: {why}")
    return out


def widget_values(ui_node: dict) -> list:
    """A UI-format node's widget values (``widgets_values`` is a list, or a dict for some nodes)."""
    values = ui_node.get("widgets_values") or []
    return list(values.values()) if isinstance(values, dict) else list(values)


def workflow_files() -> list[Path]:
    """workflows/*.json of the pack ($PROMPT_ANATOMY_WORKFLOWS_DIR overrides the folder, for
    trying the browser tier on workflows that are not in the checkout)."""
    folder = Path(os.environ.get("PROMPT_ANATOMY_WORKFLOWS_DIR") or WORKFLOWS_DIR)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# what this session runs against
# ---------------------------------------------------------------------------------------------
def renderers() -> list[str]:
    """The renderers the browser tier runs in: $PROMPT_ANATOMY_RENDERERS ("classic", "vue" or both, default both)."""
    chosen = os.environ.get(RENDERERS_ENV, " ".join(RENDERERS)).replace(",", " ").split()
    bad = [r for r in chosen if r not in RENDERERS]
    if bad or not chosen:
        raise ValueError(f"${RENDERERS_ENV}={os.environ.get(RENDERERS_ENV)!r}: want some of {RENDERERS}")
    return chosen


def frontend_label() -> str:
    """"1.32.9" for the venv's frontend, the version of a --front-end-root install otherwise."""
    return comfy_path.frontend_version(FRONTEND_ROOT)


def server_log_name() -> str:
    return "comfyui-server.log" if FRONTEND_ROOT is None else f"comfyui-server-frontend-{frontend_label()}.log"


def describe_setup() -> str:
    frontend = (f"{frontend_label()} from {FRONTEND_ROOT} (--front-end-root)" if FRONTEND_ROOT is not None
                else f"{frontend_label()} (the venv's comfyui-frontend-package)")
    where = f"${comfy_path.COMFY_ENV}" if comfy_path.is_external() else "pinned"
    if os.environ.get(SERVER_URL_ENV):
        return f"prompt-anatomy: external server {os.environ[SERVER_URL_ENV]} (its ComfyUI and frontend are its own)"
    return f"prompt-anatomy: ComfyUI {comfy_path.comfy_version(COMFY_DIR)} at {COMFY_DIR} ({where}); frontend {frontend}"


def browser_artifacts(frontend_version: str, renderer: str) -> Path:
    """Screenshots of one browser run: tests/_artifacts/browser/<frontend>-<renderer>/."""
    return ARTIFACTS / "browser" / f"{frontend_version}-{renderer}"


BROWSER_RUNS: list[dict] = []  # one entry per (frontend, renderer) page of this session, for the summary


def note_browser_run(frontend_version: str, renderer: str) -> dict:
    run = {"frontend": frontend_version, "renderer": renderer, "t0": time.monotonic(), "seconds": None}
    BROWSER_RUNS.append(run)
    return run


# ---------------------------------------------------------------------------------------------
# the server process
# ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the test process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; teardown and atexit still stop the server
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """The real ComfyUI (``.comfyui/main.py --cpu``) in its own process group."""

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 extra_args: list[str] | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path or ARTIFACTS / server_log_name())
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self._log_file = None
        self.external = False

    # folders of this run
    @property
    def input_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "input"

    @property
    def output_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "output"

    @property
    def temp_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "temp"

    def command(self) -> list[str]:
        python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
        assert self.workdir is not None
        frontend = ["--front-end-root", str(FRONTEND_ROOT)] if FRONTEND_ROOT is not None else []
        return [python, str(COMFY_DIR / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.workdir),
                "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
                "--temp-directory", str(self.temp_dir), "--user-directory", str(self.workdir / "user"),
                "--database-url", "sqlite:///:memory:", *frontend, *self.extra_args]

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> ComfyServer:
        if not (COMFY_DIR / "main.py").is_file():
            raise ServerError(f"{COMFY_DIR}/main.py not found: run scripts/setup.sh first")
        if FRONTEND_ROOT is not None and not (FRONTEND_ROOT / "index.html").is_file():
            raise ServerError(f"${comfy_path.FRONTEND_ENV}={FRONTEND_ROOT} has no index.html (want a frontend's "
                              "static folder, e.g. scripts/newest_frontend.py's output)")
        self.workdir = Path(tempfile.mkdtemp(prefix="prompt-anatomy-comfy-"))
        self.started_at = time.time()
        for sub in ("input", "output", "temp", "user", "custom_nodes"):
            (self.workdir / sub).mkdir()
        # the base directory: only this pack in custom_nodes, the test models through a link
        (self.workdir / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        (self.workdir / "models").symlink_to(MODELS_DIR, target_is_directory=True)
        # the stock input files (ComfyUI's example.png ...), so workflows with LoadImage find them
        stock = COMFY_DIR / "input"
        for f in sorted(stock.iterdir()) if stock.is_dir() else []:
            if f.is_file():
                shutil.copy2(f, self.input_dir / f.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = self.command()
        self._log_file.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log_file.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=str(COMFY_DIR), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        atexit.register(self.stop)  # also when pytest exits without tearing fixtures down
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        LOG.info("ComfyUI ready at %s after %.1f s (log %s)", self.base_url, self.startup_s, self.log_path)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until GET /object_info answers with JSON."""
        deadline = time.monotonic() + timeout
        last_err = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with rc {self.proc.returncode} during startup "
                                  f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                status, body, _ = http_request(self.base_url, "/object_info", timeout=30)
                if status == 200 and json.loads(body):
                    return
                last_err = f"HTTP {status}"
            except (OSError, ValueError) as exc:
                last_err = repr(exc)
            time.sleep(1.0)
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s ({last_err}); "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.external or (self.proc is not None and self.proc.poll() is None)

    def stop(self, grace: float = 15.0) -> None:
        """Terminate the whole process group (SIGTERM, then SIGKILL) and remove the temp folders."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        elif proc is not None:
            # the leader is gone; make sure no child it left behind keeps running
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        remove_trained_loras(getattr(self, "started_at", None))
        if self.workdir is not None and not os.environ.get("PROMPT_ANATOMY_KEEP_SERVER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n_chars: int = 6000) -> str:
        text = self.log_text()
        return ("...\n" + text[-n_chars:]) if len(text) > n_chars else text

    def log_offset(self) -> int:
        """Current size of the server log; pass to log_since() to see what one test produced."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class _ExternalServer(ComfyServer):
    def __init__(self, url: str):
        super().__init__(port=urllib.parse.urlparse(url).port or 80)
        self.base_url = url.rstrip("/")
        self.external = True

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> ComfyServer:
        self.wait_ready(timeout)
        self.startup_s = 0.0
        return self

    def stop(self, grace: float = 15.0) -> None:
        pass

    def log_text(self) -> str:
        return f"(external server {self.base_url}: log not captured)"


# One server per pytest session, shared by both tiers (refcounted; both conftests' session
# fixtures acquire it and release it at session teardown).
_lock = threading.Lock()
_server: ComfyServer | None = None
_refs = 0
_start_error: BaseException | None = None


def acquire_server() -> ComfyServer:
    """Start the session's server on first use (or attach to $PROMPT_ANATOMY_SERVER_URL)."""
    global _server, _refs, _start_error
    with _lock:
        if _start_error is not None:
            raise ServerError(f"ComfyUI failed to start earlier in this session: {_start_error}")
        if _server is None:
            url = os.environ.get(SERVER_URL_ENV)
            server = _ExternalServer(url) if url else ComfyServer()
            try:
                server.start()
            except BaseException as exc:
                _start_error = exc
                raise
            _server = server
        _refs += 1
        return _server


def release_server() -> None:
    global _server, _refs
    with _lock:
        _refs -= 1
        if _refs <= 0 and _server is not None:
            _server.stop()
            _server = None
            _refs = 0


def attach_server_log(item, report) -> None:
    """pytest_runtest_makereport helper: add the server log tail to a failed test's report."""
    if not report.failed or report.when == "teardown" or "comfy_server" not in getattr(item, "fixturenames", ()):
        return
    server = _server
    if server is None:
        report.sections.append(("ComfyUI server", f"no server running; last log: {ARTIFACTS / 'comfyui-server.log'}"))
        return
    report.sections.append((f"ComfyUI server log tail ({server.log_path})", server.log_tail(8000)))


# ---------------------------------------------------------------------------------------------
# browser (Debian chromium + Python playwright; never `playwright install`)
# ---------------------------------------------------------------------------------------------
CHROMIUM = os.environ.get("PROMPT_ANATOMY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    # offline and deterministic: every host except the local server fails to resolve
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
BROWSER_ARTIFACTS = ARTIFACTS / "browser"  # the browser conftest points it at the current run's subfolder
# Frontend settings stored for the (temporary) test user before the page opens: no template
# browser on first start, and the missing-node/model dialogs stay on so the tests can see them.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
}
FRONTEND_READY_JS = """() => !!(window.app && window.app.graph && window.app.canvas && window.app.api
    && window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types || {}).length > 50)"""


def launch_browser(playwright, user_data_dir: str):
    """A persistent chromium context with a fresh profile folder."""
    return playwright.chromium.launch_persistent_context(
        user_data_dir, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 900}, ignore_default_args=["--enable-automation"])


def open_frontend(context, base_url: str, timeout_s: float = 120.0, renderer: str = "classic",
                  settings: dict | None = None):
    """Open the ComfyUI frontend in a new page, in ``renderer`` ("classic" LiteGraph canvas or "vue" =
    Nodes 2.0, switched through the stored setting before the page loads), and wait for window.app.

    The page gets ``page.console_errors`` / ``page.page_errors`` lists, ``page.pack_js`` (status of
    every /extensions/<pack>/ response), ``page.renderer`` and ``page.frontend_version`` (what the
    page itself reports) for the tests to inspect. ``settings`` adds/overrides stored settings.
    """
    stored = {**FRONTEND_SETTINGS, VUE_NODES_SETTING: renderer == "vue", **(settings or {})}
    status, body = post_json(base_url, "/settings", stored)
    if status != 200:
        raise ServerError(f"POST /settings -> HTTP {status}: {body}")
    page = context.new_page()
    page.renderer = renderer
    page.console_errors = []
    page.page_errors = []
    page.pack_js = {}
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(
        f"{m.text} @ {(m.location or {}).get('url', '')}"))
    page.on("pageerror", lambda e: page.page_errors.append(f"{e.name}: {e.message}\n{e.stack or ''}"))
    prefix = f"/extensions/{PACK_NAME}/"

    def _on_response(resp):
        path = urllib.parse.urlparse(resp.url).path
        if path.startswith(prefix):
            page.pack_js[path] = resp.status
    page.on("response", _on_response)
    page.goto(base_url + "/", wait_until="domcontentloaded", timeout=timeout_s * 1000)
    page.wait_for_function(FRONTEND_READY_JS, timeout=timeout_s * 1000, polling=250)
    page.frontend_version = page.evaluate("() => String(window.__COMFYUI_FRONTEND_VERSION__ || 'unknown')")
    active = page.evaluate(SETTING_JS, VUE_NODES_SETTING)
    if bool(active) != (renderer == "vue"):
        raise ServerError(f"frontend {page.frontend_version}: {VUE_NODES_SETTING} is {active!r} after storing "
                          f"{renderer == 'vue'} ({renderer} renderer requested)")
    return page


# The current value of a frontend setting (the settings store of the running page).
SETTING_JS = """(id) => {
  const s = window.app?.extensionManager?.setting;
  if (s?.get) return s.get(id);
  return window.app?.ui?.settings?.getSettingValue?.(id);
}"""


def ensure_frontend(page, base_url: str):
    """Reload the page when an earlier test left it without a working window.app or with a
    dialog open (e.g. the missing-nodes warning of a failed test)."""
    try:
        if page.evaluate(FRONTEND_READY_JS) and not page.evaluate(
                "() => document.querySelectorAll('.p-dialog, [role=\"dialog\"]').length"):
            return page
    except Exception:  # noqa: BLE001 - a crashed page is reloaded below
        pass
    page.goto(base_url + "/", wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(FRONTEND_READY_JS, timeout=120_000, polling=250)
    return page


# Loads a UI-format workflow with app.loadGraphData and reports what is wrong: node types the
# frontend does not know (before and after loading), calls of app.showMissingNodesError /
# showMissingModelsError, any open dialog that talks about missing nodes or models, and new
# toasts about errors (e.g. "Invalid workflow against zod schema" from the frontend's validation).
LOAD_WORKFLOW_JS = """async ([wf, name]) => {
  const app = window.app, LG = window.LiteGraph;
  const known = (t) => t in LG.registered_node_types;
  const subgraphIds = new Set(((wf.definitions || {}).subgraphs || []).map(s => s.id));
  const rawTypes = [];
  for (const n of wf.nodes || []) rawTypes.push(n.type);
  for (const s of (wf.definitions || {}).subgraphs || []) for (const n of s.nodes || []) rawTypes.push(n.type);
  const unknownBefore = [...new Set(rawTypes.filter(t => !known(t) && !subgraphIds.has(t)))];
  const toastTexts = () => [...document.querySelectorAll('.p-toast-message')].map(t => (t.innerText || '').trim());
  const toastsBefore = new Set(toastTexts());
  const calls = {nodes: [], models: []};
  const origNodes = app.showMissingNodesError, origModels = app.showMissingModelsError;
  app.showMissingNodesError = function (m) { calls.nodes.push(m); return origNodes.apply(this, arguments); };
  app.showMissingModelsError = function (m) { calls.models.push(m); return origModels.apply(this, arguments); };
  try {
    await app.loadGraphData(wf, true, true, name);
  } finally {
    app.showMissingNodesError = origNodes; app.showMissingModelsError = origModels;
  }
  await new Promise(r => setTimeout(r, 300));
  const nodes = app.graph.nodes || app.graph._nodes || [];
  const unknownAfter = [...new Set(nodes.map(n => n.type).filter(t => !known(t) && !subgraphIds.has(t)))];
  const dialogs = [...document.querySelectorAll('.p-dialog, [role="dialog"]')]
    .map(d => (d.innerText || '').trim()).filter(t => /missing/i.test(t));
  const toasts = toastTexts().filter(t => !toastsBefore.has(t) && /invalid|error|missing|fail/i.test(t));
  const s = (x) => typeof x === 'object' ? (x.type || JSON.stringify(x)) : String(x);
  return {nodeCount: nodes.length, types: nodes.map(n => n.type), unknownBefore, unknownAfter,
          missingNodes: calls.nodes.flat().map(s), missingModels: calls.models.flat().map(s), dialogs, toasts};
}"""

# Queues the loaded graph the way the Queue button does (app.queuePrompt(number, batchCount) in
# frontend 1.32.9) and returns what POST /prompt answered, captured by wrapping app.api.queuePrompt.
QUEUE_JS = """async () => {
  const app = window.app, api = app.api;
  const captured = [];
  const orig = api.queuePrompt;
  api.queuePrompt = async function () {
    try { const r = await orig.apply(this, arguments); captured.push({ok: true, response: r}); return r; }
    catch (e) { captured.push({ok: false, error: String(e), response: e && e.response}); throw e; }
  };
  let ok;
  try { ok = await app.queuePrompt(0, 1); } finally { api.queuePrompt = orig; }
  return {ok, captured};
}"""


FIT_VIEW_JS = """() => {
  const nodes = app.graph.nodes || app.graph._nodes || [];
  if (!nodes.length || !app.canvas.ds.fitToBounds) return false;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0]);
  app.canvas.setDirty(true, true);
  return true;
}"""


def dump_page(page, name: str, fit: bool = True) -> Path | None:
    """Screenshot (whole graph in view) into tests/_artifacts/browser/<name>.png (never raises)."""
    BROWSER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = BROWSER_ARTIFACTS / f"{name}.png"
    try:
        if fit:
            page.evaluate(FIT_VIEW_JS)
            page.wait_for_timeout(300)
    except Exception as exc:  # noqa: BLE001 - a screenshot without fitting is still useful
        LOG.warning("fit view failed: %s", exc)
    try:
        page.screenshot(path=str(path), timeout=30_000)
        return path
    except Exception as exc:  # noqa: BLE001
        LOG.warning("screenshot %s failed: %s", path, exc)
        return None
