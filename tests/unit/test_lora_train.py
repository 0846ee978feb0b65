"""nodes/text_layers/lora_train.py on the shipped demo model: core's LoRA trainer restricted to chosen
cross-attention layers. One training run (module fixture) is checked for its keys, its loss, the base
model's bit-identity, and loading through core's LoRA loader."""

from __future__ import annotations

import re

import comfy.lora
import comfy.sd
import comfy.utils
import pytest
import safetensors
import torch
from prompt_anatomy.nodes import demo_model as dm
from prompt_anatomy.nodes.text_layers import lora_train as lt

import nodes as comfy_nodes

BLOCKS = ["diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.",
          "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2."]
STEPS = 32
pytestmark = pytest.mark.slow  # two 32-step CPU trainings: ~30 s on a quiet 2-core machine


@pytest.fixture(scope="module")
def loaded():
    return dm.load_demo_model()


@pytest.fixture(scope="module")
def demo(loaded):
    model, clip, vae = loaded
    (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, "a red star")
    (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
    # a target the model does not draw for this prompt: plain blue images, so there is something to learn
    with torch.inference_mode():
        (latent,) = comfy_nodes.VAEEncode().encode(vae, torch.tensor([0.1, 0.2, 0.9]).expand(2, 64, 64, 3))
    return model, pos, neg, latent


def _snapshot(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}, \
        {n: p.requires_grad for n, p in model.model.named_parameters()}


@pytest.fixture(scope="module")
def trained(demo):
    model, pos, _, latent = demo
    weights, grads = _snapshot(model)
    rng = torch.get_rng_state()
    lora, losses = lt.train_text_layer_lora(model, latent, pos, BLOCKS, steps=STEPS, rank=4, learning_rate=3e-2,
                                            seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG moved"
    # the same run without learning: identical sigmas, noise and batches, so the loss ratio isolates learning
    _, baseline = lt.train_text_layer_lora(model, latent, pos, BLOCKS, steps=STEPS, rank=4, learning_rate=0.0,
                                           seed=0)
    return lora, losses, baseline, weights, grads


def test_only_the_chosen_layers_have_keys(trained, demo):
    lora = trained[0]
    assert lt.lora_keys_outside(lora, BLOCKS) == []
    modules = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in lora}
    modules = {m.removesuffix(".lora_up").removesuffix(".lora_down") for m in modules}
    assert modules == {p + t for p in BLOCKS for t in lt.ATTENTION_TARGETS}
    assert len(lora) == 3 * len(modules)
    for key, value in lora.items():
        if key.endswith(".alpha"):
            assert value.item() == 1.0
        else:
            assert value.shape[0 if key.endswith("lora_down.weight") else 1] == 4
    k_only = lt.select_modules(demo[0], BLOCKS[:1], targets=("to_k", "to_v"))
    assert sorted(k_only) == [BLOCKS[0] + "to_k", BLOCKS[0] + "to_v"]


def test_loss_falls(trained):
    _, losses, baseline = trained[:3]
    assert len(losses) == len(baseline) == STEPS and all(map(torch.isfinite, map(torch.tensor, losses)))
    # The per-step loss is dominated by the random sigma of each step, so it is compared window by window
    # with the same run without learning (identical sigmas, noise and batches): relative to it the loss
    # falls from ~1 in the first window to clearly below 1 in the last (measured 0.74-0.78 over 40 steps).
    window = STEPS // 4
    first = sum(losses[:window]) / sum(baseline[:window])
    last = sum(losses[-window:]) / sum(baseline[-window:])
    assert first > 0.9 and last < 0.9 and last < first, (losses, baseline)


def test_base_model_is_bit_identical_and_has_no_adapter_left(trained, demo):
    model = demo[0]
    weights, grads = trained[3], trained[4]
    now = model.model.state_dict()
    assert set(now) == set(weights) and all(torch.equal(now[k], weights[k]) for k in weights)
    assert {n: p.requires_grad for n, p in model.model.named_parameters()} == grads
    for name, m in model.model.named_modules():
        assert not getattr(m, "weight_function", []) and not getattr(m, "bias_function", []), name
    assert not model.weight_wrapper_patches and not model.patches


def test_saved_file_loads_through_core_and_changes_output_only_with_strength(trained, demo, tmp_path):
    model, pos, neg, _ = demo
    lora = trained[0]
    path = lt.save_lora(lora, tmp_path / "text_layers.safetensors", {"prefixes": BLOCKS, "rank": 4})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata()["rank"] == "4" and f.metadata()["prefixes"].startswith("[")
    loaded = comfy.utils.load_torch_file(str(path), safe_load=True)  # what core LoraLoader does
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(loaded, key_map)
    assert sorted(patches) == sorted(p + t + ".weight" for p in BLOCKS for t in lt.ATTENTION_TARGETS)

    def sample(m):
        (lat,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(m, 1, 3, 5.0, "euler", "normal", pos, neg, lat)[0]["samples"]

    base = sample(model)
    zero, _ = comfy.sd.load_lora_for_models(model, None, loaded, 0.0, 0.0)
    one, _ = comfy.sd.load_lora_for_models(model, None, loaded, 1.0, 0.0)
    assert torch.equal(sample(zero), base)
    assert not torch.allclose(sample(one), base, atol=1e-4)
    assert torch.equal(sample(model), base)  # the LoRA clone left the base model alone


def test_trains_a_model_loaded_as_the_server_loads_it():
    """ComfyUI executes prompts under torch.inference_mode, so a loaded model's weights are inference tensors;
    training must work on them and give back their requires_grad flags."""
    with torch.inference_mode():
        model, clip, vae = dm.load_demo_model()
        (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, "a red star")
        (latent,) = comfy_nodes.VAEEncode().encode(vae, torch.full((1, 64, 64, 3), 0.5))
    params = list(model.model.parameters())
    assert params[0].is_inference()
    flags = [p.requires_grad for p in params]
    weights, _ = _snapshot(model)
    with torch.inference_mode():  # as the node runs
        lora, losses = lt.train_text_layer_lora(model, latent, pos, BLOCKS[:1], steps=2, rank=2, seed=0)
    assert len(losses) == 2 and lora
    assert [p.requires_grad for p in model.model.parameters()] == flags
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in weights.items())
    assert not [n for n, m in model.model.named_modules() if getattr(m, "weight_function", None)
                or getattr(m, "bias_function", None)], "a weight wrapper stayed on the shared modules"


def test_clear_errors(demo):
    model, pos, _, latent = demo
    with pytest.raises(ValueError, match="weight_prefixes: none of"):
        lt.train_text_layer_lora(model, latent, pos, ["diffusion_model.output_blocks.99."], steps=1)
    with pytest.raises(ValueError, match="weight_prefixes: give a non-empty list"):
        lt.train_text_layer_lora(model, latent, pos, BLOCKS[0], steps=1)
    with pytest.raises(ValueError, match="positive: 3 conditionings for 2 latents"):
        lt.train_text_layer_lora(model, latent, pos * 3, BLOCKS, steps=1)
    with pytest.raises(ValueError, match="at least 1"):
        lt.train_text_layer_lora(model, latent, pos, BLOCKS, steps=0)


def test_snr_of_sigmas_follows_each_models_noise_mixing(demo):
    import comfy.model_sampling as ms

    sigmas = torch.tensor([0.5, 1.0, 2.0])
    eps = lt.snr_of_sigmas(demo[0].model.model_sampling, sigmas)  # SD1.x: x_t = x0 + sigma * eps
    assert torch.allclose(eps, 1.0 / sigmas ** 2)
    flow = lt.snr_of_sigmas(ms.CONST(), torch.tensor([0.25, 0.5, 0.8]))  # x_t = (1 - s) x0 + s * eps
    assert torch.allclose(flow, torch.tensor([9.0, 1.0, 0.0625]))


def test_min_snr_mse_weighs_each_sample_by_its_capped_snr():
    loss = lt.MinSnrMSE(gamma=5.0)
    pred, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2) * torch.tensor([1.0, 2.0, 3.0])[:, None, None, None]
    with pytest.raises(RuntimeError, match="internal: MinSnrMSE got no SNR"):
        loss(pred, target)
    loss.snr = torch.tensor([100.0, 5.0, 0.25])  # capped at 5, then as is
    assert loss(pred, target).item() == pytest.approx((5 * 1 + 5 * 4 + 0.25 * 9) / 3)
    loss.snr = torch.tensor([1.0])
    with pytest.raises(RuntimeError, match="for a batch of 3"):
        loss(pred, target)


