"""Low/high frequency split of latents and images (paper 1, Sec. 4.2, Fig. 2, Prop. 1): split/merge nodes, the
sampling recorder and viewer, and the noising analysis."""

from .nodes import (
                    NODES,
                    FrequencyMerge,
                    FrequencyMergeImage,
                    FrequencyNoisingAnalysis,
                    FrequencySplit,
                    FrequencySplitImage,
                    FrequencySplitPreview,
                    FrequencySplitViewer,
)

__all__ = ["NODES", "FrequencyMerge", "FrequencyMergeImage", "FrequencyNoisingAnalysis", "FrequencySplit",
           "FrequencySplitImage", "FrequencySplitPreview", "FrequencySplitViewer"]
