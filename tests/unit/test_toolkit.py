"""The patch toolkit proven on real ComfyUI sampling with tiny models."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch
from comfy.patcher_extension import WrappersMP
from pa_support import ksample, tiny
from prompt_anatomy.nodes.core import families, hooks, runs
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.core.errors import InternalError


def record_calls(model):
    """Clone with run tracking and an APPLY_MODEL wrapper recording every model call."""
    m = model.clone()
    runs.ensure_run_tracking(m)
    calls = []

    def rec(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        to = transformer_options
        calls.append({
            "step": runs.current_step(to),
            "sigma": float(t.reshape(-1)[0]),
            "roles": runs.chunk_roles(to),
            "rows": x.shape[0],
            "mask": runs.row_mask(to, x.shape[0]),
            "ctx": None if c_crossattn is None else c_crossattn.clone(),
            "run": runs.run_state(to),
        })
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.rec", rec)
    return m, calls


@pytest.fixture(scope="module")
def conds(sd1):
    return sd1.encode("a red square on a blue background"), sd1.encode("")


# --------------------------------------------------------------------------- step arithmetic
def expected_steps(sampler: str, n: int) -> list[int]:
    if sampler == "heun":  # corrector at sigmas[i+1] except on the last step
        return [s for i in range(n) for s in ([i, i] if i < n - 1 else [i])]
    if sampler in ("dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde"):  # corrector at a midpoint sigma
        return [s for i in range(n) for s in ([i, i] if i < n - 1 else [i])]
    return list(range(n))


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "dpm_2", "euler_ancestral", "dpmpp_sde"])
def test_step_index_matches_sampler_step(sd1, conds, sampler):
    m, calls = record_calls(sd1.model)
    n = 6
    ksample(m, *conds, steps=n, sampler=sampler)
    assert [c["step"] for c in calls] == expected_steps(sampler, n)


def test_step_index_heunpp2_three_evaluations(sd1, conds):
    m, calls = record_calls(sd1.model)
    ksample(m, *conds, steps=5, sampler="heunpp2")
    # heun++: 3 evals per step (2 at sigma >= next sigma), heun on the penultimate, euler on the last
    assert [c["step"] for c in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4]


def test_step_index_with_denoise_below_one(sd1, conds):
    m, calls = record_calls(sd1.model)
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))}
    ksample(m, *conds, steps=8, denoise=0.5, latent=latent)
    steps = [c["step"] for c in calls]
    assert steps == list(range(8))  # relative to the truncated schedule actually sampled
    run = calls[0]["run"]
    assert len(run.sample_sigmas) == 9 and runs.total_steps({"sample_sigmas": run.sample_sigmas}) == 8


def test_sigma_step_index_without_tracking():
    ss = torch.tensor([14.6, 8.0, 3.0, 1.0, 0.0])
    assert [runs.sigma_step_index(ss, s) for s in (14.6, 8.0, 5.0, 3.0, 1.0, 0.5)] == [0, 1, 1, 2, 3, 3]
    assert runs.current_step({"sample_sigmas": ss, "sigmas": torch.tensor([3.0])}) == 2
    assert runs.current_step({"sigmas": torch.tensor([3.0])}) is None


# --------------------------------------------------------------------------- cutoff resolution
def test_resolve_cutoff_units():
    ss = torch.linspace(10, 0, 11)  # 10 steps, sigma_i = 10 - i
    assert runs.resolve_cutoff_step(0.5, "fraction", ss) == 5
    assert runs.resolve_cutoff_step(0.55, "fraction", ss) == 6
    assert runs.resolve_cutoff_step(1.0, "fraction", ss) == 10
    assert runs.resolve_cutoff_step(2.0, "fraction", ss) == 10
    assert runs.resolve_cutoff_step(0.0, "fraction", ss) == 0
    assert runs.resolve_cutoff_step(7, "step", ss) == 7
    assert runs.resolve_cutoff_step(4.0, "sigma", ss) == 6
    assert runs.resolve_cutoff_step(0.5, "sigma", ss) == 10


@pytest.mark.parametrize("cutoff,unit,msg", [
    (-0.1, "fraction", "negative"), (-1, "step", "negative"), (11, "step", "beyond the last step"),
    (2.5, "step", "whole step"), (0.0, "sigma", "must be > 0"), (-3.0, "sigma", "must be > 0"),
    (float("nan"), "fraction", "finite"), (0.5, "percent", "cutoff_unit"),
])
def test_bad_cutoff_raises_clear_error(cutoff, unit, msg):
    with pytest.raises(ValueError, match=msg):
        runs.resolve_cutoff_step(cutoff, unit, torch.linspace(10, 0, 11))


# --------------------------------------------------------------------------- rows by uuid
def test_rows_by_uuid_negative_of_different_length_batch3(sd1):
    long_prompt = ", ".join(["a very detailed red square with a thin golden outline"] * 12)  # > 77 tokens
    pos, neg = sd1.encode(long_prompt), sd1.encode("blurry")
    assert pos[0][0].shape[1] == 154 and neg[0][0].shape[1] == 77
    m, calls = record_calls(sd1.model)
    ksample(m, pos, neg, steps=3, batch=3)
    assert len(calls) == 3
    for c in calls:
        assert c["rows"] == 6 and sorted(c["roles"]) == ["negative", "positive"]
        ctx, mask = c["ctx"], c["mask"]
        assert int(mask.sum()) == 3
        for r in range(6):  # positive rows carry the positive context; negative rows the repeated negative
            want = pos[0][0][0] if mask[r] else neg[0][0][0].repeat(2, 1)
            assert torch.equal(ctx[r], want)


def test_rows_when_uncond_and_cond_run_separately(sd3):
    # SD3 (CONDRegular) cannot batch contexts of different length: positive and negative run as
    # separate model calls. The roles still come out right.
    pos = sd3.encode(", ".join(["a big green triangle"] * 20))
    neg = sd3.encode("")
    m, calls = record_calls(sd3.model)
    ksample(m, pos, neg, steps=2, channels=16, batch=2)
    assert [c["roles"] for c in calls] == [["negative"], ["positive"], ["negative"], ["positive"]] or \
        [c["roles"] for c in calls] == [["positive"], ["negative"], ["positive"], ["negative"]]
    for c in calls:
        assert c["mask"].tolist() == [c["roles"] == ["positive"]] * 2


def test_row_mask_multiple_of_batch():
    to = {"uuids": ["n", "p"], "cond_or_uncond": [1, 0]}
    assert runs.row_mask(to, 4).tolist() == [False, False, True, True]
    assert runs.row_mask(to, 8, roles=("negative",)).tolist() == [True] * 4 + [False] * 4
    with pytest.raises(InternalError, match="internal error: 3 rows cannot be split into 2"):  # a bug, not user input
        runs.row_mask(to, 3)


# --------------------------------------------------------------------------- per-run stores
def test_run_store_is_fresh_each_run_and_finishers_run(sd1, conds):
    m = sd1.model.clone()
    runs.ensure_run_tracking(m)
    seen, finished = [], []

    def count(executor, x, t, *args, **kwargs):
        run = runs.run_state(kwargs.get("transformer_options") or args[-1])
        store = run.store("test.count", lambda: {"n": 0})
        if store["n"] == 0:
            run.on_finish(lambda r: finished.append(r.peek("test.count")["n"]))
        store["n"] += 1
        seen.append(run)  # the objects, not id(): ids of collected objects get reused
        return executor(x, t, *args, **kwargs)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.count", count)
    ksample(m, *conds, steps=3)
    ksample(m, *conds, steps=4)
    assert finished == [3, 4]
    assert len({id(r) for r in seen}) == 2  # two runs, two RunStates
    # the run key never stays behind in the patcher's options, and a clone without our wrappers is clean
    assert runs.RUN_KEY not in m.model_options.get("transformer_options", {})
    plain = sd1.model.clone()
    assert not plain.get_wrappers(WrappersMP.OUTER_SAMPLE, runs.RUN_WRAPPER_KEY)


def test_ensure_run_tracking_is_idempotent(sd1):
    m = sd1.model.clone()
    runs.ensure_run_tracking(m)
    runs.ensure_run_tracking(m)
    for wt in (WrappersMP.OUTER_SAMPLE, WrappersMP.SAMPLER_SAMPLE, WrappersMP.PREDICT_NOISE):
        assert len(m.get_wrappers(wt, runs.RUN_WRAPPER_KEY)) == 1


def test_tracking_leaves_latent_bit_identical(sd1, conds):
    ref = ksample(sd1.model, *conds, steps=4, sampler="heun")
    m, _ = record_calls(sd1.model)
    assert torch.equal(ksample(m, *conds, steps=4, sampler="heun"), ref)


# --------------------------------------------------------------------------- chained single slots
def test_attention_override_chains_previous(sd1, conds):
    ref = ksample(sd1.model, *conds, steps=2)
    m = sd1.model.clone()
    order = []

    def foreign(func, *args, **kwargs):  # e.g. another pack's override, installed first
        order.append("foreign")
        assert kwargs.get("_inside_attn_wrapper") is True
        return func(*args, **kwargs)

    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = foreign

    def ours(call_next, func, *args, **kwargs):
        order.append("ours")
        assert "transformer_options" in kwargs
        return call_next(*args, **kwargs)

    hooks.chain_attention_override(m, ours)
    out = ksample(m, *conds, steps=2)
    assert torch.equal(out, ref)
    n_attn = order.count("ours")
    assert n_attn > 0 and order == ["ours", "foreign"] * n_attn
    # the original patcher still has no override: clone-then-patch
    assert "optimized_attention_override" not in sd1.model.model_options.get("transformer_options", {})


def test_model_function_wrapper_and_cfg_function_chain(sd1, conds):
    ref = ksample(sd1.model, *conds, steps=2)
    m = sd1.model.clone()
    log = []

    def first(apply_model, args):
        log.append("first")
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(first)
    hooks.chain_model_function_wrapper(m, lambda apply, args: (log.append("second"),
                                                                 apply(args["input"], args["timestep"], **args["c"]))[1])
    hooks.chain_sampler_cfg_function(m, lambda args, previous: (log.append("cfg"), previous(args))[1])
    out = ksample(m, *conds, steps=2)
    assert log == ["second", "first", "cfg"] * 2
    assert torch.allclose(out, ref, atol=1e-5)


def test_like_follows_reference_device_and_dtype():
    ref = torch.zeros(2, dtype=torch.bfloat16)
    assert hooks.like(torch.ones(2), ref).dtype == torch.bfloat16


def test_all_samplers_listed_in_comfy_are_known():
    # guards the sampler table: a new 2nd-order sampler evaluating at the next sigma would need an entry
    assert "heun" in comfy.samplers.KSampler.SAMPLERS and "heunpp2" in comfy.samplers.KSampler.SAMPLERS


def test_tiny_families_sample(sd2, sdxl, flux):
    for t in (sd2, sdxl, flux):
        pos, neg = t.encode("a cat"), t.encode("")
        out = ksample(t.model, pos, neg, steps=2, channels=t.latent_channels, cfg=1.0 if t.family == "flux" else 4.0)
        assert torch.isfinite(out).all()
    assert tiny("sd1") is tiny("sd1")


# --------------------------------------------------------------------------- families and layers
def test_model_family_of_every_tiny_model(sd1, sd2, sdxl, sd3, flux):
    assert [families.lookup(t.model).name for t in (sd1, sd2, sdxl, sd3, flux)] == ["sd1", "sd2", "sdxl", "sd3", "flux"]


def test_unet_attn2_layers_in_forward_order(sd1, sdxl):
    assert list(cl.model_layers(sd1.model, "test").layers) == [
        ("input", 1, 0), ("input", 3, 0), ("middle", 0, 0),
        ("output", 0, 0), ("output", 1, 0), ("output", 2, 0), ("output", 3, 0)]
    layers = cl.model_layers(sdxl.model, "test").layers
    assert ("input", 3, 1) in layers and len(layers) == len(set(layers)) == 10  # depth 2 at the 2nd level
    assert cl.model_layers(tiny("sd3").model, "test").kind == "dit"


def _record_layers(model, conds, **kw):
    m = model.clone()
    ml = cl.model_layers(m, "test")
    cl.ensure_layer_tracking(m, ml)
    cl.ensure_layer_tracking(m, ml)  # idempotent
    seen = []

    def spy(call_next, func, *args, **kwargs):
        to = kwargs["transformer_options"]
        seen.append((cl.current_attn2_layer(to), to.get(cl.LAYER_KEY) if not isinstance(
            to.get(cl.LAYER_KEY), cl.Marker) else None, to.get(cl.TXT_LEN_KEY), args[1].shape[1]))
        return call_next(*args, **kwargs)

    hooks.chain_attention_override(m, spy)
    out = ksample(m, *conds, **kw)
    return m, seen, out


def test_unet_cross_attention_is_flagged_inside_the_override(sd1, conds):
    ref = ksample(sd1.model, *conds, steps=2)
    m, seen, out = _record_layers(sd1.model, conds, steps=2)
    assert torch.equal(out, ref)
    cross = [layer for layer, _, _, k_len in seen if layer is not None]
    self_attn = [k_len for layer, _, _, k_len in seen if layer is None]
    assert cross == list(cl.model_layers(sd1.model, "test").layers) * 2  # every attn2, both steps, in order
    assert len(self_attn) == len(cross) and all(k != 77 for k in self_attn)
    assert all(k_len == 77 for layer, _, _, k_len in seen if layer is not None)
    assert len(m.model_options["transformer_options"]["patches"]["attn2_patch"]) == 1
    # a clone gets its own flag object
    assert m.clone().model_options["transformer_options"][cl.LAYER_KEY] is not \
        m.model_options["transformer_options"][cl.LAYER_KEY]


@pytest.mark.parametrize("family,txt_len", [("sd3", 77), ("flux", 256)])
def test_dit_blocks_are_stamped(family, txt_len):
    t = tiny(family)
    conds_ = (t.encode("a cat"), t.encode("a cat"))
    ref = ksample(t.model, *conds_, steps=2, channels=16, cfg=1.0)
    m, seen, out = _record_layers(t.model, conds_, steps=2, channels=16, cfg=1.0)
    assert torch.equal(out, ref)
    blocks = [b for _, b, _, _ in seen]
    assert blocks == list(cl.model_layers(t.model, "test").layers) * 2
    assert {n for _, _, n, _ in seen} == {txt_len}


def test_dit_stamp_chains_a_previous_block_replace(sd3):
    m = sd3.model.clone()
    calls = []

    def previous(args, extra):
        calls.append(args["transformer_options"].get(cl.LAYER_KEY))
        return extra["original_block"](args)

    m.set_model_patch_replace(previous, "dit", "double_block", 1)
    cl.ensure_layer_tracking(m, cl.model_layers(m, "test"))
    ksample(m, sd3.encode("a"), sd3.encode("a"), steps=1, channels=16, cfg=1.0)
    assert calls == [("joint", 1)]


def _callback_truth(events: list) -> list[int]:
    """Ground truth of each evaluation's step from the order of evaluations and callbacks: k-diffusion samplers call
    the callback of step i right after its first evaluation, so an evaluation directly followed by callback i is
    step i's first, and any other evaluation belongs to the step whose callback fired last (its correctors)."""
    truth, last = [], 0
    for k, (kind, value) in enumerate(events):
        if kind == "cb":
            last = value
        elif kind == "eval":
            nxt = events[k + 1] if k + 1 < len(events) else None
            truth.append(nxt[1] if nxt is not None and nxt[0] == "cb" else last)
    return truth


