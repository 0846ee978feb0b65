"""scripts/mini_world.py: the demo model's procedural world — determinism, vocabulary, held-out split."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


import mini_world as w  # noqa: E402  (scripts/ is on sys.path: conftest.py)


def test_vocabulary_sizes():
    assert len(w.COLOURS) >= 8 and len(w.SHAPES) >= 6 and len(w.TEXTURES) >= 3
    assert w.ALL_TEXTURES[0] == w.PLAIN and len(w.BACKGROUNDS) >= 3


def test_same_index_same_scene_and_pixels_other_seed_differs():
    a_imgs, a_scenes = w.make_dataset(24, "train", seed=7)
    b_imgs, b_scenes = w.make_dataset(24, "train", seed=7)
    assert a_scenes == b_scenes and np.array_equal(a_imgs, b_imgs)
    # sample i does not depend on which other samples were drawn
    assert w.sample(13, "train", 7) == a_scenes[13]
    part, _ = w.make_dataset(4, "train", seed=7, start=10)
    assert np.array_equal(part, a_imgs[10:14])
    c_imgs, c_scenes = w.make_dataset(24, "train", seed=8)
    assert c_scenes != a_scenes and not np.array_equal(c_imgs, a_imgs)
    assert a_imgs.shape == (24, 64, 64, 3) and a_imgs.dtype == np.uint8


def test_prompt_stream_is_pinned():
    """The world's captions for the default seed: a change here changes every trained weight."""
    text = "\n".join(w.sample(i, "train").prompt for i in range(64))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == _PINNED_PROMPTS


_PINNED_PROMPTS = "759e18bd81339439"


def test_train_split_never_shows_a_held_out_combination():
    scenes = [w.sample(i, "train") for i in range(3000)]
    for s in scenes:
        for o in s.objects:
            assert (o.colour, o.shape) not in w.HELD_OUT_COLOUR_SHAPE, s
            assert (o.texture, o.shape) not in w.HELD_OUT_TEXTURE_SHAPE, s
        for d in w.parse_prompt(s.prompt):
            assert not w.is_held_out(d["colour"], d["shape"], d["texture"]), s.prompt
    # every colour and every shape still occurs in training (only their combination is held out)
    assert {o.colour for s in scenes for o in s.objects} == set(w.COLOURS)
    assert {o.shape for s in scenes for o in s.objects} == set(w.SHAPES)
    assert {o.texture for s in scenes for o in s.objects} == set(w.ALL_TEXTURES)
    two = sum(len(s.objects) == 2 for s in scenes) / len(scenes)
    assert 0.08 < two < 0.16
    assert any(" and " in s.prompt for s in scenes)


def test_held_out_prompts_are_disjoint_from_training_prompts():
    train, held, every = set(w.single_prompts("train")), set(w.single_prompts("heldout")), set(w.single_prompts("all"))
    assert train.isdisjoint(held) and train | held == every
    evals = w.heldout_eval_prompts()
    assert len(evals) == len(w.HELD_OUT_COLOUR_SHAPE) + len(w.HELD_OUT_TEXTURE_SHAPE)
    assert set(evals) <= held
    assert {p.split()[-1] for p in evals} == set(w.SHAPES)  # every shape is tested
    assert "a red circle" in evals and "an orange square" in evals
    # held-out scenes name their held-out combination
    for i in range(200):
        s = w.sample(i, "heldout")
        d = w.parse_prompt(s.prompt)[0]
        assert w.is_held_out(d["colour"], d["shape"], d["texture"]), s.prompt


@pytest.mark.parametrize("text,parsed", [
    ("a red star", [{"colour": "red", "texture": None, "shape": "star"}]),
    ("an orange striped heart", [{"colour": "orange", "texture": "striped", "shape": "heart"}]),
    ("a dotted cross", [{"colour": None, "texture": "dotted", "shape": "cross"}]),
    ("a blue circle and a pink square", [{"colour": "blue", "texture": None, "shape": "circle"},
                                         {"colour": "pink", "texture": None, "shape": "square"}]),
])
def test_parse_prompt(text, parsed):
    assert w.parse_prompt(text) == parsed


