"""Reusable history buffers for solvers on CPU.

A quasi-Newton solver keeps a history of ``m`` full states per sample (Anderson: 2m, Broyden:
2 × memory). For a ch.4 ResNet state at batch 16 one history row is 3 MiB, so a solve allocates
30–190 MiB. On CUDA the caching allocator hands the same memory back on the next solve; on CPU
glibc serves blocks this large with a fresh ``mmap`` each time (above its 32 MiB ceiling it always
does), and every 4 KiB page is then faulted in and zeroed on first touch: measured here, 23 000
faults per Broyden solve on that workload, several percent of its time.

:data:`workspace` keeps history buffers that solves have given back and hands them to the next
solve asking for the same shape, dtype and device (CPU only; elsewhere it just allocates). A
buffer is *taken* out of the pool while a solve uses it, so nested or concurrent solves never
share one. What it keeps is bounded (``max_bytes``, least recently returned dropped first) and
:meth:`Workspace.clear` releases everything. A buffer's content is undefined when handed out.
"""

from __future__ import annotations

import collections
import threading

import torch

from .accelerator import host_checks

#: what the pool keeps by default: a few histories of a large CPU state
DEFAULT_MAX_BYTES = 512 * 2**20


class Workspace:
    """A pool of uninitialised CPU buffers keyed by (shape, dtype, device)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._free: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers now waiting in the pool."""
        with self._lock:
            return sum(_nbytes(t) for t in self._free.values())

    def empty(self, *shape: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``shape`` tensor with ``like``'s dtype and device: a pooled one when
        there is one of exactly that kind, else a new one. Give it back with :meth:`give`."""
        if host_checks(like):
            key = (tuple(shape), like.dtype)
            with self._lock:
                for ident, buffer in self._free.items():
                    if (tuple(buffer.shape), buffer.dtype) == key:
                        del self._free[ident]
                        return buffer
        return like.new_empty(shape)

    def give(self, *buffers: torch.Tensor) -> None:
        """Return buffers that nothing will read again (CPU ones are kept for reuse)."""
        with self._lock:
            for buffer in buffers:
                # an inference-mode tensor cannot be written outside inference mode: not kept
                if (not host_checks(buffer) or buffer.requires_grad or buffer.is_inference()
                        or _nbytes(buffer) > self.max_bytes):
                    continue
                self._free[id(buffer)] = buffer
                self._free.move_to_end(id(buffer))
            held = sum(_nbytes(t) for t in self._free.values())
            while held > self.max_bytes:
                _, dropped = self._free.popitem(last=False)
                held -= _nbytes(dropped)

    def clear(self) -> None:
        """Drop every pooled buffer (their memory goes back to the allocator)."""
        with self._lock:
            self._free.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: the process-wide pool the built-in solvers use
workspace = Workspace()
