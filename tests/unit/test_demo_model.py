"""PromptAnatomyDemoLoader: builds MODEL / CLIP / VAE from ComfyUI classes and weight files, and the core
nodes run on them. The weights are written by scripts/train_mini.py's own exporter after 0 training steps
(its initial weights), so the test checks the shipped format without needing trained weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import comfy.sd
import comfy.sd1_clip
import pytest
import safetensors
import safetensors.torch
import torch
from prompt_anatomy.nodes import demo_model as dm
from prompt_anatomy.nodes.core import families
from prompt_anatomy.nodes.shared import tokens as pa_tokens
from prompt_anatomy.nodes.text_layers import nodes as tl_nodes

import nodes as comfy_nodes

ROOT = Path(__file__).resolve().parents[2]


def _train_mini():
    import train_mini  # scripts/ is on sys.path (conftest.py)

    return train_mini


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    paths = _train_mini().export_untrained(out, seed=0)
    return out, paths


@pytest.fixture(scope="module")
def loaded(weights):
    return dm.load_demo_model(weights[0])


def test_files_carry_format_and_config_and_fit_the_size_budget(weights):
    out, paths = weights
    assert set(paths) == {"unet", "text_encoder", "vae", "judge"}
    total = 0
    for comp, path in paths.items():
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert meta["format"] == dm.FORMAT and meta["format_version"] == dm.FORMAT_VERSION
        json.loads(meta["config"])
        assert json.loads(meta["training"])["steps"] == 0
        if comp != "judge":
            assert dtypes == {torch.float16}, comp
        total += path.stat().st_size
    assert total <= 30 * 1024 * 1024, f"{total / 1e6:.1f} MB of weights: over the 30 MB budget"


def test_loader_builds_comfy_classes_of_the_sd1_family(loaded):
    model, clip, vae = loaded
    assert families.lookup(model).name == "sd1"
    assert type(model.model.model_config).__name__ == "SD15"
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(clip.cond_stage_model, comfy.sd1_clip.SD1ClipModel)
    assert isinstance(clip.tokenizer, comfy.sd1_clip.SD1Tokenizer)
    assert isinstance(vae, comfy.sd.VAE) and vae.latent_channels == 4 and vae.downscale_ratio == 8
    dmodel = model.model.diffusion_model
    assert dmodel.in_channels == 4 and dmodel.model_channels == dm.UNET_CONFIG["model_channels"]
    # cross-attention (attn2) at three resolutions: 8x8 and 4x4 latents (input/output blocks), 2x2 (middle)
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.add(args[0].shape[1]))
             for name, m in dmodel.named_modules() if name.endswith("attn2")]
    try:
        with torch.no_grad():
            dmodel(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), context=torch.zeros(1, 77, 64))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {64, 16, 4}
    # the EOS swap sees the SD1.x layout: CLIP-L pads with [EOS]
    assert pa_tokens.detect_layout(clip).family.name == "sd1"


def test_tokenizer_is_clip_bpe_with_77_tokens_padded_with_eos(loaded):
    _, clip, _ = loaded
    ids = [t[0] for t in clip.tokenize("a red star")["l"][0]]
    assert len(ids) == 77
    assert ids[:5] == [49406, 320, 736, 1565, 49407]  # [SOS] a red star [EOS]
    assert set(ids[4:]) == {49407}  # padded with [EOS], like SD1.x


def test_loaded_weights_equal_the_files(weights, loaded):
    out, paths = weights
    model, clip, vae = loaded
    unet_sd = safetensors.torch.load_file(str(paths["unet"]))
    ours = model.model.diffusion_model.state_dict()
    assert set(unet_sd) == set(ours)
    k = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(ours[k].float(), unet_sd[k].float())
    te_sd = safetensors.torch.load_file(str(paths["text_encoder"]))
    key = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
    assert torch.equal(clip.cond_stage_model.state_dict()[key].float(), te_sd[key].float())
    vae_sd = safetensors.torch.load_file(str(paths["vae"]))
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert set(vae_sd) == set(vae.first_stage_model.state_dict())
    for key in ("taesd_decoder.19.weight", "taesd_encoder.0.weight", "vae_scale", "vae_shift"):
        assert torch.equal(vae.first_stage_model.state_dict()[key].float(), vae_sd[key].float())


def _generate(model, clip, vae, text="a red star", steps=2, size=64, batch=1):
    (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, text)
    (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
    (latent,) = comfy_nodes.EmptyLatentImage().generate(size, size, batch)
    (out,) = comfy_nodes.KSampler().sample(model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)
    (images,) = comfy_nodes.VAEDecode().decode(vae, out)
    return pos, out["samples"], images


def test_core_nodes_run_on_the_demo_model(loaded):
    model, clip, vae = loaded
    pos, samples, images = _generate(*loaded, steps=2, size=64, batch=2)
    assert pos[0][0].shape == (1, 77, dm.CLIP_CONFIG["hidden_size"])
    assert samples.shape == (2, 4, 8, 8)
    assert images.shape == (2, 64, 64, 3) and torch.isfinite(images).all()
    assert float(images.detach().min()) >= 0.0 and float(images.detach().max()) <= 1.0


def test_node_raises_a_clear_error_when_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "MODEL_DIR", tmp_path / "prompt_anatomy_mini")
    with pytest.raises(ValueError, match=r"weights are missing .*unet\.safetensors.*scripts/train_mini\.py"):
        dm.PromptAnatomyDemoLoader.execute()


def test_node_loads_from_its_model_dir_and_validates_dtype(weights, monkeypatch):
    monkeypatch.setattr(dm, "MODEL_DIR", weights[0])
    out = dm.PromptAnatomyDemoLoader.execute("fp32")
    model, clip, vae = out.args
    assert families.lookup(model).name == "sd1"
    with pytest.raises(ValueError, match="weight_dtype must be one of default, fp32, fp16, bf16"):
        dm.PromptAnatomyDemoLoader.execute("int8")
    schema = dm.PromptAnatomyDemoLoader.define_schema()
    assert schema.node_id == "PromptAnatomyDemoLoader" and schema.category.startswith("prompt_anatomy/")
    assert all(i.tooltip for i in schema.inputs)


def test_wrong_file_is_rejected_with_the_training_hint(weights, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in dm.COMPONENTS.values():
        safetensors.torch.save_file({"w": torch.zeros(1)}, str(bad / name), metadata={"format": "other"})
    with pytest.raises(ValueError, match=r"is not a prompt_anatomy_mini weight file.*train_mini\.py"):
        dm.load_demo_model(bad)


def test_bfloat16_model_samples(weights):
    model, clip, vae = dm.load_demo_model(weights[0], "bf16")
    assert model.model.get_dtype() == torch.bfloat16
    _, samples, images = _generate(model, clip, vae, steps=1, size=32)
    assert samples.shape == (1, 4, 4, 4) and torch.isfinite(images).all()


# ------------------------------------------------------------------ the trainer that makes these weights
def test_training_forward_of_the_text_encoder_equals_comfys():
    tm = _train_mini()
    clip = tm.new_clip(dm, seed=3)
    tm.check_text_forward(clip, ["a red star", "a blue checkered heart and a green circle", ""])  # raises on mismatch
    toks = torch.tensor([tm.token_ids(clip, "a pink cross")])
    with torch.no_grad():
        ours = tm.text_forward(clip.cond_stage_model.clip_l.transformer, toks)
        ref = clip.encode_from_tokens(clip.tokenize("a pink cross")).float()
    assert torch.allclose(ours, ref, atol=1e-5)


def test_latent_standardisation_is_exact_and_gives_sd1_scale():
    tm = _train_mini()
    ae = tm.new_vae(dm, seed=5).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        ae.taesd_encoder[-1].bias.add_(torch.tensor([0.3, -0.2, 0.1, 0.5]))  # latents with a non-zero mean
        before = ae.decode(ae.encode(x))
        stats = tm.standardise_latents_(ae, x)
        z = ae.encode(x)
        after = ae.decode(z)
    assert abs(stats["mean"]) > 0.05
    assert torch.allclose(after, before, atol=1e-5)
    assert abs(float(z.mean())) < 1e-4
    assert abs(float((z * tm.LATENT_SCALE).std()) - 1.0) < 1e-4


def test_new_autoencoder_blocks_start_as_identity_and_train():
    tm = _train_mini()
    from comfy.taesd.taesd import Block

    ae = tm.new_vae(dm, seed=5)
    blocks = [m for m in ae.modules() if isinstance(m, Block)]
    assert len(blocks) == 20 and all(float(b.conv[-1].weight.abs().sum()) == 0 for b in blocks)
    x = torch.rand(2, 64, 8, 8)
    assert torch.equal(blocks[0](x), x)  # ReLU(0 + x) of a post-ReLU input
    g = torch.Generator().manual_seed(0)
    img = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = (ae.decode(ae.encode(img)) - img).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_contrastive_match_matrix():
    tm = _train_mini()
    world = tm.load_env()[1]
    prompts = ["a red star", "a striped star", "a red circle and a blue square", "a star"]
    scenes = [world.scene_for_prompt(p, __import__("random").Random(i)) for i, p in
              enumerate(["a red striped star", "a blue square and a red circle", "a green star"])]
    m = tm.match_matrix(tm.prompt_attributes(world, prompts), tm.scene_attributes(world, scenes))
    assert m.tolist() == [[True, False, False], [True, False, False], [False, True, False], [True, False, True]]


def test_contrastive_match_matrix_with_signs():
    """A sign caption matches images of that word only (plate colour a wildcard unless named; the object beside
    it as a single-object caption); captions without a sign never match a sign image."""
    tm = _train_mini()
    world = tm.load_env()[1]
    prompts = ['a sign that says "CAT"', 'a blue sign that says "CAT"', 'a red star and a sign that says "CAT"',
               'a sign that says "DOG"', "a red star"]
    scenes = [world.scene_for_prompt(p, __import__("random").Random(i)) for i, p in enumerate(
        ['a blue sign that says "CAT"', 'a green sign that says "CAT"', 'a red star and a blue sign that says "CAT"',
         "a red star"])]
    m = tm.match_matrix(tm.prompt_attributes(world, prompts), tm.scene_attributes(world, scenes))
    assert m.tolist() == [[True, True, False, False], [True, False, False, False], [False, False, True, False],
                          [False, False, False, False], [False, False, False, True]]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    tm = _train_mini()

    def make():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 2)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)

    def step_fn(mods, opt, g, s):
        x = torch.randn(8, 4, generator=g)
        loss = (mods[0](x) - x[:, :2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    plan = tm.SMOKE_PLAN
    a = tm.Trainer(plan, tmp_path / "outa", tmp_path / "a", log_every=100)
    net_a, opt_a = make()
    a.run_loop("judge", [net_a], opt_a, 6, lambda s: 1e-2, step_fn)
    b = tm.Trainer(plan, tmp_path / "outb", tmp_path / "b", log_every=100)
    net_b, opt_b = make()
    b.run_loop("judge", [net_b], opt_b, 3, lambda s: 1e-2, step_fn)  # "interrupted" after 3 steps
    b2 = tm.Trainer(plan, tmp_path / "outb", tmp_path / "b", log_every=100)
    net_c, opt_c = make()
    rec = b2.run_loop("judge", [net_c], opt_c, 6, lambda s: 1e-2, step_fn)
    assert rec["resumed_at"] == 3
    for pa, pc in zip(net_a.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(pa, pc)


def _linear_step(mods, opt, g, s):
    """A run_loop step_fn: one SGD step of a Linear(2, 1) on random inputs."""
    loss = mods[0](torch.randn(3, 2, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach())}


def test_run_loop_monitor_adds_measurements_at_logging_steps_only(tmp_path):
    """The autoencoder stage's OCR gate rides on run_loop's monitor: asked at every logging step, its values land
    in that step's history entry."""
    tm = _train_mini()
    t = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck", log_every=2)
    net = torch.nn.Linear(2, 1)
    asked = []

    def monitor(step):
        asked.append(step)
        return {"gate": step / 10} if step % 4 == 0 else {}

    rec = t.run_loop("judge", [net], torch.optim.SGD(net.parameters(), lr=0.1), 9, lambda s: 0.1, _linear_step,
                     monitor=monitor)
    assert asked == [2, 4, 6, 8, 9]
    assert [(h["step"], h.get("gate")) for h in rec["history"]] == [(2, None), (4, 0.4), (6, None), (8, 0.8), (9, None)]


