"""Helpers shared by the unit tests, importable as ``pa_support`` (registered by conftest.py)."""

from __future__ import annotations

import contextlib

import tiny_models  # noqa: E402  (scripts/ is on sys.path: conftest.py)
import torch
from comfy.patcher_extension import WrappersMP

import nodes as comfy_nodes

_CACHE: dict = {}


def tiny(family: str, dtype=None):
    """Session-cached tiny model of ``family`` (tests must clone before patching — as nodes do)."""
    key = (family, dtype)
    if key not in _CACHE:
        _CACHE[key] = tiny_models.make(family, dtype=dtype)
    return _CACHE[key]


def empty_latent(batch=1, channels=4, size=16):
    return {"samples": torch.zeros(batch, channels, size // 8 * 2, size // 8 * 2)}


def ksample(model, pos, neg, *, steps=6, sampler="euler", scheduler="normal", cfg=5.0, batch=1, size=16,
            channels=4, denoise=1.0, seed=0, latent=None):
    """Core KSampler (nodes.common_ksampler) on a tiny model; returns the latent tensor."""
    if latent is None:
        latent = empty_latent(batch, channels, size)
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=denoise)
    return out["samples"]


def count_rows(model):
    """Clone of ``model`` with an APPLY_MODEL wrapper counting batch rows that reach the diffusion model."""
    m = model.clone()
    counter = {"rows": 0, "calls": 0}

    def wrapper(executor, x, *args, **kwargs):
        counter["rows"] += x.shape[0]
        counter["calls"] += 1
        return executor(x, *args, **kwargs)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.count_rows", wrapper)
    return m, counter


def rank1_lora(model, keys) -> dict:
    """A rank-1 LoRA (lora_up/lora_down, all 0.1) on the ``keys`` (module paths under diffusion_model.) of ``model``."""
    sd = model.model.state_dict()
    lora = {}
    for key in keys:
        out_f, in_f = sd[f"diffusion_model.{key}.weight"].shape
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.full((out_f, 1), 0.1)
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.full((1, in_f), 0.1)
    return lora


@contextlib.contextmanager
def running_block(dm, blocks):
    """Which block of ``dm`` runs now, set by forward hooks on every block (test-side ground truth for the pack's
    layer tracking): ``blocks`` = ((attribute of a block list, name), ...); now["block"] = (name, i) or None."""
    now = {"block": None}
    handles = []
    for attr, name in blocks:
        for i, block in enumerate(getattr(dm, attr)):
            handles.append(block.register_forward_pre_hook(lambda *_a, key=(name, i): now.update(block=key)))
            handles.append(block.register_forward_hook(lambda *_a: now.update(block=None)))
    try:
        yield now
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def block_contexts(model):
    """Record the text stream (``context``) every Wan block is called with: {block index: [tensor per call]}."""
    seen: dict[int, list] = {}
    handles = []
    for i, block in enumerate(model.model.diffusion_model.blocks):
        def pre(_module, _args, kwargs, i=i):
            seen.setdefault(i, []).append(kwargs["context"].detach().clone())

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def module_inputs(t, template: str):
    """The positional arguments each block's own module is called with (``template``: its path under the
    ModelPatcher's model, "{i}" = block index; read on the base ModelPatcher, so an object patch of a patched clone is
    not in the way): [(block, args)] in call order, tensors cloned."""
    seen: list = []

    def record(_module, args, i):
        seen.append((i, tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args)))

    handles = [t.model.get_model_object(template.format(i=i)).register_forward_pre_hook(
        lambda m, args, i=i: record(m, args, i)) for i in range(len(t.model.model.diffusion_model.blocks))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def patched_block_contexts(t, sample, pos, neg, tgt, layers: str):
    """The Wan blocks' text streams in a plain run and in a TextLayerPatch run on ``layers`` (``sample(t, model,
    pos, neg)`` samples): (plain streams, patched streams, plain latent, patched latent, the patch's report)."""
    from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

    with block_contexts(t.model) as plain:
        ref = sample(t, t.model, pos, neg)
    patched, report = apply_text_layer_patch(t.model, tgt, layers)
    with block_contexts(patched) as seen:
        out = sample(t, patched, pos, neg)
    return plain, seen, ref, out, report

def attention_spy(records: list, now: dict | None = None):
    """An attention override recording, per call: the block running (``now``), the layer the pack counts, the text
    length it stamped, K and V, the chunks' roles and the step."""
    from prompt_anatomy.nodes.core import layers as cl
    from prompt_anatomy.nodes.core import runs

    calls = cl.CallCounter()

    def override(call_next, func, *args, **kwargs):
        to = kwargs["transformer_options"]
        records.append({"running": (now or {}).get("block"), "counted": cl.running_dit_layer(to, calls),
                        "txt": to.get(cl.TXT_LEN_KEY), "k": args[1].clone(), "v": args[2].clone(),
                        "roles": runs.chunk_roles(to), "step": runs.current_step(to)})
        return call_next(*args, **kwargs)

    return override


def patch_rows_check(t, pos, neg, tgt, layer, **kwargs) -> None:
    """TextLayerPatch on ``layer`` from half the steps on: exactly one extra row per patched step (batch 1), a
    changed result, and start 1.0 bit-identical to the plain run (4 steps)."""
    from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

    plain, plain_rows = count_rows(t.model)
    out_a = ksample(plain, pos, neg, steps=4, **kwargs)
    m, _ = apply_text_layer_patch(t.model, tgt, (layer,), start_percent=0.5)
    counted, rows = count_rows(m)
    out_p = ksample(counted, pos, neg, steps=4, **kwargs)
    assert rows["rows"] == plain_rows["rows"] + 2 and not torch.equal(out_a, out_p)
    m0, _ = apply_text_layer_patch(t.model, tgt, (layer,), start_percent=1.0)
    assert torch.equal(ksample(m0, pos, neg, steps=4, **kwargs), out_a)


def patched_kv_records(t, pos, neg, tgt, layer, **kwargs) -> list[tuple[dict, int, int]]:
    """Sample 2 steps with TextLayerPatch on ``layer`` over an attention spy installed before it; returns, per
    attention call that carries target rows, (record, source row, target row) for each positive row and the
    target row made for it (paired in order, as many of each)."""
    from prompt_anatomy.nodes.core import hooks, runs
    from prompt_anatomy.nodes.core import layers as cl
    from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

    base = t.model.clone()
    runs.ensure_run_tracking(base)
    cl.ensure_layer_tracking(base, cl.model_layers(base, "test"))
    inner: list = []
    hooks.chain_attention_override(base, attention_spy(inner))
    m, _ = apply_text_layer_patch(base, tgt, (layer,))
    ksample(m, pos, neg, steps=2, **kwargs)
    out = []
    for r in inner:
        if r["counted"] is None or None not in r["roles"]:
            continue
        per = r["k"].shape[0] // len(r["roles"])
        src = [j * per for j, role in enumerate(r["roles"]) if role == "positive"]
        tgt_rows = [j * per for j, role in enumerate(r["roles"]) if role is None]
        out.extend((r, s, g) for s, g in zip(src, tgt_rows, strict=True))
    return out


def capture_check(t, pos, neg, steps: int = 3, **kwargs):
    """CrossAttentionCapture of every layer: sampling bit-identical to the plain run; returns the recorded run."""
    from prompt_anatomy.nodes.attention import capture as cap

    ref = ksample(t.model, pos, neg, steps=steps, **kwargs)
    m, handle = cap.install_capture(t.model, "all", buckets=steps)
    assert torch.equal(ksample(m, pos, neg, steps=steps, **kwargs), ref)
    (run,) = handle.runs
    return run
