"""Python views of the C records.  Layouts come from the compiled module
(``ffi.typeof(...).fields``), never from a second hand-written copy.

A spec's record fields compile to a :class:`RecordLayout`: each field takes
whole 8-byte words of the record (``ENG_MAX_FIELD_WORDS`` at most), in
declaration order; C keeps each word's type and checks it on every write.
"""

from __future__ import annotations

import collections
import keyword
import math
import operator
import re
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from engine._native import ffi, lib
from engine.errors import EngineTypeError, FieldError, SpecError, shown

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
    """One consistent record of a position (the default position spec)."""

    entry_price: float
    amount: float
    stop_loss: float
    take_profit: float
    trailing_stop: float
    token: int
    opened_ns: int
    side: int
    exit_reason: int
    account: int
    exit_price: float
    version: int


PRICE_STRUCT, _price_names = struct_for("eng_price_out")
# the NamedTuple above names the C fields in C order
assert _price_names == ["price", "ts_ns", "pnl_pct", "pnl_usd", "version"], _price_names

OP_METRICS_DTYPE = dtype_for("eng_op_metrics")
PROC_DTYPE = dtype_for("eng_proc")
ACCOUNT_ROW_DTYPE = dtype_for("eng_account_row")
#: one element of Engine.prices(ids): the fields of PriceSnapshot, C names
PRICES_DTYPE = dtype_for("eng_price_out")

# -- record layouts ----------------------------------------------------------------------

_WORD = 8
_MAX_WORDS = lib.ENG_MAX_FIELD_WORDS
_KEY_MAX = lib.ENG_KEY_MAX
_BYTES = re.compile(r"S([1-9][0-9]?)$")
#: type: (word type code, struct code, numpy code, (low, high) or None)
_NUMERIC: dict[str, tuple[int, str, str, tuple[int, int] | None]] = {
    "f8": (lib.ENG_FT_F8, "d", "<f8", None),
    "i8": (lib.ENG_FT_I8, "q", "<i8", (-(2**63), 2**63 - 1)),
    "i4": (lib.ENG_FT_I4, "q", "<i4", (-(2**31), 2**31 - 1)),   # sign-extended word
    "u8": (lib.ENG_FT_U8, "Q", "<u8", (0, 2**64 - 1)),
}
#: fields the engine itself reads, with the type each must have
ROLES = {"entry_price": (lib.ENG_ROLE_ENTRY_PRICE, ("f8",)),
         "amount": (lib.ENG_ROLE_AMOUNT, ("f8",)),
         "side": (lib.ENG_ROLE_SIDE, ("i4", "i8")),
         "token": (lib.ENG_ROLE_TOKEN, ("i8",)),
         "opened_ns": (lib.ENG_ROLE_OPENED_NS, ("i8",)),
         # the account the opening reserved on: only where PnL is computed
         "account": (lib.ENG_ROLE_ACCOUNT, ("i8",))}
_PNL = ("entry_price", "amount", "side")
#: fields exits read and write (engine.spec.EXIT_FIELDS), by C role; only
#: where PnL is computed.  Unlike ROLES they are not set at open only.
EXIT_ROLES = {"stop_loss": (lib.ENG_ROLE_STOP_LOSS, ("f8",)),
              "take_profit": (lib.ENG_ROLE_TAKE_PROFIT, ("f8",)),
              "trailing_stop": (lib.ENG_ROLE_TRAILING, ("f8",)),
              "exit_reason": (lib.ENG_ROLE_EXIT_REASON, ("i4", "i8")),
              "exit_price": (lib.ENG_ROLE_EXIT_PRICE, ("f8",))}
_FMAX = 1.7976931348623157e308
#: f8 fields that hold a price level, so never negative
PRICE_LEVELS = frozenset({"stop_loss", "take_profit", "trailing_stop", "exit_price"})
_ROW_FIELDS = dtype_for("eng_row").fields
assert _ROW_FIELDS is not None
_ROW_FIXED = [(n, f) for n, f in _ROW_FIELDS.items() if n != "w"]
_ROW_W = ffi.offsetof("eng_row", "w")
_OUT_VERSION = ffi.offsetof("eng_ctx_out", "version")
RESERVED = frozenset(n for n, _ in _ROW_FIXED) | {"version", "key"}


class Field(NamedTuple):
    """One record field: its type and the words it occupies."""

    name: str
    type: str           # f8, i8, i4, u8 or S<n>
    word: int           # first word
    words: int          # words it spans
    size: int           # bytes of the value (S<n>: n)