@pytest.mark.parametrize("argv", [["--unet-sign-weight", "3"], ["--sign-rate", "0.5", "--unet-sign-weight", "-1"]])
def test_unet_sign_weight_needs_signs_and_a_weight_of_at_least_0(argv, capsys):
    tm = _train_mini()
    with pytest.raises(SystemExit) as e:
        tm.main(argv)
    assert e.value.code == 2 and "--unet-sign-weight must be >= 0 and needs --sign-rate > 0" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--unet-min-snr", "-5"], "--unet-min-snr must be >= 0 (0: off), got -5.0"),
    (["--unet-lr", "0"], "--unet-lr must be in (0, 1), e.g. 1.5e-3, got 0.0"),
    (["--unet-batch", "0"], "--unet-batch must be at least 1, got 0"),
])
def test_unet_recipe_options_refuse_values_out_of_range(argv, message, capsys):
    tm = _train_mini()
    with pytest.raises(SystemExit) as e:
        tm.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_min_snr_weights_cap_the_nearly_clean_timesteps_only():
    tm = _train_mini()
    abar = torch.tensor([0.99, 5 / 6, 0.5, 0.01], dtype=torch.float64)  # SNR 99, 5, 1, 1/99
    w = tm.min_snr_weights(abar, 5.0)
    assert torch.allclose(w, torch.tensor([5 / 99, 1.0, 1.0, 1.0], dtype=torch.float64))


