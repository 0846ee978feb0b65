"""Cross-attention maps (paper 1, Sec. 4.1 and 5.1, Fig. 1 and 3): capture while sampling, view afterwards."""

from .capture import install_capture
from .nodes import NODES, CrossAttentionCapture, CrossAttentionMapViewer

__all__ = ["NODES", "CrossAttentionCapture", "CrossAttentionMapViewer", "install_capture"]
