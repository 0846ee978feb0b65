"""TextLayerPatch's settings: what the patch does (layers, steps, heads, rows, strength) and to which prompt
(``TargetText``), when it is in force on a model call, the paper's start step, and the keys it sets in a model's
transformer options."""

from __future__ import annotations

import dataclasses
import math
import re
import uuid

import torch

from ..core import PACK, runs
from ..core.layers import ModelLayers, int_range

ROW_MODES = ("positive", "positive_and_negative")
RANGE_UNITS = ("step_fraction", "timestep_percent")  # unit of start_percent / end_percent (see PatchSettings)
ROW_ROLES = {"positive": ("positive",), "positive_and_negative": ("positive", "negative")}

ACTIVE_KEY = f"{PACK}.text_layers.active"  # token of the TextLayerPatch in force on a model
PLAN_KEY = f"{PACK}.text_layers.plan"  # per model call (DiT): which rows take which rows' text K/V
MARK_KEY = f"{PACK}.text_layers.heads_mark"  # UNet heads subset: did the override run on this layer?
WRAPPER_KEY = f"{PACK}.text_layers"
CHECK_KEY = f"{PACK}.text_layers.target_check"  # APPLY_MODEL wrapper comparing the target with the negative prompt
HOOK_KEY = f"{PACK}.text_layers"  # key of its attn2 patches
TARGET_UUID = uuid.UUID("7e7a1a7e-0000-4000-8000-7e7a1a7e7e7a")  # chunk id of the appended target rows


def parse_heads(spec: str) -> tuple[int, ...] | None:
    """'0-3,7' -> (0, 1, 2, 3, 7); empty or 'all' -> None (every head)."""
    spec = (spec or "").strip().lower()
    if spec in ("", "all"):
        return None
    heads = set()
    for token in re.split(r"[,;\s]+", spec):
        if not token:
            continue
        if not re.fullmatch(r"\d+(-\d+)?", token):
            raise ValueError(f"heads: {token!r} is not a head index or range; write e.g. '0-3,7' (0-based), or leave "
                             f"it empty for every head.")
        try:
            heads.update(int_range(token))
        except ValueError as e:
            raise ValueError(f"heads: {e}; write the lower index first, e.g. '0-3'.") from e
    return tuple(sorted(heads))


# ----------------------------------------------------------------------------------------------
# the target conditioning
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TargetText:
    context: torch.Tensor  # (1, L, C) on the CPU (moved to each call's device/dtype)
    pooled: torch.Tensor | None  # (1, P) or None
    extras: dict = dataclasses.field(default_factory=dict)  # the entry's other (1, ...) tensors, by conditioning key

    @property
    def tokens(self) -> int:
        return int(self.context.shape[1])

    @property
    def channels(self) -> int:
        return int(self.context.shape[-1])

    @classmethod
    def from_conditioning(cls, conditioning, name: str = "target") -> TargetText:
        if not conditioning:
            raise ValueError(f"{name}: the conditioning is empty. Connect a CLIPTextEncode (or the word substitution "
                             f"node) with the edited prompt.")
        if len(conditioning) != 1:
            raise ValueError(f"{name}: the conditioning has {len(conditioning)} entries (combined, area or scheduled "
                             f"conditionings); the text layers take one prompt. Encode the edited prompt with a single "
                             f"CLIPTextEncode.")
        tensor, extra = conditioning[0][0], conditioning[0][1] or {}
        if not torch.is_tensor(tensor) or tensor.ndim != 3 or tensor.shape[0] != 1:
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{name}: expected one text embedding of shape (1, tokens, channels), got {shape}.")
        pooled = extra.get("pooled_output")
        if pooled is not None and (not torch.is_tensor(pooled) or pooled.ndim != 2):
            pooled = None
        extras = {k: v.detach() for k, v in extra.items()
                  if k != "pooled_output" and torch.is_tensor(v) and v.ndim >= 2 and v.shape[0] == 1}
        return cls(tensor.detach(), None if pooled is None else pooled.detach(), extras)