def test_min_snr_training_weighs_core_samplers_x0_loss_by_the_steps_sigma(demo):
    """Same seed, no learning: each step draws the same sigma, noise and latent under both losses, so the ratio of
    the two per-step losses is that step's min(SNR, 5) = min(1 / sigma^2, 5), with sigma inside the model's range."""
    model, pos, _, latent = demo
    kw = {"steps": 6, "rank": 2, "learning_rate": 0.0, "seed": 3, "batch_size": 1}
    _, plain = lt.train_text_layer_lora(model, latent, pos, BLOCKS[:1], **kw)
    _, weighted = lt.train_text_layer_lora(model, latent, pos, BLOCKS[:1], loss_weighting="min_snr", **kw)
    ratios = [w / p for w, p in zip(weighted, plain, strict=True)]
    sampling = model.model.model_sampling
    lo, hi = float(sampling.sigma_min), float(sampling.sigma_max)
    assert all(0 < r <= 5.0 + 1e-4 for r in ratios) and len({round(r, 4) for r in ratios}) > 1
    assert all(r > 5.0 - 1e-4 or lo <= r ** -0.5 <= hi for r in ratios)
    with pytest.raises(ValueError, match="loss_weighting: 'eps' is not one of x0, min_snr"):
        lt.train_text_layer_lora(model, latent, pos, BLOCKS[:1], steps=1, loss_weighting="eps")


