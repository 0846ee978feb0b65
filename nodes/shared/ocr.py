"""OCR scoring for paper 2's Algorithm 1 (Staniszewski et al., ICLR 2025): read the text a model rendered and
score a layer-patched image against the target text and the unpatched source image.

OCR is RapidOCR (``rapidocr-onnxruntime``: PP-OCRv4 detector + recognizer, models inside the wheel, CPU via
onnxruntime). It is an optional dependency: :func:`available` says whether it is installed and
:func:`require` raises the message that tells the user how to install it.

Metrics follow the paper's tables: word-level OCR F1, Levenshtein distance (here normalised to 0..1) and
exact match for the text; MSE and SSIM for the background (the image with the text regions removed).
Images are ComfyUI IMAGE tensors ``[B, H, W, 3]`` (or one ``[H, W, 3]``) in 0..1; pixel values of the
background metrics stay on that 0..1 scale (the paper's MSE is on 0..255: multiply by 255²).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass

import torch

LOG = logging.getLogger("prompt_anatomy")

PIP_NAME = "rapidocr-onnxruntime"
INSTALL_HINT = (f"Install it into ComfyUI's Python environment with `python -m pip install {PIP_NAME}` "
                "(use the python that runs ComfyUI, e.g. python_embeded\\python.exe on the Windows portable "
                "build), then restart ComfyUI.")
SMALL_SIDE = 256  # images with a shorter short side are detected at this size (see _get_engine)
SSIM_WINDOW = 7  # odd; 11 (the SSIM paper's) is too wide for 64 px images with a masked text band

_engines: dict = {}  # detector size (None: RapidOCR's default) -> engine
_lock = threading.Lock()


@dataclass(frozen=True)
class Word:
    """One detected text line (PP-OCR's detector groups words on a line; it may contain spaces).

    ``box`` is the axis-aligned box ``(x0, y0, x1, y1)`` in pixels of the image that was read."""

    text: str
    box: tuple[float, float, float, float]
    confidence: float


def available() -> bool:
    """True when the OCR engine can be imported."""
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except Exception:  # ImportError, or a broken onnxruntime / opencv install
        return False
    return True


def require(what: str = "This node") -> None:
    """Raise a ValueError telling the user how to enable OCR, unless it is available."""
    if not available():
        raise ValueError(f"{what} reads the rendered text with OCR, but the optional package '{PIP_NAME}' "
                         f"is not installed. {INSTALL_HINT}")


def _get_engine(short_side: int):
    """The RapidOCR instance for images whose shorter side is ``short_side`` px (created on first use).

    RapidOCR's detector scales every image up to a short side of 736 px. Images under SMALL_SIDE (the demo
    model's 64 px renders) are detected at SMALL_SIDE instead, 4-5x faster and as accurate (measured on the mini
    world's 64 px signs: 127 of 128 words read instead of 125 when drawn, 83 instead of 82 after an autoencoder).
    The recognizer reads crops of the original image either way. Larger images keep RapidOCR's defaults."""
    limit = SMALL_SIDE if short_side < SMALL_SIDE else None
    with _lock:
        if limit not in _engines:
            require()
            from rapidocr_onnxruntime import RapidOCR

            _engines[limit] = RapidOCR() if limit is None else RapidOCR(det_limit_side_len=limit)
        return _engines[limit]


def _as_batch(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name}: expected an IMAGE tensor [batch, height, width, 3], got shape "
                         f"{tuple(images.shape)}. Connect an IMAGE output (e.g. VAE Decode).")
    return images


def _to_bgr_uint8(image: torch.Tensor):
    """[H, W, 3] RGB 0..1 -> contiguous uint8 BGR numpy array (OpenCV's order, which RapidOCR expects)."""
    rgb = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return rgb[:, :, ::-1].copy()


def _words(result) -> list[Word]:
    words = []
    for points, text, conf in result or []:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        words.append(Word(str(text), (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))),
                          float(conf)))
    return words


def read(images: torch.Tensor) -> list[list[Word]]:
    """OCR every image of a batch; per image its text lines, top to bottom, left to right."""
    images = _as_batch(images)
    engine = _get_engine(min(images.shape[1], images.shape[2]))
    out = []
    for image in images:
        with _lock:  # RapidOCR keeps per-call state on the instance
            result, _ = engine(_to_bgr_uint8(image))
        out.append(_words(result))
    return out


def text_of(words: list[Word]) -> str:
    """The recognised text of one image, lines joined by spaces."""
    return " ".join(w.text for w in words)


# ---- text metrics ------------------------------------------------------------------------------------

def tokens(text: str) -> list[str]:
    """Lower-case words with punctuation removed (the unit of the paper's OCR F1)."""
    return re.sub(r"[^\w\s]|_", " ", text.lower()).split()


def normalize(text: str) -> str:
    return " ".join(tokens(text))


