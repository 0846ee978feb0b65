"""Guidance cutoff (paper 1, Sec. 6, eq. 9): classifier-free guidance for the early steps only."""

from .logic import (
    ADAPTIVE_MODES,
    KEEP_MODES,
    WRAPPER_KEY,
    CutoffRun,
    CutoffSettings,
    apply_cutoff,
    format_report,
    format_total,
    newest_schedule,
)
from .nodes import NODES, GuidanceCutoffGuider, GuidanceCutoffKSampler, GuidanceCutoffPatch, GuidanceCutoffReport

__all__ = ["ADAPTIVE_MODES", "KEEP_MODES", "NODES", "WRAPPER_KEY", "CutoffRun", "CutoffSettings", "GuidanceCutoffGuider",
           "GuidanceCutoffKSampler", "GuidanceCutoffPatch", "GuidanceCutoffReport", "apply_cutoff", "format_report",
           "format_total", "newest_schedule"]
