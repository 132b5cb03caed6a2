"""Where a model that onnxruntime saved keeps each initializer's bytes and their prepacked copies in
its data file, read from the model's protobuf wire format: the runtime has no onnx package, and four
fields are all it needs (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8,
TensorProto.external_data = 13, each a StringStringEntryProto: key = 1, value = 2).

onnxruntime records a prepacked copy as an external_data entry "prepacked_<i>" whose value is
"<kernel key>|<offset>;<length>;<checksum>|..." (one offset;length;checksum per packed buffer).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Blob:
    tensor: str                  # the initializer's name
    packed: bool                 # a prepacked copy (else the initializer's own bytes)
    offset: int
    length: int


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(field number, (start, end) of a length-delimited value, or None) for each field in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
            yield field, None
        elif wire == 2:
            n, i = _varint(buf, i)
            yield field, (i, i + n)
            i += n
        elif wire == 1:
            i += 8
            yield field, None
        elif wire == 5:
            i += 4
            yield field, None
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {i}")


def _first(buf: bytes, span, number: int):
    return next((v for f, v in _fields(buf, *span) if f == number and v is not None), None)


def blobs(model: bytes) -> list[Blob]:
    """Every byte range of the data file the saved model's initializers point at."""
    out = []
    graph = _first(model, (0, len(model)), 7)
    if graph is None:
        raise ValueError("the saved model has no graph")
    for field, tensor in _fields(model, *graph):
        if field != 5 or tensor is None:
            continue
        name_span = _first(model, tensor, 8)
        name = model[name_span[0]:name_span[1]].decode() if name_span else ""
        entries = {}
        for f, entry in _fields(model, *tensor):
            if f == 13 and entry is not None:
                k, v = _first(model, entry, 1), _first(model, entry, 2)
                if k is not None and v is not None:
                    entries[model[k[0]:k[1]].decode()] = model[v[0]:v[1]].decode()
        if "offset" in entries or "length" in entries:
            out.append(Blob(name, False, int(entries.get("offset", 0)), int(entries["length"])))
        for key, value in sorted(entries.items()):
            if key.startswith("prepacked"):
                for piece in value.split("|")[1:]:
                    offset, length, _ = piece.split(";")
                    out.append(Blob(name, True, int(offset), int(length)))
    return out