# ----------------------------------------------------------------------------------------------
# the settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PatchSettings:
    layers: tuple
    start_percent: float = 0.0
    end_percent: float = 1.0
    strength: float = 1.0
    heads: tuple[int, ...] | None = None
    rows: str = "positive"
    # step_fraction: fractions of the steps the sampler runs (steps ceil(start·n) .. ceil(end·n) - 1);
    # timestep_percent: ComfyUI's timestep percents, as ConditioningSetTimestepRange: the steps whose schedule sigma
    # lies in [sigmas[1], sigmas[0]] = (percent_to_sigma(end), percent_to_sigma(start)), closed
    range_unit: str = "step_fraction"
    sigmas: tuple[float, float] | None = None

    def validate(self) -> None:
        if self.range_unit not in RANGE_UNITS:
            raise ValueError(f"range_unit must be one of {', '.join(RANGE_UNITS)}, got {self.range_unit!r}.")
        for name in ("start_percent", "end_percent", "strength"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be between 0 and 1, got {value}.")
        if self.start_percent > self.end_percent:
            raise ValueError(f"start_percent ({self.start_percent}) must not be above end_percent ({self.end_percent}): "
                             f"the patch runs on the steps from start to end (fractions of the sampling steps).")
        if self.rows not in ROW_MODES:
            raise ValueError(f"rows must be one of {', '.join(ROW_MODES)}, got {self.rows!r}.")

    @property
    def roles(self) -> tuple[str, ...]:
        return ROW_ROLES[self.rows]

    def is_noop(self) -> bool:
        return not self.layers or self.strength <= 0.0 or self.start_percent >= 1.0 or \
            self.start_percent >= self.end_percent


def _step_window(to: dict, s: PatchSettings) -> tuple[int, int] | None:
    run = runs.run_state(to)
    ss = run.sample_sigmas if run is not None else None  # the run's host copy: no wait for the device
    if ss is None:
        ss = to.get("sample_sigmas")
    if ss is None:
        return None
    return step_window(s, ss)


def step_window(s: PatchSettings, ss: torch.Tensor) -> tuple[int, int]:
    """First patched step and one past the last, of the schedule ``ss`` the sampler runs."""
    if s.range_unit == "step_fraction" or s.sigmas is None:
        return runs.fraction_window(s.start_percent, s.end_percent, ss)
    hi_sigma, lo_sigma = s.sigmas
    n = len(ss) - 1
    inside = [i for i in range(n) if lo_sigma * (1 - 1e-5) <= float(ss[i]) <= hi_sigma * (1 + 1e-5)]
    return (inside[0], inside[-1] + 1) if inside else (n, n)


def _is_active(to: dict, s: PatchSettings, token: str) -> bool:
    """This patch is the one in force on the model and the current step is inside [start, end)."""
    if to.get(ACTIVE_KEY) != token:
        return False
    step = runs.current_step(to)
    window = _step_window(to, s) if step is not None else None
    if step is None or window is None:  # not inside a sampler run: only an all-steps patch applies
        return s.start_percent <= 0.0 and s.end_percent >= 1.0
    return window[0] <= step < window[1]


START_MODES = ("start_percent", "paper")


def paper_start(family) -> float | None:
    """Paper 2's start fraction of the steps for the family's preset (registry field ``preset_start``: step 4 of 50
    on SDXL = 0.08, step 2 of 28 on SD3 Medium ≈ 0.07); None where the registry has none."""
    return None if family.preset_start is None else float(family.preset_start)


def resolve_start(ml: ModelLayers, start_percent: float, start_mode: str) -> float:
    if start_mode not in START_MODES:
        raise ValueError(f"start_mode must be one of {', '.join(START_MODES)}, got {start_mode!r}.")
    if start_mode == "start_percent":
        return float(start_percent)
    value = paper_start(ml.family)
    if value is None:
        raise ValueError(f"start_mode=paper: the model-family registry has no paper 2 start step for {ml.label} (the "
                         f"paper gives one for the architectures it localized: SDXL base, step 4 of 50 = 0.08, and SD3 "
                         f"Medium, step 2 of 28 ≈ 0.07). Use start_mode=start_percent and set start_percent, or "
                         f"TextLayerLocalize's best_start.")
    return value