def _rows_seen(model, latents, positive, batch_size):
    """Train 2 steps (lr 0) and record every model row: (which latent, by its mean, as the sampler scales it;
    which captions its context equals). The model answers each row with its latent's clean x0 exactly, so every
    step's loss is 0 only if the trainer puts the answers back in the batch's order. Returns (rows, losses)."""
    captions = [c[0] for c in positive]
    clean = model.model.process_latent_in(latents)
    means = clean.mean((1, 2, 3))  # far apart: the noise moves a mean by < 1
    seen = []

    def record(apply_model, args):
        x, ctx = args["input"], args["c"]["c_crossattn"]
        latent = [int((means - x[row].mean()).abs().argmin()) for row in range(x.shape[0])]
        for row, k in enumerate(latent):
            seen.append((k, [j for j, c in enumerate(captions) if torch.equal(ctx[row], c[0].to(ctx))]))
        out = apply_model(args["input"], args["timestep"], **args["c"])  # keeps the graph to the LoRA
        return out * 0 + clean[latent].to(out)

    m = model.clone()
    m.set_model_unet_function_wrapper(record)
    _, losses = lt.train_text_layer_lora(m, latents, positive, BLOCKS[:1], steps=2, rank=2, learning_rate=0.0,
                                         seed=0, batch_size=batch_size)
    return seen, losses


def test_each_latent_is_denoised_under_its_own_caption_only(demo, loaded):
    """Core's TrainSampler hands a batch's captions to the sampler as one list of conds, which ComfyUI combines:
    every latent under every caption of the batch, averaged. Here: one row per latent per step, with its caption."""
    model, clip = demo[0], loaded[1]
    prompts = ['a sign that says "CAT"', 'a sign that says "DOG"', "a red star", "a blue heart"]
    positive = [comfy_nodes.CLIPTextEncode().encode(clip, p)[0][0] for p in prompts]
    latents = torch.arange(4.0).mul(100).view(4, 1, 1, 1).expand(4, 4, 8, 8)  # latent k is 100 * k everywhere
    seen, losses = _rows_seen(model, latents, positive, batch_size=4)
    assert len(seen) == 2 * 4  # core's own step: 2 * 4 * 4 rows
    assert sorted(seen) == [(k, [k]) for k in range(4) for _ in range(2)]
    assert losses == [0.0, 0.0]


def test_one_conditioning_for_every_latent_runs_the_batch_once(demo):
    model, pos = demo[0], demo[1]
    latents = torch.arange(3.0).mul(100).view(3, 1, 1, 1).expand(3, 4, 8, 8)
    seen, losses = _rows_seen(model, latents, pos, batch_size=3)
    assert sorted(seen) == [(k, [0]) for k in range(3) for _ in range(2)] and losses == [0.0, 0.0]
    assert lt.caption_groups(pos * 3) == [0, 0, 0]


