"""Python views of the C records.  Layouts come from the compiled module
(``ffi.typeof(...).fields``), never from a second hand-written copy."""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from engine._native import ffi

_STRUCT_CODES = {"double": "d", "int64_t": "q", "uint64_t": "Q", "int32_t": "i",
                 "uint32_t": "I", "uint8_t": "B"}
_NUMPY_CODES = {"double": "<f8", "int64_t": "<i8", "uint64_t": "<u8", "int32_t": "<i4",
                "uint32_t": "<u4", "uint8_t": "u1"}


def _flat_fields(ctype: str, prefix: str = "", base: int = 0) -> list[tuple[str, str, int, int]]:
    """(name, C type, offset, array length) of every leaf field, nested structs flattened."""
    out: list[tuple[str, str, int, int]] = []
    for name, f in ffi.typeof(ctype).fields:
        t = f.type
        if t.kind == "struct":
            out += _flat_fields(t.cname, "", base + f.offset)
        elif t.kind == "array":
            out.append((prefix + name, t.item.cname, base + f.offset, t.length))
        else:
            out.append((prefix + name, t.cname, base + f.offset, 0))
    return out


def struct_for(ctype: str, skip: tuple[str, ...] = ()) -> tuple[struct.Struct, list[str]]:
    """A ``struct.Struct`` that unpacks ``ctype`` (minus ``skip`` fields, which
    become padding) and the names of the values it returns."""
    fmt, names, pos = "<", [], 0
    for name, cname, off, length in _flat_fields(ctype):
        if length:
            raise TypeError(f"{ctype}.{name}: arrays are not unpacked")
        fmt += "x" * (off - pos)
        size = ffi.sizeof(cname)
        if name in skip:
            fmt += "x" * size
        else:
            fmt += _STRUCT_CODES[cname]
            names.append(name)
        pos = off + size
    fmt += "x" * (ffi.sizeof(ctype) - pos)
    s = struct.Struct(fmt)
    assert s.size == ffi.sizeof(ctype), ctype
    return s, names


def dtype_for(ctype: str, skip_prefix: str = "pad") -> np.dtype:
    """A numpy structured dtype with the C layout of ``ctype``."""
    names, formats, offsets = [], [], []
    for name, cname, off, length in _flat_fields(ctype):
        if name.startswith(skip_prefix):
            continue
        names.append(name)
        formats.append((_NUMPY_CODES[cname], (length,)) if length else _NUMPY_CODES[cname])
        offsets.append(off)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": ffi.sizeof(ctype)})


class PriceSnapshot(NamedTuple):
    """One consistent price record: never torn, version never goes back."""

    price: float
    timestamp_ns: int
    pnl_pct: float
    pnl_usd: float
    version: int


class Context(NamedTuple):
    """One consistent context record of a position."""

    entry_price: float
    amount: float
    stop_loss: float
    take_profit: float
    token: int
    opened_ns: int
    side: int
    exit_reason: int
    version: int


PRICE_STRUCT, _price_names = struct_for("eng_price_out")
CONTEXT_STRUCT, _ctx_names = struct_for("eng_ctx_out")
# the NamedTuples above name the C fields in C order
assert _price_names == ["price", "ts_ns", "pnl_pct", "pnl_usd", "version"], _price_names
assert _ctx_names == [f for f in Context._fields], _ctx_names

ROW_DTYPE = dtype_for("eng_row")
OP_METRICS_DTYPE = dtype_for("eng_op_metrics")
PROC_DTYPE = dtype_for("eng_proc")