def test_weighted_eps_loss_is_mse_without_weights_and_weighs_plates_and_timesteps():
    tm = _train_mini()
    g = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    err = (pred - eps) ** 2
    assert torch.equal(tm.weighted_eps_loss(pred, eps, None, 0.0, None), err.mean())
    cells = torch.zeros(2, 1, 8, 8)
    cells[0, 0, 2:4, 1:7] = 1.0  # one plate of 12 cells in the first image
    w = 1.0 + 3.0 * cells
    assert torch.equal(tm.weighted_eps_loss(pred, eps, cells, 3.0, None), (w * err).mean() / w.mean())
    tw = torch.tensor([0.25, 1.0])
    expected = (tw[:, None, None, None] * w * err).mean() / w.mean()
    assert torch.allclose(tm.weighted_eps_loss(pred, eps, cells, 3.0, tw), expected)
    only_t = tm.weighted_eps_loss(pred, eps, None, 0.0, tw)
    assert torch.allclose(only_t, (0.25 * err[0].mean() + err[1].mean()) / 2)


def test_budget_sets_steps_from_the_probed_step_time_and_keeps_them(tmp_path):
    tm = _train_mini()
    t = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck", budget_minutes=10)
    steps = t.plan_steps("judge", lambda: 0.5)
    # 10 min x (1 - reserve) x judge's share of all trained stages / 0.5 s per step
    expected = 600 * (1 - tm.BUDGET_RESERVE) * tm.BUDGET_SHARES["judge"] / sum(tm.BUDGET_SHARES.values()) / 0.5
    assert expected - 2 <= steps <= expected
    again = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck", budget_minutes=10)
    assert again.plan_steps("judge", lambda: pytest.fail("a resolved stage must not be probed again")) == steps
    plain = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck2")
    assert plain.plan_steps("unet", lambda: pytest.fail("no budget: no probe")) == tm.SMOKE_PLAN.unet_steps