def word_f1(recognised: str, target: str) -> float:
    """F1 of the word multisets: 1.0 when both are empty, 0.0 when only one is."""
    rec, tgt = Counter(tokens(recognised)), Counter(tokens(target))
    if not rec and not tgt:
        return 1.0
    common = sum((rec & tgt).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(rec.values()), common / sum(tgt.values())
    return 2 * precision * recall / (precision + recall)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalized_levenshtein(recognised: str, target: str) -> float:
    """Levenshtein distance of the normalised texts divided by the longer length: 0 = same, 1 = nothing alike."""
    a, b = normalize(recognised), normalize(target)
    return levenshtein(a, b) / max(len(a), len(b), 1)


def exact_match(recognised: str, target: str) -> bool:
    return normalize(recognised) == normalize(target)


# ---- background metrics ------------------------------------------------------------------------------

def text_mask(height: int, width: int, *word_lists: list[Word], margin: int | None = None) -> torch.Tensor:
    """Bool [H, W] mask, True inside the union of the words' boxes grown by ``margin`` px
    (default 2 % of the longer side, at least 2 px)."""
    if margin is None:
        margin = max(2, round(0.02 * max(height, width)))
    mask = torch.zeros(height, width, dtype=torch.bool)
    for words in word_lists:
        for w in words:
            x0, y0, x1, y1 = w.box
            mask[max(0, int(y0) - margin):min(height, int(y1 + 0.999) + margin),
                 max(0, int(x0) - margin):min(width, int(x1 + 0.999) + margin)] = True
    return mask


def background_metrics(source: torch.Tensor, patched: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(MSE, SSIM) of two [H, W, 3] images over the pixels where ``mask`` is False.

    The masked region of ``patched`` is replaced by the source's pixels first, so text changes do not leak
    into the SSIM windows of neighbouring background pixels. No background left: (0.0, 1.0)."""
    from kornia.metrics import ssim

    keep = ~mask.to(source.device)
    if not bool(keep.any()):
        LOG.debug("ocr.background_metrics: the text boxes cover the whole image; no background to compare")
        return 0.0, 1.0
    src, pat = source.float(), patched.float()
    pat = torch.where(mask.to(src.device)[..., None], src, pat)
    mse = float(((src - pat) ** 2).mean(-1)[keep].mean())
    ssim_map = ssim(src.permute(2, 0, 1)[None], pat.permute(2, 0, 1)[None], SSIM_WINDOW)[0].mean(0)
    return mse, float(ssim_map[keep].mean())


# ---- one edit ----------------------------------------------------------------------------------------

def _single(image: torch.Tensor, name: str) -> torch.Tensor:
    image = _as_batch(image, name)
    if image.shape[0] != 1:
        raise ValueError(f"{name}: score_edit scores one image at a time, got a batch of {image.shape[0]}. "
                         "Score each image of the batch separately.")
    return image[0]


def score_edit(source_img: torch.Tensor, patched_img: torch.Tensor, target_text: str, *,
               source_words: list[Word] | None = None) -> dict:
    """Score one layer-patched image the way paper 2 ranks layers: the rendered text must match the target
    and the rest of the image must stay as it was.

        text  = (f1 + (1 - lev)) / 2                  word F1 and normalised Levenshtein vs. target_text
        score = text * clamp(bg_ssim, 0, 1)           SSIM of the background (text boxes of both images masked)

    so a layer that writes the target but repaints the scene scores low, and one that leaves the image
    untouched scores 0 unless the source already showed the target. Returned dict: ``text`` (recognised),
    ``f1``, ``lev`` (normalised, 0..1), ``lev_raw`` (characters), ``exact``, ``bg_mse`` (0..1 pixel scale),
    ``bg_ssim``, ``score``, ``words`` (the patched image's :class:`Word` list). Pass ``source_words`` (from
    :func:`read`) to skip re-reading the source when scoring many layers against one source image.
    """
    src, pat = _single(source_img, "source_img"), _single(patched_img, "patched_img")
    if src.shape != pat.shape:
        raise ValueError(f"patched_img: size {tuple(pat.shape[:2])} differs from source_img {tuple(src.shape[:2])}; "
                         "generate both at the same width and height.")
    if source_words is None:
        source_words = read(src)[0]
    words = read(pat)[0]
    text = text_of(words)
    f1, lev = word_f1(text, target_text), normalized_levenshtein(text, target_text)
    mask = text_mask(src.shape[0], src.shape[1], source_words, words)
    bg_mse, bg_ssim = background_metrics(src, pat, mask)
    score = (f1 + 1 - lev) / 2 * min(max(bg_ssim, 0.0), 1.0)
    return {"text": text, "f1": f1, "lev": lev, "lev_raw": levenshtein(normalize(text), normalize(target_text)),
            "exact": exact_match(text, target_text), "bg_mse": bg_mse, "bg_ssim": bg_ssim, "score": score,
            "words": words}