def test_interleaved_captions_get_their_predictions_back_in_the_batchs_order(demo):
    """Captions a, b, a, b: two groups whose rows interleave, so the answers must be put back in order."""
    model, pos, neg = demo[0], demo[1], demo[2]
    latents = torch.arange(4.0).mul(100).view(4, 1, 1, 1).expand(4, 4, 8, 8)
    seen, losses = _rows_seen(model, latents, [pos[0], neg[0], pos[0], neg[0]], batch_size=4)
    assert sorted(seen) == [(k, [k % 2, k % 2 + 2]) for k in range(4) for _ in range(2)]
    assert losses == [0.0, 0.0]
    a, b = pos[0], [pos[0][0], dict(pos[0][1])]
    assert lt.caption_groups([a, b, a, b]) == [0, 1, 0, 1]


# ------------------------------------------------------------------ the TextLayerLoraTrain node
NODE_LAYERS = "output.4.0, output.5.0"  # = BLOCKS


@pytest.fixture(scope="module")
def node_runs(demo, tmp_path_factory):
    import folder_paths
    from prompt_anatomy.nodes.text_layers import nodes as tl_nodes
    from prompt_anatomy.nodes.text_layers import train_node

    model, pos, _, latent = demo
    folder = tmp_path_factory.mktemp("loras")
    weights, grads = _snapshot(model)
    calls = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], {".safetensors"})
    folder_paths.filename_list_cache.pop("loras", None)
    try:
        out = tl_nodes.TextLayerLoraTrain.execute(model, latent, pos, NODE_LAYERS, STEPS, 4, 3e-2, 0, "tl/sign")
        progress = list(calls)
        # the control run (learning rate 0, same seed: same noise levels and batches) through the same function
        base = train_node.train(model, latent, pos, NODE_LAYERS, STEPS, 4, 0.0, 0, "tl/sign", str(folder),
                                apply=False)
        lora_out = tl_nodes.LoraLoaderTextLayers.execute(model, out.args[1], 1.0, NODE_LAYERS)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        folder_paths.folder_names_and_paths["loras"] = saved
        folder_paths.filename_list_cache.pop("loras", None)
    return out, base, lora_out, progress, folder, weights, grads


def test_node_trains_only_the_chosen_layers_and_saves_under_loras(node_runs, demo):
    out, base, _, progress, folder, _, _ = node_runs
    model_out, name, plot, report = out.args
    assert name == "tl/sign.safetensors" and base[1] == "tl/sign_00001.safetensors"  # never overwrites
    lora = comfy.utils.load_torch_file(str(folder / name), safe_load=True)
    assert lt.lora_keys_outside(lora, BLOCKS) == [] and len(lora) == 3 * len(BLOCKS) * len(lt.ATTENTION_TARGETS)
    with safetensors.safe_open(str(folder / name), framework="pt") as f:
        meta = f.metadata()
    assert meta["layers"] == '["output.4.0", "output.5.0"]' and meta["prompt_anatomy.node"] == "TextLayerLoraTrain"
    assert progress[-1] == (STEPS, STEPS) and len(progress) == STEPS  # core TrainSampler's bar, one tick per step
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
    assert "8 weight matrices (to_q/to_k/to_v/to_out.0), rank 4" in report and "steps/s" in report
    assert "loss x0, seed 0" in report and meta["loss"] == "x0"  # the default: core TrainSampler's loss
    assert out.ui["text"] == (report,) and len(out.ui["images"]) == 1


def test_node_min_snr_loss_is_recorded_in_the_report_and_the_file(demo, tmp_path):
    from prompt_anatomy.nodes.text_layers import train_node

    model, pos, _, latent = demo
    _, rel, _, report, losses = train_node.train(model, latent, pos, NODE_LAYERS, 2, 2, 1e-3, 0, "snr", str(tmp_path),
                                                 apply=False, loss="min_snr")
    with safetensors.safe_open(str(tmp_path / rel), framework="pt") as f:
        assert f.metadata()["loss"] == "min_snr"
    assert "loss min_snr, seed 0" in report and len(losses) == 2


