"""The pack's shared core: run tracking and step arithmetic (``runs``), chained hooks (``hooks``), the model-family
registry (``families``), the one layer type and layer grammar (``layers``), per-run record handles (``records``)
and the pack's error types (``errors``). Techniques import from here and from ``nodes.shared``, never from each
other."""

import logging

PACK = "prompt_anatomy"
LOG = logging.getLogger(PACK)
