"""EOS conditioning swap (paper 1, Sec. 5 and App. C-G): conditionings built from the [SOS], semantic and [EOS]
token states of two prompts."""

from .construct import (
                        CONSTRUCTIONS,
                        EOS_SCOPES,
                        KV_MODES,
                        POOLED_FROM,
                        RANGE_NUDGE,
                        SWAP_CONSTRUCTIONS,
                        build_construction,
                        repeat_semantic_tokens,
                        split_by_range,
)
from .nodes import NODES, EOSConditioningSwap, swap_conditioning

__all__ = ["CONSTRUCTIONS", "EOS_SCOPES", "KV_MODES", "NODES", "POOLED_FROM", "RANGE_NUDGE", "SWAP_CONSTRUCTIONS",
           "EOSConditioningSwap", "build_construction", "repeat_semantic_tokens", "split_by_range", "swap_conditioning"]