@pytest.mark.parametrize("text,match", [("a red dog", "must end with a shape"), ("red star", "must start with 'a'"),
                                        ("a shiny star", "unknown or repeated word 'shiny'")])
def test_parse_prompt_rejects_other_text(text, match):
    with pytest.raises(ValueError, match=match):
        w.parse_prompt(text)


def test_captions_follow_the_templates():
    assert w.caption("red", "star") == "a red star"
    assert w.caption(None, "heart", "striped") == "a striped heart"
    assert w.caption("orange", "cross", "checkered") == "an orange checkered cross"
    for i in range(300):
        s = w.sample(i, "train")
        d = w.parse_prompt(s.prompt)
        assert len(d) == len(s.objects)
        o = s.objects[0]
        if len(d) == 1:
            assert d[0]["shape"] == o.shape and d[0]["colour"] in (None, o.colour)
            assert d[0]["texture"] in (None, o.texture)
            if o.texture != w.PLAIN:  # a textured object's caption names its texture
                assert d[0]["texture"] == o.texture
        else:
            assert {(x["colour"], x["shape"]) for x in d} == {(x.colour, x.shape) for x in s.objects}


def test_render_draws_the_named_colour_on_the_background():
    scene = w.Scene(objects=(w.Obj("square", "red", w.PLAIN, 32, 32, 40, 0.0, (210, 30, 30), 0, 0.0),),
                    background=(128, 128, 128), gradient=None, prompt="a red square")
    img = np.asarray(w.render(scene))
    assert img.shape == (64, 64, 3)
    assert tuple(img[32, 32]) == (210, 30, 30) and tuple(img[2, 2]) == (128, 128, 128)
    striped = w.Scene(objects=(dataclass_replace(scene.objects[0], texture="striped"),), background=(128, 128, 128),
                      gradient=None, prompt="a red striped square")
    px = np.asarray(w.render(striped))[20:44, 20:44].reshape(-1, 3)
    assert (px[:, 0] > 150).mean() > 0.3 and (px[:, 0] < 100).mean() > 0.3  # colour and dark stripes


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_objects_fit_and_two_objects_never_overlap():
    for i in range(600):
        s = w.sample(i, "train")
        for o in s.objects:
            r = o.size / 2
            assert r <= o.cx <= 64 - r and r <= o.cy <= 64 - r
            assert (24 <= o.size <= 48) if len(s.objects) == 1 else (18 <= o.size <= 28)
        if len(s.objects) == 2:
            a, b = s.objects
            assert math.dist((a.cx, a.cy), (b.cx, b.cy)) >= (a.size + b.size) / 2
            assert a.colour != b.colour and a.shape != b.shape


def test_scene_for_prompt_matches_it():
    s = w.scene_for_prompt("a green dotted star", random.Random(0))
    o = s.objects[0]
    assert (o.colour, o.texture, o.shape) == ("green", "dotted", "star")
    s2 = w.scene_for_prompt("a yellow heart and a blue cross", random.Random(1))
    assert [(x.colour, x.shape) for x in s2.objects] == [("yellow", "heart"), ("blue", "cross")]
    assert w.Scene.labels.fget(s) == (w.COLOUR_NAMES.index("green"), w.SHAPES.index("star"), w.ALL_TEXTURES.index("dotted"))


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split must be one of train, heldout, all"):
        w.sample(0, "test")


# ---- the v2 world: signs with words -------------------------------------------------------------------------

FONTS_MISSING = [str(w.FONT_DIR / f) for f in w.FONTS.values() if not (w.FONT_DIR / f).exists()]
needs_fonts = pytest.mark.skipif(bool(FONTS_MISSING), reason=f"sign fonts missing: {FONTS_MISSING} (Debian: apt-get "
                                                              f"install fonts-dejavu-core)")


@needs_fonts
def test_sign_rate_zero_draws_no_sign_and_the_v2_stream_is_pinned():
    """sign_rate 0 is v1's world (its pinned prompt stream above); the v2 stream is pinned too, since a change
    there changes every v2 weight."""
    assert all(w.sample(i, "train").sign is None for i in range(200))
    text = "\n".join(w.sample(i, "train", sign_rate=0.5).prompt for i in range(64))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == _PINNED_V2_PROMPTS


