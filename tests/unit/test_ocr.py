"""nodes/shared/ocr.py: the real RapidOCR (PP-OCRv4) reads words rendered with PIL in a Debian TTF font;
text metrics on known pairs; background metrics; the message when OCR is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from prompt_anatomy.nodes.shared import ocr

# Debian package fonts-dejavu-core ships DejaVuSans-Bold.ttf; fonts-liberation ships LiberationSans-Bold.ttf
FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
         "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf",
         "/usr/share/fonts/truetype/freefont/FreeSansBold.ttf"]
FONT = next((p for p in FONTS if Path(p).exists()), None)
needs_ocr = pytest.mark.skipif(not ocr.available() or FONT is None,
                               reason="rapidocr-onnxruntime (scripts/requirements-dev.txt) or a TTF font "
                                      "(Debian fonts-dejavu-core) missing")


def render(text, size, *, bg=(225, 225, 225), fg=(15, 15, 15), width_frac=0.8, background=None):
    """[1, size, size, 3] IMAGE with ``text`` centred, as large as fits ``width_frac`` of the width."""
    img = Image.new("RGB", (size, size), bg) if background is None else background.copy()
    draw = ImageDraw.Draw(img)
    fs = size // 2
    while True:
        font = ImageFont.truetype(FONT, fs)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= size * width_frac or fs <= 6:
            break
        fs -= 1
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, font=font, fill=fg)
    return torch.tensor(list(img.getdata()), dtype=torch.float32).reshape(1, size, size, 3) / 255


def gradient(size):
    """A smooth colourful background (PIL image) so SSIM has structure to compare."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    rgb = torch.stack([0.6 + 0.3 * x, 0.7 + 0.2 * y, 0.9 - 0.2 * x * y], -1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


@needs_ocr
@pytest.mark.parametrize("size", [64, 128, 512])
def test_reads_rendered_words_exactly(size):
    words = ["HELLO", "open", "CAFE"]
    batch = torch.cat([render(w, size) for w in words])
    out = ocr.read(batch)
    assert [ocr.text_of(ws) for ws in out] == words
    for ws in out:
        (w,) = ws
        x0, y0, x1, y1 = w.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size and 0.5 < w.confidence <= 1
        assert x0 < size / 2 < x1 and y0 < size / 2 < y1  # the word is centred


@needs_ocr
def test_small_images_are_detected_at_small_side_and_large_ones_at_rapidocr_defaults():
    small, edge, large = ocr._get_engine(64), ocr._get_engine(ocr.SMALL_SIDE - 1), ocr._get_engine(512)
    assert small is edge and small is not large and ocr._get_engine(1024) is large
    assert small.text_det.limit_side_len == ocr.SMALL_SIDE and large.text_det.limit_side_len == 736
    assert small.text_det.limit_type == large.text_det.limit_type == "min"


@needs_ocr
def test_reads_nothing_in_a_blank_image_and_accepts_hwc():
    assert ocr.read(torch.full((64, 64, 3), 0.8)) == [[]]


def test_word_f1_on_known_pairs():
    assert ocr.word_f1("Hello, World!", "hello world") == 1.0
    assert ocr.word_f1("hello there", "hello world") == pytest.approx(0.5)  # P = R = 1/2
    assert ocr.word_f1("hello", "hello big world") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))  # 0.5
    assert ocr.word_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multisets: 2 of 3 match
    assert ocr.word_f1("", "stop") == 0.0 and ocr.word_f1("stop", "") == 0.0 and ocr.word_f1("", "") == 1.0


def test_levenshtein_and_exact_match():
    assert ocr.levenshtein("kitten", "sitting") == 3
    assert ocr.levenshtein("", "abc") == 3 and ocr.levenshtein("abc", "abc") == 0
    assert ocr.normalized_levenshtein("STOP!", "stop") == 0.0
    assert ocr.normalized_levenshtein("kitten", "sitting") == pytest.approx(3 / 7)
    assert ocr.normalized_levenshtein("", "") == 0.0 and ocr.normalized_levenshtein("", "abcd") == 1.0
    assert ocr.exact_match("Open  Now.", "open now") and not ocr.exact_match("open", "opens")


def test_background_metrics_zero_for_identical_and_positive_outside_the_text():
    src = render("SALE", 64)[0] if FONT else torch.rand(64, 64, 3)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[24:40, 8:56] = True
    assert ocr.background_metrics(src, src.clone(), mask) == (0.0, pytest.approx(1.0))
    changed = src.clone()
    changed[mask] = 1 - changed[mask]  # only inside the text region: invisible to the metrics
    assert ocr.background_metrics(src, changed, mask) == (0.0, pytest.approx(1.0))
    changed[:8] = torch.tensor([0.9, 0.1, 0.1])  # a red band at the top, outside the text
    mse, ssim = ocr.background_metrics(src, changed, mask)
    assert mse > 0.01 and ssim < 0.95


def test_text_mask_is_the_dilated_union_of_boxes():
    a = [ocr.Word("x", (10.0, 10.0, 20.0, 20.0), 0.9)]
    b = [ocr.Word("y", (40.0, 30.0, 50.2, 35.0), 0.9)]
    m = ocr.text_mask(64, 64, a, b, margin=2)
    assert m[8:22, 8:22].all() and not m[7, 15] and not m[15, 22]
    assert m[28:37, 38:53].all() and not m[37, 45]
    assert int(m.sum()) == 14 * 14 + 9 * 15


@needs_ocr
def test_score_edit_rewards_the_target_word_and_penalises_a_changed_background():
    size = 128
    bg = gradient(size)
    source = render("CAFE", size, background=bg)
    good = render("OPEN", size, background=bg)
    worse_bg = render("OPEN", size, background=gradient(size).rotate(90))
    s_words = ocr.read(source)[0]
    r_good = ocr.score_edit(source, good, "open", source_words=s_words)
    assert r_good["text"] == "OPEN" and r_good["exact"] and r_good["f1"] == 1.0 and r_good["lev"] == 0.0
    assert r_good["bg_mse"] < 1e-6 and r_good["bg_ssim"] > 0.999 and r_good["score"] > 0.99
    r_bad_bg = ocr.score_edit(source, worse_bg, "open", source_words=s_words)
    assert r_bad_bg["f1"] == 1.0 and r_bad_bg["bg_mse"] > 1e-3 and r_bad_bg["score"] < r_good["score"]
    r_unchanged = ocr.score_edit(source, source, "open", source_words=s_words)
    assert r_unchanged["f1"] == 0.0 and r_unchanged["lev"] == 1.0 and r_unchanged["score"] == 0.0
    assert r_unchanged["bg_mse"] == 0.0


def test_score_edit_rejects_a_batch_and_mismatched_sizes():
    with pytest.raises(ValueError, match="one image at a time"):
        ocr.score_edit(torch.zeros(2, 8, 8, 3), torch.zeros(2, 8, 8, 3), "x")
    with pytest.raises(ValueError, match="differs from source_img"):
        ocr.score_edit(torch.zeros(1, 8, 8, 3), torch.zeros(1, 16, 8, 3), "x")
    with pytest.raises(ValueError, match=r"IMAGE tensor \[batch, height, width, 3\]"):
        ocr.read(torch.zeros(1, 3, 8, 8))


def test_require_message_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ocr, "available", lambda: False)
    with pytest.raises(ValueError) as e:
        ocr.require("TextLayerLocalize (OCR ranking)")
    msg = str(e.value)
    assert msg.startswith("TextLayerLocalize (OCR ranking) reads the rendered text with OCR")
    assert "pip install rapidocr-onnxruntime" in msg and "restart ComfyUI" in msg
