"""One record handle for per-run recordings (frequency recorder, attention capture): a node returns a
:class:`RecordHandle`, every finished sampling run is published to it, and a viewer picks the run that produced
the LATENT it is given."""

from __future__ import annotations

import itertools
from collections import deque

import torch

RUNS_KEPT = 4  # runs a handle remembers: enough for a compare workflow (several samplers on one record)

_serial = itertools.count(1)


class RecordHandle:
    """Finished runs of one recording node (the last :data:`RUNS_KEPT`); each run has ``final`` (the sampler's
    output latent, CPU fp32, under ``latent_attr``); ``settings`` describe what the node records."""

    def __init__(self, kind: str, settings=None, latent_attr: str = "final"):
        self.kind = kind
        self.settings = settings
        self.latent_attr = latent_attr  # the run attribute holding the latent the sampler node outputs
        self.serial = next(_serial)  # distinguishes the per-run stores of two recordings on one model
        self.runs: deque = deque(maxlen=RUNS_KEPT)

    def publish(self, run) -> None:
        self.runs.append(run)

    def find(self, samples: torch.Tensor | None):
        """(the newest run whose output latent equals ``samples``, True), else (the newest run or None, False)."""
        if isinstance(samples, torch.Tensor):
            s = samples.detach().float().cpu()
            for run in reversed(self.runs):
                out = getattr(run, self.latent_attr)
                if tuple(out.shape) == tuple(s.shape) and torch.allclose(out, s, rtol=1e-4, atol=1e-4):
                    return run, True
        return (self.runs[-1] if self.runs else None), False

    @staticmethod
    def expect(record, kind: str, producer: str) -> RecordHandle:
        """``record`` if it is a handle of ``kind``; else the ValueError that names the node producing one."""
        if not (isinstance(record, RecordHandle) and record.kind == kind):
            raise ValueError(f"record must be the record output of a {producer} node.")
        return record

    def __repr__(self) -> str:
        return f"RecordHandle({self.kind}, {len(self.runs)} runs)"