def test_paced_cosine_is_cosine_lr_until_a_replan_then_continuous_and_ends_at_the_floor():
    tm = _train_mini()
    plain = tm.PacedCosine(100, 1e-3, 10)
    assert [plain(s) for s in range(120)] == [tm.cosine_lr(s, 100, 1e-3, 10) for s in range(120)]
    paced = tm.PacedCosine(100, 1e-3, 10, [(40, 70)])
    assert paced.total == 70
    assert [paced(s) for s in range(41)] == [plain(s) for s in range(41)]
    assert paced.position(40) == 40.0 and paced.position(55) == 70.0 and paced.position(70) == 100.0
    lrs = [paced(s) for s in range(40, 71)]
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True)) and lrs[-1] == pytest.approx(1e-4)
    twice = tm.PacedCosine(100, 1e-3, 10, [(40, 70), (55, 60)])  # at 55 (position 70) the last 30 squeeze into 5
    assert twice.position(55) == 70.0 and twice.position(60) == 100.0 and twice(54) == paced(54)


def test_pace_shortens_the_last_stage_to_the_budget_and_a_resumed_run_follows_it(tmp_path):
    tm = _train_mini()
    t = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck", budget_minutes=10)
    t.elapsed_before = 480.0  # 8 of 10 minutes gone
    sched = tm.PacedCosine(1000, 1e-3, 10)
    left = 600 * (1 - tm.BUDGET_SAFETY) - t.elapsed()
    assert t.pace("unet", sched, 100, 1000, left / 905) == 1000  # 900 steps fit in what is left: within tolerance
    assert sched.replans == [] and "replans" not in t.state
    fit = t.pace("unet", sched, 100, 1000, left / 600)  # only about 600 of the 900 left fit
    assert 695 <= fit <= 700 and sched.replans == [(100, fit)] and sched.total == fit
    t._save_state()
    again = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck", budget_minutes=10)
    assert again.state["replans"] == {"unet": [[100, fit]]}
    assert tm.PacedCosine(1000, 1e-3, 10, again.state["replans"]["unet"]).total == fit
    assert again.budgeted("unet")
    fixed = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck2", budget_minutes=10,
                       step_overrides={"unet": 50})
    assert not fixed.budgeted("unet") and not tm.Trainer(tm.SMOKE_PLAN, tmp_path / "o", tmp_path / "ck3").budgeted("unet")