_PINNED_V2_PROMPTS = "a1ade43a417dddd9"


def test_sign_words_are_single_clip_tokens_outside_the_world_vocabulary():
    from comfy_path import comfy_dir  # noqa: PLC0415
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(comfy_dir() / "comfy" / "sd1_tokenizer"))
    assert 16 <= len(w.WORDS) <= 32 and len(set(w.WORDS)) == len(w.WORDS)
    for word in (*w.WORDS, w.NEW_WORD):
        assert word.isupper() and len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert word.lower() not in (*w.COLOURS, *w.SHAPES, *w.TEXTURES, "sign", "says", "that", "a", "an", "and")
    assert w.NEW_WORD not in w.WORDS


def test_sign_captions_parse_back():
    assert w.sign_caption("CAT") == 'a sign that says "CAT"'
    assert w.sign_caption("OWL", "orange") == 'an orange sign that says "OWL"'
    assert w.sign_caption("BEE", None, ("red", "star")) == 'a red star and a sign that says "BEE"'
    assert w.parse_prompt('a red star and a blue sign that says "BEE"') == [
        {"colour": "red", "texture": None, "shape": "star"}, {"sign": "BEE", "colour": "blue"}]
    assert w.parse_prompt('A sign that says "cat"') == [{"sign": "CAT", "colour": None}]


@pytest.mark.parametrize("text", ['a sign that says "ZEBRA"', 'a shiny sign that says "CAT"', 'a sign that says CAT'])
def test_parse_prompt_rejects_other_signs(text):
    with pytest.raises(ValueError, match='a sign must read \'a \\[colour\\] sign that says "WORD"\''):
        w.parse_prompt(text)


@pytest.mark.parametrize("text", ['a sign that says "CAT" and a red star', 'a sign that says "CAT" and a sign that says "DOG"',
                                  'a red star and a blue circle and a sign that says "CAT"',
                                  'a striped star and a sign that says "CAT"'])
def test_parse_prompt_rejects_signs_outside_the_templates(text):
    with pytest.raises(ValueError, match="a sign comes last, once, after at most one plain object"):
        w.parse_prompt(text)


@needs_fonts
def test_train_split_never_shows_a_held_out_sign_pair():
    scenes = [w.sample(i, "train", sign_rate=0.5) for i in range(3000)]
    signs = [s for s in scenes if s.sign is not None]
    assert 0.45 < len(signs) / len(scenes) < 0.55
    for s in signs:
        shape = s.objects[0].shape if s.objects else None
        assert not w.sign_is_held_out(s.sign.word, s.sign.colour, shape), s
        assert not w.scene_is_held_out(s), s
        parsed = w.parse_prompt(s.prompt)
        assert parsed[-1]["sign"] == s.sign.word and parsed[-1]["colour"] in (None, s.sign.colour)
        if s.objects:
            assert (parsed[0]["colour"], parsed[0]["shape"]) == (s.objects[0].colour, s.objects[0].shape)
    # every word, plate colour, font and (word, shape) companion still occurs; only the held-out pairs do not
    assert {s.sign.word for s in signs} == set(w.WORDS)
    assert {s.sign.colour for s in signs} == set(w.COLOURS) and {s.sign.font for s in signs} == set(w.FONTS)
    with_obj = sum(bool(s.objects) for s in signs) / len(signs)
    assert 0.28 < with_obj < 0.42
    assert {s.prompt for s in signs} <= set(w.sign_prompts("train"))  # the prompt list covers every caption


