"""A small ONNX graph accumulator whose initializers stream straight to an external-data file.

Each initializer's bytes are written when it is added (4 KiB aligned, so onnxruntime can
memory-map them) and only a reference is kept in memory: exporting never holds the model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]

_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.uint8): TensorProto.UINT8,
           np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32}


class DataFile:
    """An external-data file that several graphs can share; tensors are 4 KiB aligned."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.bytes_written = 0

    def write(self, raw: bytes) -> int:
        """Append `raw` at the next aligned offset; returns that offset."""
        self._f.write(b"\0" * (-self._f.tell() % ALIGN))
        offset = self._f.tell()
        self._f.write(raw)
        self.bytes_written += len(raw)
        return offset

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class Graph:
    def __init__(self, data: DataFile, *, inline_below: int = 1024):
        self.data = data
        self.inline_below = inline_below     # smaller initializers stay inside the .onnx
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; small ones stay inline, the rest go to the data file."""
        a = np.ascontiguousarray(array)
        if a.dtype not in _DTYPES:
            raise TypeError(f"{name}: unsupported dtype {a.dtype}")
        if a.nbytes < self.inline_below:
            t = onnx.numpy_helper.from_array(a, name)
        else:
            t = external_tensor(name, a.dtype, a.shape, self.data.path.name, self.data.write(a.tobytes()))
        self.initializers.append(t)
        return name

    def offset_of(self, name: str) -> int | None:
        """Where initializer `name` lies in the data file (None: stored inline)."""
        for t in self.initializers:
            if t.name == name:
                return next((int(kv.value) for kv in t.external_data if kv.key == "offset"), None)
        raise KeyError(name)

    def shared_weight(self, name: str, dtype, shape, offset: int) -> str:
        """An initializer whose bytes another graph already wrote to the shared data file."""
        self.initializers.append(external_tensor(name, dtype, shape, self.data.path.name, offset))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, name: str | None = None,
           outputs: list[str] | None = None, domain: str = "", **attrs) -> list[str]:
        """Append a node; its outputs are `outputs` (graph outputs) or fresh names."""
        base = self.fresh(name or op_type)
        outs = outputs or [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, 1, **kw)[0]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        """Declare a graph output (a node must produce `name`)."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def save(self, path: Path, name: str = "edge_decoder") -> None:
        g = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(g, opset_imports=OPSETS, producer_name="edge")
        m.ir_version = 10
        onnx.save_model(m, str(path))


def external_tensor(name: str, dtype, shape, location: str, offset: int) -> onnx.TensorProto:
    """An initializer whose bytes live at `offset` in the file `location` next to the model."""
    dtype = np.dtype(dtype)
    t = TensorProto(name=name, data_type=_DTYPES[dtype], dims=list(shape), data_location=TensorProto.EXTERNAL)
    length = int(np.prod(shape)) * dtype.itemsize
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t