def _windows(report):
    """(mean loss of the first and of the last quarter of the steps) as the node's report gives them."""
    m = re.search(r"mean of the first \d+ steps ([\d.]+), of the last \d+ ([\d.]+)", report)
    return float(m.group(1)), float(m.group(2))


def test_node_loss_falls_against_the_learning_rate_0_control(node_runs):
    """Same trick as test_loss_falls: the control run has identical noise levels and batches, so the ratio of the
    windows isolates learning (the node's losses are read from its report; the control's agree with its list)."""
    out, base = node_runs[0], node_runs[1]
    (first, last), (base_first, base_last) = _windows(out.args[3]), _windows(base[3])
    window = STEPS // 4
    assert base_first == pytest.approx(sum(base[4][:window]) / window, abs=1e-4)
    assert abs(first / base_first - 1) < 0.1 and last / base_last < 0.9, (out.args[3], base[3])


def test_node_leaves_the_base_model_bit_identical_and_the_file_loads(node_runs, demo):
    out, _, lora_out, _, _, weights, grads = node_runs
    model, pos, neg, _ = demo
    now = model.model.state_dict()
    assert all(torch.equal(now[k], weights[k]) for k in weights)
    assert {n: p.requires_grad for n, p in model.model.named_parameters()} == grads
    assert not model.weight_wrapper_patches and not model.patches
    loaded_model, loaded_report = lora_out.args
    assert "kept 8 of 8 diffusion-model weights" in loaded_report
    # the node's MODEL output = the saved file through LoraLoaderTextLayers' logic
    assert sorted(out.args[0].patches) == sorted(loaded_model.patches) == sorted(
        p + t + ".weight" for p in BLOCKS for t in lt.ATTENTION_TARGETS)


def test_node_errors(demo, tmp_path):
    from prompt_anatomy.nodes.text_layers import train_node

    model, pos, _, latent = demo
    with pytest.raises(ValueError, match="layers: empty"):
        train_node.train(model, latent, pos, "", 1, 4, 1e-3, 0, "x", str(tmp_path))
    with pytest.raises(ValueError, match="lora_name: '../x' is not a usable file name"):
        train_node.train(model, latent, pos, NODE_LAYERS, 1, 4, 1e-3, 0, "../x", str(tmp_path))
    with pytest.raises(ValueError, match="loss must be one of x0, min_snr, got 'eps'"):
        train_node.train(model, latent, pos, NODE_LAYERS, 1, 4, 1e-3, 0, "x", str(tmp_path), loss="eps")


def test_trains_a_dit_loaded_as_the_server_loads_it():
    """The inference-tensor case on a DiT (SD3's joint blocks, LoRA on every attention weight of the block):
    training works, and every original tensor is back in place."""
    import tiny_models
    from prompt_anatomy.nodes.core.layers import model_layers, weight_prefixes

    with torch.inference_mode():
        t = tiny_models.make("sd3")
        pos = t.encode("a red star")
        latent = {"samples": torch.zeros(1, 16, 8, 8)}
    ml = model_layers(t.model, "test")
    before = dict(t.model.model.named_parameters()) | dict(t.model.model.named_buffers())
    assert all(x.is_inference() for x in before.values())
    with torch.inference_mode():
        lora, losses = lt.train_text_layer_lora(t.model, latent, pos, list(weight_prefixes(ml, ml.layers[0])),
                                                steps=2, rank=2, seed=0, targets=None)
    assert len(losses) == 2 and lora
    after = dict(t.model.model.named_parameters()) | dict(t.model.model.named_buffers())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_node_refuses_families_whose_blocks_cannot_be_trained(family, tmp_path):
    """Flux-style blocks update activations in place, so backward fails: the node says so before training."""
    import tiny_models
    from prompt_anatomy.nodes.text_layers import train_node

    t = tiny_models.make(family)
    with pytest.raises(ValueError, match=r"cannot train a LoRA on .*in place.*TextLayerPatch"):
        train_node.train(t.model, {"samples": torch.zeros(1, 16, 8, 8)}, t.encode("a"), "all", 1, 2, 1e-3, 0,
                         "x", str(tmp_path))
