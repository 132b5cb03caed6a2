"""The attention cache: the buffers the manifest lists (GraphSpec.cache), allocated at one context
length and bound to a session's inputs and outputs. Every decoder (dense, fused, staged) and the
planner size and bind the cache here.

    in_place  past and present are one OrtValue over the whole buffer, bound once; the graph
              (GroupQueryAttention) writes the new tokens' rows itself
    append    past  = the buffer's first `position` tokens     (a view: no copy)
              present = tokens [position, position + S)        (a view the graph's output fills)
              rebound at every step, as both move
    concat    past  = the cache so far, `position` tokens; present = a new array of position + S
              tokens that the graph fills (past and the new tokens), the next step's past
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .manifest import CacheBuffer


class KVCache:
    def __init__(self, buffers: tuple[CacheBuffer, ...], context_length: int):
        self.buffers = buffers
        self.context_length = context_length
        # one array per buffer: zeros, so memory is committed only as tokens fill it; a concat
        # buffer's array holds exactly the cached tokens
        self.arrays = [np.zeros(b.at(0 if b.update == "concat" else context_length), np.float32) for b in buffers]
        self._next: dict[int, np.ndarray] = {}          # concat: the present arrays of the step being run
        self._axis = [b.shape.index(-1) for b in buffers]
        self._whole = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]

    @property
    def nbytes(self) -> int:
        return sum(b.bytes_per_token() * self.context_length for b in self.buffers)

    def appends(self, indices) -> bool:
        """Do any of these buffers need binding at every step?"""
        return any(self.buffers[i].update != "in_place" for i in indices)

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
            if b.update == "concat":
                past = ort.OrtValue.ortvalue_from_numpy(self.arrays[i])
                self._next[i] = np.empty(b.at(position + new_tokens), np.float32)
                new = ort.OrtValue.ortvalue_from_numpy(self._next[i])
                io.bind_ortvalue_input(b.input, past)
                io.bind_ortvalue_output(b.output, new)
                keep += [past, new]
                continue
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

    def stepped(self) -> None:
        """After a step ran: the concat buffers' presents become the cache."""
        for i, a in self._next.items():
            self.arrays[i] = a
        self._next.clear()

    def truncate(self, position: int) -> None:
        """Keep the first `position` tokens of the concat buffers (the others are overwritten in place)."""
        self._next.clear()
        for i, b in enumerate(self.buffers):
            axis = self._axis[i]
            if b.update == "concat" and self.arrays[i].shape[axis] != position:
                self.arrays[i] = np.ascontiguousarray(self.arrays[i][(slice(None),) * axis + (slice(0, position),)])