@needs_fonts
def test_held_out_sign_prompts_name_their_pair_and_are_never_trained():
    evals = w.heldout_sign_prompts()
    assert len(evals) == len(w.HELD_OUT_WORD_COLOUR) + len(w.HELD_OUT_WORD_SHAPE) == 2 * len(w.WORDS)
    train = set(w.sign_prompts("train"))
    held = set(w.sign_prompts("heldout"))
    assert set(evals) <= held and train.isdisjoint(held)
    assert set(w.seen_sign_prompts()) <= train and len(w.seen_sign_prompts()) == len(w.WORDS)
    assert train | held == set(w.sign_prompts("all"))
    for p in evals:
        parts = w.parse_prompt(p)
        shape = parts[0]["shape"] if len(parts) == 2 else None
        assert w.sign_is_held_out(parts[-1]["sign"], parts[-1]["colour"], shape), p
    held_scenes = [w.sample(i, "heldout", sign_rate=1.0) for i in range(400)]
    assert {s.prompt for s in held_scenes} <= held
    for s in held_scenes:  # the caption names the held-out pair, not just the image
        parts = w.parse_prompt(s.prompt)
        assert w.sign_is_held_out(parts[-1]["sign"], parts[-1]["colour"], parts[0]["shape"] if len(parts) == 2 else None)


@needs_fonts
def test_signs_fit_the_image_and_keep_clear_of_their_object():
    for i in range(400):
        s = w.sample(i, "all", sign_rate=1.0)
        width, height = w.sign_size(s.sign.word, s.sign.font, s.sign.text_px)
        assert width / 2 < s.sign.cx < 64 - width / 2 and height / 2 <= s.sign.cy <= 64 - height / 2
        if s.objects:
            o = s.objects[0]
            assert (o.cy < 32) != (s.sign.cy < 32)  # other halves
            assert abs(o.cy - s.sign.cy) >= o.size / 2 + height / 2 - 1


@needs_fonts
def test_the_word_is_48_px_wide_and_starts_on_the_latent_grid():
    """Every word's text box starts on the 8-px latent grid (column 8, a row of the grid) and is 48 px wide: drawn
    at 4x and measured on the pixels of the ink colour."""
    rows = set()
    for i in range(40):
        s = w.sample(i, "all", sign_rate=1.0)
        img = np.asarray(w.render(s, size=256)).astype(int)
        width, height = w.sign_size(s.sign.word, s.sign.font, s.sign.text_px)
        left, top = math.ceil(4 * (s.sign.cx - width / 2)) + 2, math.ceil(4 * (s.sign.cy - height / 2)) + 2
        plate = img[top:int(4 * (s.sign.cy + height / 2)) - 2, left:int(4 * (s.sign.cx + width / 2)) - 2]
        ys, xs = np.nonzero(np.abs(plate - s.sign.ink).sum(-1) < 40)  # the ink, not a background of its colour
        x0, x1, y0 = (xs.min() + left) / 4, (xs.max() + 1 + left) / 4, (ys.min() + top) / 4
        # PIL's text box runs from the pen to the advance, so the letters' side bearings (up to 2 px) lie inside it
        assert 8 - 0.75 <= x0 <= 8 + 2.5 and 56 - 2.5 <= x1 <= 56 + 0.75, (s.sign, x0, x1)
        assert abs(y0 - round(y0 / 8) * 8) <= 0.75, (s.sign, y0)
        rows.add(round(y0 / 8) * 8)
    assert rows == {8, 16, 24, 32, 40}