class RecordLayout:
    """The compiled record of a spec: fields to words, with value checks.

    >>> r = RecordLayout({"qty": "f8", "side": "i4", "venue": "S8"})
    >>> r.n_words, [f.word for f in r.fields]
    (3, [0, 1, 2])
    """

    def __init__(self, fields: Mapping[str, str]) -> None:
        if not isinstance(fields, Mapping):
            raise SpecError(f"fields must be a mapping of name to type, got {fields!r:.80}")
        self.types: dict[str, str] = dict(fields)
        out: list[Field] = []
        word = 0
        for name, ftype in self.types.items():
            if (not isinstance(name, str) or not name.isidentifier() or name.startswith("_")
                    or keyword.iskeyword(name)):
                raise SpecError(f"field names must be identifiers that are not Python keywords "
                                f"and do not start with '_', got {name!r}")
            if name in RESERVED:
                raise SpecError(f"field name {name!r} is taken by a snapshot column; "
                                f"reserved: {sorted(RESERVED)}")
            m = _BYTES.fullmatch(ftype) if isinstance(ftype, str) else None
            if isinstance(ftype, str) and ftype in _NUMERIC:
                size = _WORD
            elif m and 1 <= int(m.group(1)) <= 32:
                size = int(m.group(1))
            else:
                raise SpecError(f"field {name!r}: type must be one of f8, i8, i4, u8 or "
                                f"S1..S32, got {ftype!r}")
            words = -(-size // _WORD)
            out.append(Field(name, ftype, word, words, size))
            word += words
        if word > _MAX_WORDS:
            raise SpecError(f"the fields take {word} words of 8 bytes; a record holds at most "
                            f"{_MAX_WORDS}")
        self.fields: tuple[Field, ...] = tuple(out)
        self.by_name: dict[str, Field] = {f.name: f for f in out}
        self.n_words = word
        self.roles: dict[str, int] = {}
        for name, (_, allowed) in ROLES.items():
            f = self.by_name.get(name)
            if f is not None:
                if f.type not in allowed:
                    raise SpecError(f"field {name!r} is read by the engine and must be "
                                    f"{' or '.join(allowed)}, got {f.type!r}")
                self.roles[name] = f.word
        #: PnL is computed in C when the record has all three
        self.pnl = all(n in self.roles for n in _PNL)
        if not self.pnl:
            for n in (*_PNL, "account"):
                self.roles.pop(n, None)
        #: fields set at open only: the engine reads them
        self.fixed = frozenset(self.roles)
        #: exit fields (EXIT_ROLES) of the right type -> word; only with PnL
        self.exit_roles: dict[str, int] = {
            n: self.by_name[n].word for n, (_, ok) in EXIT_ROLES.items()
            if self.pnl and n in self.by_name and self.by_name[n].type in ok}
        names = [f.name for f in out]
        self.Context: type[tuple[Any, ...]] = (
            Context if names == list(Context._fields[:-1]) else
            collections.namedtuple("Context", [*names, "version"]))
        self._struct = _unpacker(out)
        #: name -> (exact class, pack_into, offset, low, high, mask): values
        #: of that class in [low, high] need no other check (NaN fails both
        #: compares; price levels start at 0)
        self._plain: dict[str, tuple[Any, ...]] = {}
        for f in out:
            if f.type in _NUMERIC:
                _, fmt, _, bounds = _NUMERIC[f.type]
                lo, hi = bounds or ((0.0 if f.name in PRICE_LEVELS else -_FMAX), _FMAX)
                self._plain[f.name] = (float if bounds is None else int,
                                       struct.Struct("<" + fmt).pack_into, f.word * _WORD,
                                       lo, hi, 1 << f.word)
        self._bytes_at = tuple(i for i, f in enumerate(out) if f.type[0] == "S")
        self.row_dtype = np.dtype({
            "names": [n for n, _ in _ROW_FIXED] + names,
            "formats": [f[0] for _, f in _ROW_FIXED] + [_np_code(f) for f in out],
            "offsets": [f[1] for _, f in _ROW_FIXED] + [_ROW_W + f.word * _WORD for f in out],
            "itemsize": ffi.sizeof("eng_row")})

    def c_layout(self, keys_per_position: int,
                 exits: tuple[int, int] | None = None) -> Any:
        """The ``eng_rec_layout`` for eng_format; ``exits``: the armed state's
        index and the exit trigger's (None: the spec has no exits)."""
        lay = ffi.new("eng_rec_layout *")
        lay.n_words = self.n_words
        lay.keys_per_position = keys_per_position
        for f in self.fields:
            code = _NUMERIC[f.type][0] if f.type in _NUMERIC else lib.ENG_FT_BYTES
            for w in range(f.word, f.word + f.words):
                lay.word_type[w] = code
        for k in range(lib.ENG_ROLE_COUNT):
            lay.roles[k] = lib.ENG_ROLE_NONE
        if self.roles:
            for name, word in self.roles.items():
                lay.roles[ROLES[name][0]] = word
        for name, word in self.exit_roles.items():
            lay.roles[EXIT_ROLES[name][0]] = word
        lay.exit_state, lay.exit_trigger = exits if exits is not None else (
            lib.ENG_EXITS_NONE, 0)
        return lay

    # -- values ----------------------------------------------------------------------
    def field(self, name: str) -> Field:
        try:
            return self.by_name[name]
        except KeyError:   # a TypeError, as Python's own unexpected keyword argument
            raise EngineTypeError(f"unknown field {name!r}; the record has "
                                  f"{[f.name for f in self.fields]}") from None

    def encode(self, name: str, value: Any) -> bytes:
        """The words of one field's value; a typed error if it does not fit."""
        f = self.field(name)
        if f.type[0] == "S":
            if isinstance(value, str):
                try:
                    value = value.encode()
                except UnicodeEncodeError as e:
                    raise FieldError(f"field {name!r} ({f.type}): a str must encode as UTF-8, "
                                     f"got {shown(value)} ({e.reason})") from None
            if not isinstance(value, (bytes, bytearray)):
                raise EngineTypeError(f"field {name!r} ({f.type}) takes bytes or str, got "
                                      f"{shown(value)} ({type(value).__name__})")
            if len(value) > f.size:
                raise FieldError(f"field {name!r} ({f.type}) holds at most {f.size} bytes, "
                                 f"got {len(value)}")
            return bytes(value).ljust(f.words * _WORD, b"\0")
        _, fmt, _, bounds = _NUMERIC[f.type]
        if bounds is None:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating,
                                                                 np.integer)):
                raise EngineTypeError(f"field {name!r} (f8) takes a real number, got "
                                      f"{shown(value)} ({type(value).__name__})")
            try:
                v = float(value)
            except OverflowError:
                v = math.inf
            if not math.isfinite(v):
                raise FieldError(f"field {name!r} (f8) must be finite, got {shown(value)}")
            if v < 0 and name in PRICE_LEVELS:
                raise FieldError(f"field {name!r} is a price level: finite and >= 0, "
                                 f"got {shown(value)}")
            return struct.pack("<d", v)
        if isinstance(value, bool):
            raise EngineTypeError(f"field {name!r} ({f.type}) takes an int, got {shown(value)}")
        try:
            iv = operator.index(value)
        except TypeError:
            raise EngineTypeError(f"field {name!r} ({f.type}) takes an int, got {shown(value)} "
                                  f"({type(value).__name__})") from None
        if not bounds[0] <= iv <= bounds[1]:
            raise FieldError(f"field {name!r} ({f.type}) must be in [{bounds[0]}, {bounds[1]}], "
                             f"got {shown(iv)}")
        return struct.pack("<" + fmt, iv)

    def pack(self, values: Mapping[str, Any], into: Any) -> int:
        """Encode ``values`` into the word array ``into`` (a cffi uint64_t[]
        of ENG_MAX_FIELD_WORDS); returns the mask of words written.  Every
        value is checked before anything is written."""
        buf = bytearray(_MAX_WORDS * _WORD)
        mask = 0
        plain = self._plain
        for name, value in values.items():
            p = plain.get(name)
            if p is not None and value.__class__ is p[0] and p[3] <= value <= p[4]:
                p[1](buf, p[2], value)   # the common case: an exact float / int in range
                mask |= p[5]
                continue
            f = self.field(name)
            buf[f.word * _WORD:(f.word + f.words) * _WORD] = self.encode(name, value)
            mask |= ((1 << f.words) - 1) << f.word
        ffi.memmove(into, buf, _MAX_WORDS * _WORD)
        return mask

    def unpack(self, view: memoryview) -> tuple[Any, ...]:
        """Field values and version from an ``eng_ctx_out``."""
        values = self._struct.unpack_from(view)
        if self._bytes_at:
            out = list(values)
            for i in self._bytes_at:
                out[i] = out[i].rstrip(b"\0")
            return tuple(out)
        return values


def _np_code(f: Field) -> str:
    return _NUMERIC[f.type][2] if f.type in _NUMERIC else f"S{f.size}"


def _unpacker(fields: tuple[Field, ...] | list[Field]) -> struct.Struct:
    fmt, pos = "<", 0
    for f in fields:
        off = f.word * _WORD
        fmt += "x" * (off - pos)
        if f.type in _NUMERIC:
            fmt += _NUMERIC[f.type][1]
            pos = off + _WORD
        else:
            fmt += f"{f.size}s"
            pos = off + f.size
    fmt += "x" * (_OUT_VERSION - pos) + "Q"
    return struct.Struct(fmt)