@pytest.mark.parametrize("sampler", comfy.samplers.KSampler.SAMPLERS)
def test_every_model_call_of_a_step_belongs_to_that_step(sd1, conds, sampler):
    """Midpoint evaluations (dpm_2_ancestral, dpmpp_2s_ancestral, ...) can run below the next step's sigma; they
    still belong to the step in progress, for every sampler ComfyUI offers."""
    if sampler in ("dpm_fast", "dpm_adaptive"):  # they pick their own sigmas: no schedule step to belong to
        pytest.skip(f"{sampler} does not step along the schedule")
    events = []
    m = sd1.model.clone()
    runs.ensure_run_tracking(m)

    def rec(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        events.append(("eval", runs.current_step(transformer_options)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    def callbacks(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
        def spy(step, x0, x, total_steps):
            events.append(("cb", int(step)))
            if callback is not None:
                return callback(step, x0, x, total_steps)

        return executor(guider, sigmas, extra_args, spy, *args, **kwargs)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.rec", rec)
    m.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, "test.callbacks", callbacks)
    ksample(m, *conds, steps=5, sampler=sampler, scheduler="karras")
    steps = [v for kind, v in events if kind == "eval"]
    assert [v for kind, v in events if kind == "cb"] == list(range(5))  # one callback per schedule step
    assert steps == _callback_truth(events), events
