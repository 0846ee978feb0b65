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