def test_run_loop_asks_pace_at_checkpoints_and_stops_at_the_shortened_length(tmp_path):
    tm = _train_mini()
    t = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck", checkpoint_minutes=0.0, log_every=100)
    net = torch.nn.Linear(2, 1)
    asked = []

    def pace(done, steps, step_s):
        asked.append((done, steps))
        assert step_s > 0
        return 5 if done == 3 else steps

    rec = t.run_loop("unet", [net], torch.optim.SGD(net.parameters(), lr=0.1), 9, lambda s: 0.1, _linear_step, pace=pace)
    assert asked == [(1, 9), (2, 9), (3, 9), (4, 5)] and rec["steps"] == 5
    assert torch.load(tmp_path / "ck" / "unet.pt", weights_only=False)["step"] == 5


def test_probe_times_throwaway_copies_and_leaves_the_model_alone(tmp_path):
    tm = _train_mini()
    t = tm.Trainer(tm.SMOKE_PLAN, tmp_path / "out", tmp_path / "ck", probe_steps=2)
    net = torch.nn.Linear(3, 1)
    before = copy.deepcopy(net.state_dict())
    calls = []

    def step_fn(mods, opt, g, s):
        calls.append(mods[0] is net)
        loss = mods[0](torch.randn(4, 3, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {}

    seconds = t.probe([net], lambda mods: torch.optim.SGD(mods[0].parameters(), lr=0.1), step_fn)
    assert seconds > 0 and calls == [False, False, False]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_weight_file_that_does_not_match_its_config_is_rejected(weights, tmp_path):
    src = weights[1]["vae"]
    with safetensors.safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "taesd_decoder.19.weight"}
    broken = tmp_path / "vae.safetensors"
    safetensors.torch.save_file(sd, str(broken), metadata=meta)
    with pytest.raises(ValueError, match=r"vae\.safetensors \(VAE\): .*missing \['taesd_decoder\.19\.weight'\]"):
        dm.load_vae(broken)


# ------------------------------------------------------------------ the shipped weights and demo LoRA
def test_shipped_weights_load_fit_the_budget_and_are_registered():
    from prompt_anatomy import nodes as pack

    assert dm.PromptAnatomyDemoLoader in pack.all_nodes()
    assert not dm.missing_files(dm.MODEL_DIR), f"shipped weights missing in {dm.MODEL_DIR}"
    total = sum(p.stat().st_size for p in dm.MODEL_DIR.rglob("*.safetensors"))
    assert total <= 30 * 2**20, f"shipped demo files take {total / 2**20:.1f} MiB (limit 30)"
    for name in dm.COMPONENTS.values():
        with safetensors.safe_open(str(dm.MODEL_DIR / name), framework="pt") as f:
            assert json.loads(f.metadata()["training"])["steps"] > 0, f"{name} holds untrained weights"
    model, clip, vae = dm.PromptAnatomyDemoLoader.execute().args
    assert families.lookup(model).name == "sd1"


def test_shipped_model_writes_the_word_and_its_two_text_layers_edit_it():
    """The shipped v2 weights (docs/mini_model_card.md): OCR reads the prompted word at the model's setting (20 steps,
    cfg 4), and patching only output.3.0 and output.4.0 with the substituted prompt rewrites it (paper 2), as the
    demo_text_edit workflows show. 4 seeds, 3 of them must read right (CPU kernels may move a letter)."""
    from prompt_anatomy.nodes.shared import ocr

    if not ocr.available():
        pytest.skip("rapidocr-onnxruntime is not installed (scripts/setup.sh installs it)")
    model, clip, vae = dm.PromptAnatomyDemoLoader.execute().args
    src, tgt = tl_nodes.TextLayerWordSubstitute.execute(clip, 'a blue sign that says "SUN"', "SUN => BUS").args[:2]
    patched = tl_nodes.TextLayerPatch.execute(model, tgt, "output.3.0, output.4.0").args[0]
    (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
    (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
    reads = []
    with torch.inference_mode():
        for seed in range(4):
            row = []
            for m in (model, patched):
                (out,) = comfy_nodes.KSampler().sample(m, seed, 20, 4.0, "euler", "normal", src, neg, latent)
                row.append(ocr.text_of(ocr.read(comfy_nodes.VAEDecode().decode(vae, out)[0])[0]))
            reads.append(tuple(row))
    assert sum(r == ("SUN", "BUS") for r in reads) >= 3, reads


def test_demo_lora_is_registered_once_and_keeps_only_the_selected_layers(monkeypatch):
    import folder_paths

    lora = "prompt_anatomy_mini_demo_lora.safetensors"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        copy.deepcopy(folder_paths.folder_names_and_paths["loras"]))
    dm.register_demo_loras()
    dm.register_demo_loras()
    assert folder_paths.get_folder_paths("loras").count(str(dm.LORA_DIR)) == 1
    assert lora in folder_paths.get_filename_list("loras")
    model = dm.PromptAnatomyDemoLoader.execute().args[0]
    out = tl_nodes.LoraLoaderTextLayers.execute(model, lora, 1.0, "output.2.0, output.3.0")
    assert "4 of 14" in out.args[1], out.args[1]


def test_eval_edit_pairs_change_only_the_word_and_count_the_layer_parameters(weights):
    """scripts/eval_mini.py's paper-2 part: held-out source prompts, targets that differ in the quoted word only,
    and the localized layers' share of the UNet's parameters counted from the attention modules themselves."""
    import eval_mini

    ev = eval_mini.Evaluator(weights[0], steps=2, cfg=1.0, sampler="euler", scheduler="normal", n=1, seed=0,
                             out_dir=None)
    world = ev.world
    pairs = ev.edit_pairs(48)
    assert len(pairs) == 48 and len({p[0] for p in pairs}) == 48
    seen = ev.edit_pairs(3, "train")
    for k, (src, tgt, word) in enumerate(pairs + seen):
        old = world.parse_prompt(src)[-1]["sign"]
        parts = world.parse_prompt(src)
        held = world.sign_is_held_out(old, parts[-1]["colour"], parts[0]["shape"] if len(parts) == 2 else None)
        assert held == (k < 48), src  # measured on held-out pairs, localized on a seen one
        assert word != old and tgt == src.replace(f'"{old}"', f'"{word}"')
    dm_ = ev.model.model.diffusion_model
    attn = [dm_.input_blocks[1][1].transformer_blocks[0].attn2, dm_.output_blocks[5][1].transformer_blocks[0].attn2]
    share = ev.text_layer_params("input.1.0, output.5.0")
    assert share["params"] == sum(p.numel() for a in attn for p in a.parameters())
    assert share["unet_params"] == sum(p.numel() for p in dm_.parameters())
    assert 0 < share["share"] < 0.05
    from prompt_anatomy.nodes.core.layers import model_layers
    from prompt_anatomy.nodes.text_layers.localize import parse_candidates

    ml = model_layers(ev.model, "test")
    cands, layers = parse_candidates(ev.localization_candidates(), ml), ml.layers
    assert len(layers) == 7 and cands[:7] == [(layer,) for layer in layers]  # every layer alone first, then pairs
    assert len(cands) == 7 + 21 and all(len(c) == 2 and c[0] != c[1] for c in cands[7:])
    assert len({frozenset(c) for c in cands[7:]}) == 21
    assert not ev.trained_signs()  # the untrained export records no sign world: parts 5 to 8 skip
    assert ev.substitute(2) == ev.lora(2, 1) == ev.edit(1) == ev.lora_tune(2, 1) == \
        {"skipped": "weights trained without signs"}


@pytest.mark.parametrize("word", ["CAT", "cow", "COWS"])
def test_eval_new_word_is_refused_before_the_models_load(word, capsys):
    import eval_mini

    with pytest.raises(SystemExit) as e:
        eval_mini.main(["--new-word", word, "--weights", "/nonexistent"])
    assert e.value.code == 2 and f"--new-word: word {word!r}: give three upper-case letters" in capsys.readouterr().err


def test_eval_substitution_lists_every_other_word_and_new_word_prompts_name_it(weights):
    """The substitute part's rules (TextLayerWordSubstitute's own parser) and the lora part's prompts."""
    import eval_mini
    from prompt_anatomy.nodes.text_layers.words import parse_replacements, substitute_words

    ev = eval_mini.Evaluator(weights[0], steps=2, cfg=1.0, sampler="euler", scheduler="normal", n=1, seed=0,
                             out_dir=None)
    w = ev.world
    rules = parse_replacements(ev.substitution_rules())
    listed, repl = [a for a, _ in rules], [b for _, b in rules]
    assert len(rules) == 12 and set(listed) | set(repl) == set(w.WORDS) and not set(listed) & set(repl)
    held = w.heldout_sign_prompts()
    changed = [substitute_words(p, rules)[0] != p for p in held]
    assert 0 < sum(changed) < len(held)  # the part sees prompts with and without a listed word
    import train_mini

    _, tune = ev.tune_dataset(12)  # lora_tune: signs of trained captions, scenes no training run drew
    trained = set(w.sign_prompts("train"))
    assert all(s.prompt in trained for s in tune) and len({s.prompt for s in tune}) > 6
    assert eval_mini.TUNE_START >= train_mini.Plan().n_train
    prompts = ev.new_word_prompts()
    assert len(prompts) == 12 and all(p.endswith(f'sign that says "{w.NEW_WORD}"') for p in prompts)
    assert {p.split(" sign")[0] for p in prompts[:8]} == {w.sign_caption("X", c).split(" sign")[0] for c in w.COLOUR_NAMES}
    for p, obj in zip(prompts[8:], w.new_word_test_objects(), strict=True):  # the object is a trained pair
        colour, shape = p.split(" and ")[0].split()[1:]
        assert (colour, shape) == obj and not w.is_held_out(colour, shape)
