"""Reusable float32 buffers for the temporaries of a recorded call (scores, probabilities, elementwise products).

A temporary has the size of an attention map chunk. Allocating it afresh for every call costs more than the
arithmetic on CPU: a new 32 MiB tensor is page-faulted in at each call (measured: 15 ms for a multiply-reduce at
4 x 8 x 512 x 512 into a fresh tensor, 5 ms into a reused one). One set of buffers per thread (captures of
different threads never share one); a buffer is overwritten by the next call of the same thread, so nothing
written here may outlive the call that wrote it (captures copy lent probabilities before handing them out:
:meth:`~lightning_attn.capture.record.AttentionCapture.adopt_probs`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["WORKSPACE", "Buffer", "Workspace"]

#: ``(shape, device) -> float32 tensor`` to write into (a view of a reusable buffer).
Buffer = Callable[[torch.Size, torch.device], Tensor]


class Workspace(threading.local):
    """Two named buffers per device and thread, grown to the largest size asked and kept until :meth:`release`."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.device], Tensor] = {}
        self.scores: Buffer = lambda shape, device: self._view("scores", shape, device)
        self.probs: Buffer = lambda shape, device: self._view("probs", shape, device)

    def _view(self, name: str, shape: torch.Size, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        flat = self._flat.get((name, device))
        if flat is None or flat.numel() < numel:
            # float32 whatever the default dtype (Lightning's "bf16-true" changes it); a normal tensor, writable in and
            # out of inference mode
            with torch.inference_mode(False):
                flat = self._flat[(name, device)] = torch.empty(numel, dtype=torch.float32, device=device)
        return flat[:numel].view(shape)

    def held_bytes(self) -> int:
        """Bytes this thread's buffers hold."""
        return sum(flat.numel() * flat.element_size() for flat in self._flat.values())

    def release(self) -> None:
        """Free this thread's buffers (allocated again at the next use)."""
        self._flat.clear()


#: The buffers every recorder and the statistics engine share.
WORKSPACE = Workspace()
