"""The attention cache: the buffers the manifest lists (GraphSpec.cache), allocated at one context
length and bound to a session's inputs and outputs. Every decoder (dense, fused, staged) and the
planner size and bind the cache here.

    in_place  past and present are one OrtValue over the whole buffer, bound once; the graph
              (GroupQueryAttention) writes the new tokens' rows itself
    append    past  = the buffer's first `position` tokens     (a view: no copy)
              present = tokens [position, position + S)        (a view the graph's output fills)
              rebound at every step, as both move
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .manifest import CacheBuffer


class KVCache:
    def __init__(self, buffers: tuple[CacheBuffer, ...], context_length: int):
        self.buffers = buffers
        self.context_length = context_length
        # one array per buffer: zeros, so memory is committed only as tokens fill it
        self.arrays = [np.zeros(b.at(context_length), np.float32) for b in buffers]
        self._axis = [b.shape.index(-1) for b in buffers]
        self._whole = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def appends(self, indices) -> bool:
        """Do any of these buffers need binding at every step?"""
        return any(self.buffers[i].update == "append" for i in indices)

    def bind(self, io: ort.IOBinding, indices) -> None:
        """Bind the in-place buffers `indices` (once: they never move)."""
        for i in indices:
            b = self.buffers[i]
            if b.update == "in_place":
                io.bind_ortvalue_input(b.input, self._whole[i])
                io.bind_ortvalue_output(b.output, self._whole[i])

    def bind_step(self, io: ort.IOBinding, indices, position: int, new_tokens: int) -> list:
        """Bind the appended buffers `indices` for a step writing tokens [position, position +
        new_tokens): returns the OrtValues, to keep alive until the step has run."""
        keep = []
        for i in indices:
            b = self.buffers[i]
            if b.update != "append":
                continue
            lead = (slice(None),) * self._axis[i]           # size-1 axes: the views stay contiguous
            a = self.arrays[i]
            past = ort.OrtValue.ortvalue_from_numpy(a[lead + (slice(0, position),)])
            new = ort.OrtValue.ortvalue_from_numpy(a[lead + (slice(position, position + new_tokens),)])
            io.bind_ortvalue_input(b.input, past)
            io.bind_ortvalue_output(b.output, new)
            keep += [past, new]
        return keep