@needs_fonts
def test_sign_cells_cover_the_plate_cell_by_cell():
    s = w.sample(0, "all", sign_rate=1.0)
    cells = w.sign_cells(s)
    width, height = w.sign_size(s.sign.word, s.sign.font, s.sign.text_px)
    assert cells.shape == (8, 8) and cells.dtype == np.float32 and 0 <= cells.min() and cells.max() <= 1
    assert np.isclose(cells.sum() * 64, width * height)  # the plate's area in px
    rows, cols = np.nonzero(cells)
    assert cols.min() == int((32 - width / 2) // 8) and cols.max() == int((32 + width / 2) // 8)
    assert rows.min() == int((s.sign.cy - height / 2) // 8)
    assert not w.sign_cells(w.sample(0, "train")).any()  # no sign, no cells


@needs_fonts
def test_render_draws_the_plate_and_the_word():
    sign = w.Sign("CAT", "blue", (35, 70, 215), (248, 248, 248), "dejavu_sans", 32.0, 32.0, 15.0)
    scene = w.Scene((), (128, 128, 128), None, 'a blue sign that says "CAT"', sign)
    img = np.asarray(w.render(scene)).astype(int)
    width, height = w.sign_size("CAT", "dejavu_sans", 15.0)
    plate = img[int(32 - height / 2) + 1:int(32 + height / 2) - 1, int(32 - width / 2) + 1:int(32 + width / 2) - 1]
    blue = (np.abs(plate - (35, 70, 215)).sum(-1) < 30).mean()
    ink = (plate.min(-1) > 200).mean()
    assert 0.4 < blue < 0.9 and 0.08 < ink < 0.5  # plate with white letters on it
    assert tuple(img[2, 2]) == (128, 128, 128)
    dark = dataclass_replace(sign, colour="yellow", rgb=(240, 215, 35))
    assert w.scene_for_prompt('a yellow sign that says "CAT"', random.Random(0)).sign.ink == (24, 24, 24)
    assert np.asarray(w.render(dataclass_replace(scene, sign=dark))).shape == (64, 64, 3)


@needs_fonts
def test_scene_for_a_sign_prompt_matches_it():
    s = w.scene_for_prompt('a green heart and a sign that says "OWL"', random.Random(3))
    assert s.sign.word == "OWL" and s.sign.colour != "green" and [(o.colour, o.shape) for o in s.objects] == [
        ("green", "heart")]
    s2 = w.scene_for_prompt('a purple sign that says "SUN"', random.Random(4))
    assert (s2.sign.word, s2.sign.colour, s2.objects) == ("SUN", "purple", ())


@needs_fonts
def test_ocr_reads_the_drawn_signs():
    """The OCR judge reads the world's drawn 64 px signs (the ceiling for the v2 model's words)."""
    pytest.importorskip("rapidocr_onnxruntime")
    import torch
    import train_mini as tm  # noqa: PLC0415

    tm.load_env()
    imgs, scenes = w.make_dataset(24, "all", start=777, sign_rate=1.0)
    read = tm.ocr_reads(torch.from_numpy(imgs).float() / 255, [s.sign.word for s in scenes])
    assert sum(read) >= 22, [s.sign.word for s, ok in zip(scenes, read, strict=True) if not ok]


@needs_fonts
def test_new_word_dataset_shows_only_the_new_word_and_is_deterministic():
    """The lora part's training images: a sign alone saying NEW_WORD, a word no world caption uses."""
    imgs, scenes = w.new_word_dataset(12)
    again, _ = w.new_word_dataset(12)
    assert imgs.shape == (12, 64, 64, 3) and imgs.dtype == np.uint8 and np.array_equal(imgs, again)
    assert all(s.sign.word == w.NEW_WORD and not s.objects for s in scenes)
    assert all(s.prompt in (w.sign_caption(w.NEW_WORD), w.sign_caption(w.NEW_WORD, s.sign.colour)) for s in scenes)
    assert len({s.sign.colour for s in scenes}) > 3 and len({s.prompt for s in scenes}) > 3
    assert all(f'"{w.NEW_WORD}"' not in w.sample(i, "all", sign_rate=1.0).prompt for i in range(300))
    for bad in ("CAT", "cow", "COWS"):
        with pytest.raises(ValueError, match="three upper-case letters that are not a world word"):
            w.new_word_dataset(1, bad)


@needs_fonts
def test_new_word_dataset_puts_objects_beside_the_sign_but_never_the_test_objects():
    """object_rate: scenes with a plain trained object beside the sign, never one the lora part tests the word
    beside, never the plate's colour; rate 0 (the default) draws none."""
    plain = w.new_word_dataset(24, "POT")[1]
    scenes = w.new_word_dataset(24, "POT", object_rate=1.0)[1]
    test = set(w.new_word_test_objects())
    assert len(test) == 4 and not any(w.is_held_out(c, s) for c, s in test)
    assert not any(s.objects for s in plain) and all(len(s.objects) == 1 for s in scenes)
    for s in scenes:
        o = s.objects[0]
        assert (o.colour, o.shape) not in test and o.colour != s.sign.colour and not w.is_held_out(o.colour, o.shape)
        assert s.prompt.startswith(f"{w.caption(o.colour, o.shape)} and ") and s.prompt.endswith('says "POT"')
    half = w.new_word_dataset(64, "POT", object_rate=0.5)[1]
    assert 16 < sum(bool(s.objects) for s in half) < 48
