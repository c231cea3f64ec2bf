"""Record fields per machine spec (``MachineSpec(fields=...)``).

Each field takes whole 8-byte words of the record, in declaration order (f8,
i8, i4, u8: one word; S<n>: ceil(n / 8) words), at most
``ENG_MAX_FIELD_WORDS``; C keeps each word's type and checks every write.
These tests pin the layout, the exact round trip of every type through
``open(**fields)``, ``context()``, ``snapshot()`` and ``transition(id,
trigger, **fields)``, the refusal of bad values (with nothing changed), the
atomicity of a field update with its state change as seen from another
process, the order lifecycle (``ORDER_SPEC``) with its keys, the spec
fingerprint and the memory cost per position.
"""

from __future__ import annotations

import math
import struct
import time
import traceback
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import collect

from engine import (
    ORDER_SPEC,
    POSITION_SPEC,
    ArgumentError,
    Context,
    Engine,
    EngineError,
    EngineTypeError,
    FieldError,
    KeyExistsError,
    MachineSpec,
    Outcome,
    PriceError,
    Rule,
    SpecError,
    SpecMismatchError,
    StaleIdError,
)
from engine._native import lib
from engine.records import RecordLayout

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

START_TIMEOUT = 60.0      # spawned interpreters import numpy and cffi: slow on a busy host
MAX_WORDS = lib.ENG_MAX_FIELD_WORDS
I4 = (-(2**31), 2**31 - 1)
I8 = (-(2**63), 2**63 - 1)
U8 = (0, 2**64 - 1)

#: one field of every type, bytes fields of every word count
ALL_TYPES = {"f": "f8", "i": "i8", "h": "i4", "u": "u8", "b1": "S1", "b8": "S8",
             "b9": "S9", "b16": "S16", "b17": "S17", "b32": "S32"}
#: (first word, words) of each, as documented: whole words in declaration order
ALL_TYPES_WORDS = {"f": (0, 1), "i": (1, 1), "h": (2, 1), "u": (3, 1), "b1": (4, 1),
                   "b8": (5, 1), "b9": (6, 2), "b16": (8, 2), "b17": (10, 3), "b32": (13, 4)}
FT_CODE = {"f8": lib.ENG_FT_F8, "i8": lib.ENG_FT_I8, "i4": lib.ENG_FT_I4,
           "u8": lib.ENG_FT_U8}


def two_state_spec(fields: dict[str, str] | None, name: str = "rec") -> MachineSpec:
    """A <-> B (TO_B, TO_A), DONE closed (FINISH from either); ``fields`` as given."""
    return MachineSpec(states=["A", "B", "DONE"], triggers=["TO_B", "TO_A", "FINISH"],
                       rules=[Rule.of("TO_B", "A", "B"), Rule.of("TO_A", "B", "A"),
                              Rule.of("FINISH", ["A", "B"], "DONE")],
                       initial="A", closed=["DONE"], name=name, fields=fields)


ALL_SPEC = two_state_spec(ALL_TYPES, "all_types")


def bits(x: float) -> bytes:
    """The exact bits of a double (tells -0.0 from 0.0)."""
    return struct.pack("<d", x)


def frozen(eng: Engine, pos: int) -> tuple[Any, ...]:
    """Everything a refused call must leave as it was: the slot's state word,
    the record (version and fields), the price version, every state word and
    the open rows."""
    slot = eng.slot_of(pos)
    rows = eng.snapshot()
    return (eng.state_word(slot), eng.context(pos), eng.price(pos).version,
            tuple(eng.state_word(s) for s in range(eng.capacity)), len(rows),
            tuple(int(i) for i in rows["id"]))


def row_of(eng: Engine, pos: int) -> Any:
    rows = eng.snapshot()
    match = rows[rows["id"] == pos]
    assert len(match) == 1, f"id {pos:#x} has {len(match)} snapshot rows"
    return match[0]


def expected(ftype: str, value: Any) -> Any:
    """What a field of ``ftype`` set to ``value`` reads back as."""
    if ftype[0] == "S":
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return raw.rstrip(b"\0")
    if ftype == "f8":
        return float(value)
    return int(value)


def assert_same(ftype: str, got: Any, want: Any, what: str) -> None:
    if ftype == "f8":
        assert bits(float(got)) == bits(want), f"{what}: {got!r} != {want!r} (bits)"
    elif ftype[0] == "S":
        assert bytes(got) == want, f"{what}: {got!r} != {want!r}"
    else:
        assert int(got) == want, f"{what}: {got!r} != {want!r}"


def check_everywhere(eng: Engine, pos: int, values: dict[str, Any]) -> None:
    """context() and the snapshot row of ``pos`` hold exactly ``values``
    (fields of ALL_TYPES not in ``values`` must read as 0)."""
    ctx = eng.context(pos)._asdict()
    row = row_of(eng, pos)
    for name, ftype in eng.spec.record.types.items():
        want = expected(ftype, values[name]) if name in values else expected(
            ftype, b"" if ftype[0] == "S" else 0)
        assert_same(ftype, ctx[name], want, f"context().{name}")
        assert_same(ftype, row[name], want, f"snapshot()[{name!r}]")


# =====================================================================================
class TestLayout:
    """Fields compile to whole words as documented; malformed specs are refused."""

    def test_types_map_to_words_in_declaration_order(self):
        """f8/i8/i4/u8 take one word, S<n> ceil(n/8) words, in order."""
        rec = RecordLayout(ALL_TYPES)
        assert {f.name: (f.word, f.words) for f in rec.fields} == ALL_TYPES_WORDS
        assert rec.n_words == 17
        assert [f.name for f in rec.fields] == list(ALL_TYPES)
        assert {f.name: f.size for f in rec.fields if f.type[0] == "S"} == {
            "b1": 1, "b8": 8, "b9": 9, "b16": 16, "b17": 17, "b32": 32}
        assert rec.fixed == frozenset()   # no role fields: every field is settable

    @pytest.mark.shm_only
    def test_segment_header_records_each_words_type(self, make_engine):
        """The segment header records every word's type: field codes, BYTES, 0 beyond the record."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        rec = eng._seg.hdr.rec
        assert rec.n_words == 17
        for name, ftype in ALL_TYPES.items():
            first, n = ALL_TYPES_WORDS[name]
            for w in range(first, first + n):
                assert rec.word_type[w] == FT_CODE.get(ftype, lib.ENG_FT_BYTES), (name, w)
        assert all(rec.word_type[w] == 0 for w in range(17, MAX_WORDS))
        assert all(rec.roles[k] == lib.ENG_ROLE_NONE for k in range(lib.ENG_ROLE_COUNT))

    def test_position_spec_roles(self):
        """The default record has 11 one-word fields, six of them roles set at open only."""
        rec = POSITION_SPEC.record
        assert rec.n_words == 11
        assert rec.fixed == {"entry_price", "amount", "side", "token", "opened_ns", "account"}
        assert rec.pnl

    @pytest.mark.parametrize("fields", [
        {f"f{i}": "f8" for i in range(MAX_WORDS + 1)},
        {**{f"s{i}": "S32" for i in range(MAX_WORDS // 4)}, "one": "S1"},
        {"big": "S32", **{f"x{i}": "i8" for i in range(MAX_WORDS - 3)}},
    ], ids=["25_f8", "6_S32_plus_S1", "S32_plus_21_i8"])
    def test_more_than_24_words_is_refused(self, fields):
        """A record of more than ENG_MAX_FIELD_WORDS words raises SpecError."""
        with pytest.raises(SpecError, match="words"):
            two_state_spec(fields)

    @pytest.mark.parametrize("ftype", [
        "f4", "i2", "u4", "i16", "F8", "I8", "s8", "S0", "S33", "S01", "S", "S-1", "S1.5",
        "bytes", "", " f8", "f8 ", "S8\n", "f8\n", 8, None, b"f8", float,
    ])
    def test_bad_type_strings_are_refused(self, ftype):
        """Any type string but exactly f8, i8, i4, u8 or S1..S32 raises SpecError.

        Anything but exactly f8, i8, i4, u8 or S1..S32 raises SpecError
        (no surrounding whitespace, no trailing newline, no other case).
        """
        with pytest.raises(SpecError):
            two_state_spec({"x": ftype})

    @pytest.mark.parametrize("name", [
        "price", "id", "version", "slot", "state", "generation", "locked", "transitions",
        "price_ts_ns", "pnl_pct", "pnl_usd", "price_version", "context_version", "key",
    ])
    def test_reserved_names_are_refused(self, name):
        """Names of snapshot columns (and version, key) raise SpecError."""
        with pytest.raises(SpecError, match="reserved"):
            two_state_spec({"qty": "f8", name: "i8"})

    @pytest.mark.parametrize("name", ["_x", "9a", "a-b", "a b", "", "é\n", 5])
    def test_non_identifier_names_are_refused(self, name):
        """Field names must be identifiers not starting with '_'."""
        with pytest.raises(SpecError):
            two_state_spec({name: "i8"})

    @pytest.mark.parametrize("name", ["class", "def", "None", "lambda"])
    def test_keyword_names_are_refused_with_spec_error(self, name):
        """A Python keyword as a field name raises SpecError, like every malformed spec."""
        with pytest.raises(SpecError):
            two_state_spec({name: "i8"})

    @pytest.mark.parametrize("name", ["pos", "trigger", "self"])
    def test_every_accepted_name_can_be_set(self, make_engine, name):
        """Every field name a spec accepts can be set by open() and by transition().

        A field name the spec accepts can be set by open(**fields) and by
        transition(id, trigger, **fields); a name that cannot (it collides with
        a parameter of those calls) must be refused by the spec instead.
        """
        try:
            spec = two_state_spec({name: "i8"}, f"param_{name}")
        except SpecError:
            return   # refused up front: fine
        eng = make_engine(capacity=2, spec=spec)
        pos = eng.open(**{name: 1})
        assert getattr(eng.context(pos), name) == 1
        assert eng.transition(pos, "TO_B", **{name: 2}) is Outcome.APPLIED
        assert getattr(eng.context(pos), name) == 2

    @pytest.mark.parametrize("fields", [
        {"token": "f8"}, {"token": "i4"}, {"token": "u8"}, {"token": "S8"},
        {"opened_ns": "f8"}, {"opened_ns": "u8"},
        {"entry_price": "i8", "amount": "f8", "side": "i4"},
        {"entry_price": "f8", "amount": "i4", "side": "i4"},
        {"entry_price": "f8", "amount": "f8", "side": "f8"},
        {"entry_price": "f8", "amount": "f8", "side": "u8"},
        {"entry_price": "f8", "amount": "f8", "side": "S1"},
    ])
    def test_role_fields_of_the_wrong_type_are_refused(self, fields):
        """A role field of the wrong type raises SpecError naming the field.

        Fields the engine reads (token, opened_ns, entry_price, amount, side)
        must have their type: SpecError naming the field otherwise.
        """
        bad = next(n for n, t in fields.items()
                   if (n, t) not in {("entry_price", "f8"), ("amount", "f8"),
                                     ("side", "i4")})
        with pytest.raises(SpecError, match=bad):
            two_state_spec(fields)

    def test_empty_record_works(self, make_engine):
        """A record without fields works: open, transition, context and snapshot."""
        eng = make_engine(capacity=2, spec=two_state_spec({}, "empty"))
        assert eng.spec.record.n_words == 0
        pos = eng.open()
        assert eng.transition(pos, "TO_B") is Outcome.APPLIED
        assert tuple(eng.context(pos)) == (1,)
        assert len(eng.snapshot()) == 1
        with pytest.raises(EngineTypeError, match="unknown field"):
            eng.transition(pos, "TO_A", x=1)

    def test_fields_must_be_a_mapping(self):
        """Record fields given as a list, not a mapping, are refused (SpecError)."""
        with pytest.raises(SpecError):
            two_state_spec([("x", "f8")])   # type: ignore[arg-type]

    def test_exactly_24_words_work_end_to_end(self, make_engine):
        """Six S32 fields (24 words, the limit) open, read and update exactly."""
        fields = {f"s{i}": "S32" for i in range(6)}
        eng = make_engine(capacity=2, spec=two_state_spec(fields, "full"))
        assert eng.spec.record.n_words == MAX_WORDS
        vals = {f"s{i}": bytes([65 + i]) * 32 for i in range(6)}
        pos = eng.open(**vals)
        check_everywhere(eng, pos, vals)
        vals["s5"] = b"\x01" + b"z" * 31
        assert eng.transition(pos, "TO_B", s5=vals["s5"]) is Outcome.APPLIED
        check_everywhere(eng, pos, vals)

    def test_twenty_four_one_word_fields_end_to_end(self, make_engine):
        """Each of 24 one-word fields of mixed types keeps its own value end to end."""
        types = ["f8", "i8", "i4", "u8"]
        fields = {f"w{i}": types[i % 4] for i in range(MAX_WORDS)}
        eng = make_engine(capacity=3, spec=two_state_spec(fields, "wide"))

        def val(i: int, k: int) -> Any:
            t = types[i % 4]
            return {"f8": i * 1.5 + k, "i8": -(i + 1) * 10**15 - k, "i4": -i * 1000 - k,
                    "u8": 2**63 + i * 7 + k}[t]

        vals = {f"w{i}": val(i, 0) for i in range(MAX_WORDS)}
        a = eng.open(**vals)
        b = eng.open(**{f"w{i}": val(i, 100) for i in range(MAX_WORDS)})
        check_everywhere(eng, a, vals)
        new = {f"w{i}": val(i, 1) for i in range(0, MAX_WORDS, 2)}
        assert eng.transition(a, "TO_B", **new) is Outcome.APPLIED
        check_everywhere(eng, a, {**vals, **new})
        check_everywhere(eng, b, {f"w{i}": val(i, 100) for i in range(MAX_WORDS)})


# =====================================================================================
F8_VALUES = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
             -1.7976931348623157e308, 1 / 3, -math.pi, 1e-300, 2.0**53 + 2]


class TestRoundTrip:
    """open / context / snapshot / transition give back exactly what was set."""

    @pytest.mark.parametrize("value", F8_VALUES, ids=repr)
    def test_f8_is_bit_exact(self, make_engine, value):
        """-0.0, subnormals, the largest doubles: the same 64 bits everywhere."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        pos = eng.open(f=value)
        check_everywhere(eng, pos, {"f": value})
        other = -value if value else 1.0
        assert eng.transition(pos, "TO_B", f=other) is Outcome.APPLIED
        check_everywhere(eng, pos, {"f": other})
        assert eng.transition(pos, "TO_A", f=value) is Outcome.APPLIED
        check_everywhere(eng, pos, {"f": value})

    @pytest.mark.parametrize(("name", "value"), [
        ("i", I8[0]), ("i", I8[1]), ("i", -1), ("i", 0),
        ("h", I4[0]), ("h", I4[1]), ("h", -1),
        ("u", U8[1]), ("u", 2**63), ("u", 0),
    ])
    def test_integer_extremes(self, make_engine, name, value):
        """i8, i4 and u8 hold their whole ranges exactly (i4 sign-extended)."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        pos = eng.open(**{name: value})
        check_everywhere(eng, pos, {name: value})
        assert eng.transition(pos, "TO_B", **{name: 7}) is Outcome.APPLIED
        check_everywhere(eng, pos, {name: 7})
        assert eng.transition(pos, "TO_A", **{name: value}) is Outcome.APPLIED
        check_everywhere(eng, pos, {name: value})

    def test_numpy_scalars_are_accepted(self, make_engine):
        """numpy scalars as field values round-trip exactly like Python numbers."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        pos = eng.open(f=np.float32(0.5), i=np.int64(I8[0]), h=np.int32(I4[0]),
                       u=np.uint64(U8[1]))
        check_everywhere(eng, pos, {"f": 0.5, "i": I8[0], "h": I4[0], "u": U8[1]})

    @pytest.mark.parametrize(("name", "value", "want"), [
        ("b1", b"x", b"x"), ("b1", b"\0", b""), ("b8", b"12345678", b"12345678"),
        ("b8", b"ab\0\0", b"ab"), ("b8", b"\0ab", b"\0ab"), ("b8", b"a\0b\0", b"a\0b"),
        ("b9", b"123456789", b"123456789"), ("b16", "Ünïcødé", "Ünïcødé".encode()),
        ("b17", b"\xff" * 17, b"\xff" * 17), ("b32", "€" * 10, ("€" * 10).encode()),
        ("b32", bytearray(b"ba"), b"ba"), ("b8", "", b""),
    ])
    def test_bytes_fields(self, make_engine, name, value, want):
        """Bytes fields come back with trailing NULs stripped; a str is stored as UTF-8.

        Bytes come back with trailing NULs stripped (inner and leading NULs
        kept); a str is stored UTF-8 encoded.
        """
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        pos = eng.open(**{name: value})
        assert getattr(eng.context(pos), name) == want
        assert bytes(row_of(eng, pos)[name]) == want
        assert eng.transition(pos, "TO_B", **{name: b"Q"}) is Outcome.APPLIED
        assert getattr(eng.context(pos), name) == b"Q"
        assert eng.transition(pos, "TO_A", **{name: value}) is Outcome.APPLIED
        assert getattr(eng.context(pos), name) == want

    def test_fields_not_given_are_zero(self, make_engine):
        """Fields not given (or given as None) read as zero: 0, +0.0, empty bytes."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        pos = eng.open()
        check_everywhere(eng, pos, {})
        assert bits(eng.context(pos).f) == bits(0.0)
        pos2 = eng.open(f=None, b8=None, u=5)
        check_everywhere(eng, pos2, {"u": 5})

    def test_transition_sets_only_the_fields_given(self, make_engine):
        """A transition with some fields leaves the others; None leaves a field."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        vals = {"f": -0.0, "i": 3, "h": -4, "u": 5, "b9": b"nine", "b32": b"x" * 32}
        pos = eng.open(**vals)
        assert eng.transition(pos, "TO_B", h=9, b9=b"", f=None) is Outcome.APPLIED
        check_everywhere(eng, pos, {**vals, "h": 9, "b9": b""})

    def test_record_version_counts_field_commits(self, make_engine):
        """The record version counts the applied commits that set fields.

        open publishes version 1; each applied transition with fields +1; a
        transition without fields, or one that is not applied, leaves it.
        """
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        pos = eng.open(i=1)
        assert eng.context(pos).version == 1
        assert eng.transition(pos, "TO_B", i=2) is Outcome.APPLIED
        assert eng.context(pos).version == 2
        assert eng.transition(pos, "TO_A") is Outcome.APPLIED
        assert eng.context(pos).version == 2
        assert eng.transition(pos, "TO_A", i=99) is Outcome.INVALID   # A has no TO_A
        assert eng.context(pos) == eng.spec.record.Context(
            *[{"i": 2}.get(n, b"" if t[0] == "S" else 0) for n, t in ALL_TYPES.items()], 2)

    def test_random_values_round_trip(self, make_engine):
        """Any value in each type's range reads back exactly, set at open and by a transition."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)

        def size(t: str) -> int:
            return int(t[1:])

        strategies = {
            name: (st.floats(allow_nan=False, allow_infinity=False) if t == "f8" else
                   st.integers(*I8) if t == "i8" else st.integers(*I4) if t == "i4" else
                   st.integers(*U8) if t == "u8" else st.binary(max_size=size(t)))
            for name, t in ALL_TYPES.items()}

        @settings(max_examples=60, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(a=st.fixed_dictionaries(strategies), b=st.fixed_dictionaries(strategies))
        def run(a: dict[str, Any], b: dict[str, Any]) -> None:
            pos = eng.open(**a)
            try:
                check_everywhere(eng, pos, a)
                assert eng.transition(pos, "TO_B", **b) is Outcome.APPLIED
                check_everywhere(eng, pos, b)
            finally:
                eng.transition(pos, "FINISH")
                eng.release_position(pos)

        run()


# =====================================================================================
class TestBadInput:
    """Refused values raise a typed error and change nothing: the slot's
    state word, its record (version and fields), its price version, the
    other slots and the open rows all stay as they were."""

    @pytest.fixture
    def order(self, make_engine):
        eng = make_engine(capacity=4, spec=ORDER_SPEC)
        pos = eng.open(key="cl-1", qty=10.0, side=1, token=5, venue="XNAS", symbol="AAPL")
        assert eng.transition(pos, "SUBMIT", updated_ns=1) is Outcome.APPLIED
        eng.update_price(pos, 101.5)
        return eng, pos

    def _refused(self, eng: Engine, pos: int, exc: type[Exception], call: Any,
                 match: str | None = None) -> Exception:
        before = frozen(eng, pos)
        with pytest.raises(exc, match=match) as info:
            call()
        assert frozen(eng, pos) == before, "a refused call changed something"
        assert eng.keys(pos) == ("cl-1",) and eng.lookup("cl-1") == pos
        return info.value

    @pytest.mark.parametrize("path", ["open", "transition"])
    def test_unknown_field_names_the_known_ones(self, order, path):
        """An unknown field: EngineTypeError listing every field of the record."""
        eng, pos = order
        call = ((lambda: eng.open(qty=1.0, quantity=2.0)) if path == "open" else
                (lambda: eng.transition(pos, "ACCEPT", quantity=2.0)))
        err = self._refused(eng, pos, EngineTypeError, call, "quantity")
        for name in ORDER_SPEC.record.types:
            assert repr(name) in str(err), f"{name!r} missing from: {err}"

    @pytest.mark.parametrize(("field", "value"), [
        ("qty", "10"), ("qty", True), ("qty", [1.0]), ("qty", 1 + 2j),
        ("qty", b"1"), ("side", 1.0), ("side", "1"), ("side", True), ("account", 2.5),
        ("updated_ns", np.float64(3.0)), ("venue", 5), ("venue", 1.5), ("symbol", ["A"]),
    ])
    @pytest.mark.parametrize("path", ["open", "transition"])
    def test_wrong_type(self, order, field, value, path):
        """A value of the wrong type: EngineTypeError naming the field."""
        eng, pos = order
        call = ((lambda: eng.open(**{field: value})) if path == "open" else
                (lambda: eng.transition(pos, "ACCEPT", **{field: value})))
        self._refused(eng, pos, EngineTypeError, call, field)

    @pytest.mark.parametrize(("field", "value", "bounds"), [
        ("side", 2**31, I4), ("side", -(2**31) - 1, I4), ("account", 2**63, I8),
        ("account", -(2**63) - 1, I8), ("updated_ns", 2**64, I8),
    ])
    @pytest.mark.parametrize("path", ["open", "transition"])
    def test_out_of_range_names_the_range(self, order, field, value, bounds, path):
        """An int outside its type's range: FieldError with the range."""
        eng, pos = order
        call = ((lambda: eng.open(**{field: value})) if path == "open" else
                (lambda: eng.transition(pos, "ACCEPT", **{field: value})))
        self._refused(eng, pos, FieldError, call,
                      rf"\[{bounds[0]}, {bounds[1]}\]")

    @pytest.mark.parametrize("path", ["open", "transition"])
    def test_u8_range(self, make_engine, path):
        """u8: below 0 or above 2**64 - 1 is a FieldError with the range."""
        eng = make_engine(capacity=2, spec=ALL_SPEC)
        pos = eng.open(u=1)
        for value in (-1, 2**64):
            call = ((lambda v=value: eng.open(u=v)) if path == "open" else
                    (lambda v=value: eng.transition(pos, "TO_B", u=v)))
            before = frozen(eng, pos)
            with pytest.raises(FieldError, match=rf"\[0, {2**64 - 1}\]"):
                call()
            assert frozen(eng, pos) == before

    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400,
                                       np.float64("nan"), -(2**1024)])
    @pytest.mark.parametrize("path", ["open", "transition"])
    def test_non_finite_f8(self, order, value, path):
        """NaN, infinities and ints too large for a double: FieldError."""
        eng, pos = order
        call = ((lambda: eng.open(avg_px=value)) if path == "open" else
                (lambda: eng.transition(pos, "ACCEPT", avg_px=value)))
        self._refused(eng, pos, FieldError, call, "avg_px")

    @pytest.mark.parametrize(("field", "value"), [
        ("venue", b"123456789"), ("venue", "ÄÄÄÄÄ"), ("symbol", b"x" * 17),
        ("symbol", "€" * 6),
    ])
    @pytest.mark.parametrize("path", ["open", "transition"])
    def test_bytes_too_long(self, order, field, value, path):
        """More bytes than S<n> holds (a str counted in UTF-8): FieldError."""
        eng, pos = order
        call = ((lambda: eng.open(**{field: value})) if path == "open" else
                (lambda: eng.transition(pos, "ACCEPT", **{field: value})))
        self._refused(eng, pos, FieldError, call, field)

    @pytest.mark.parametrize("path", ["open", "transition"])
    def test_unencodable_str_in_a_bytes_field(self, order, path):
        """A str with no UTF-8 form for a bytes field raises an engine error naming the field."""
        eng, pos = order
        call = ((lambda: eng.open(symbol="\ud800")) if path == "open" else
                (lambda: eng.transition(pos, "ACCEPT", symbol="ab\udfff")))
        self._refused(eng, pos, EngineError, call, "symbol")

    def test_set_at_open_field_in_a_transition(self, order):
        """A set-at-open field in a transition raises FieldError, also beside good fields."""
        eng, pos = order
        self._refused(eng, pos, FieldError, lambda: eng.transition(pos, "ACCEPT", token=5),
                      "token")
        self._refused(eng, pos, FieldError,
                      lambda: eng.transition(pos, "ACCEPT", qty=3.0, token=6), "token")

    @pytest.mark.parametrize("field", ["entry_price", "amount", "side", "token", "opened_ns"])
    def test_position_roles_are_set_at_open_only(self, make_engine, field):
        """Each role field of the position spec: FieldError in a transition."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 2.0, side=1, token=3)
        before = frozen(eng, pos)
        with pytest.raises(FieldError, match=field):
            eng.transition(pos, "POSITION_OPENED", **{field: 1})
        assert frozen(eng, pos) == before

    def test_negative_price_levels(self, make_engine):
        """stop_loss / take_profit are price levels: negative is a FieldError."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 2.0)
        before = frozen(eng, pos)
        for field in ("stop_loss", "take_profit"):
            with pytest.raises(FieldError, match=field):
                eng.transition(pos, "POSITION_OPENED", **{field: -1.0})
            with pytest.raises(FieldError, match=field):
                eng.open(entry_price=1.0, amount=1.0, **{field: -0.5})
        assert frozen(eng, pos) == before

    def test_bad_pnl_fields_at_open(self, make_engine):
        """The PnL inputs of the position spec are checked before anything."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 2.0)
        before = frozen(eng, pos)
        with pytest.raises(PriceError):
            eng.open(entry_price=0.0, amount=1.0)
        with pytest.raises(ArgumentError, match="side"):
            eng.open(entry_price=1.0, amount=1.0, side=0)
        with pytest.raises(EngineTypeError):
            eng.open(amount=1.0)
        assert frozen(eng, pos) == before

    def test_one_bad_field_refuses_the_whole_transition(self, order):
        """Good fields beside a bad one are not written; the state stays."""
        eng, pos = order
        self._refused(eng, pos, FieldError,
                      lambda: eng.transition(pos, "ACCEPT", qty=1.0, filled_qty=math.nan))
        self._refused(eng, pos, EngineTypeError,
                      lambda: eng.transition(pos, "ACCEPT", qty=1.0, nope=1))

    def test_fields_of_a_transition_that_does_not_apply_are_not_written(self, order):
        """INVALID (no rule) or HALTED: neither state nor record changes."""
        eng, pos = order
        before = frozen(eng, pos)
        assert eng.transition(pos, "SUBMIT", qty=99.0) is Outcome.INVALID
        assert frozen(eng, pos) == before
        eng.halt()
        try:
            assert eng.transition(pos, "ACCEPT", qty=99.0) is Outcome.HALTED
        finally:
            eng.halt(False)
        assert frozen(eng, pos) == before


# =====================================================================================
# Atomicity of fields with their state, from other processes.
ATOMIC_FIELDS = {"seq": "i8", "half": "f8", "mix": "u8", "odd": "i4", "tag": "S16"}
ATOMIC_SPEC = two_state_spec(ATOMIC_FIELDS, "atomic")
_MIX = 0x9E3779B97F4A7C15


def atomic_values(seq: int) -> dict[str, Any]:
    """The fields committed with the seq-th transition (state B if seq is odd)."""
    return {"seq": seq, "half": seq / 2, "mix": (seq * _MIX) % 2**64, "odd": seq & 1,
            "tag": f"t{seq}".encode()}


def atomic_problem(state_name: str, fields: dict[str, Any], version: int) -> str | None:
    """What is wrong with one observation of (state, record), or None."""
    seq = fields["seq"]
    want = atomic_values(seq)
    got = {k: fields[k] for k in want}
    if got != want:
        return f"torn record: {got} is not the record of seq {seq}"
    if version != seq + 1:
        return f"record version {version} with seq {seq} (expected {seq + 1})"
    if state_name != ("B" if seq & 1 else "A"):
        return f"state {state_name} with the fields of seq {seq}"
    return None


def _atomic_writer(handle: Any, pos: int, seconds: float, start: Any, out: Any) -> None:
    """Flip A <-> B with the fields of each step, for ``seconds``."""
    try:
        with Engine.attach(handle) as eng:
            if not start.wait(START_TIMEOUT):
                raise TimeoutError("no start signal")
            stop = time.monotonic() + seconds
            seq = 0
            while time.monotonic() < stop:
                seq += 1
                trig = "TO_B" if seq & 1 else "TO_A"
                outcome = eng.transition(pos, trig, **atomic_values(seq))
                if outcome is not Outcome.APPLIED:
                    raise AssertionError(f"step {seq}: {outcome}")
            out.put(("writer", pos, seq))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _atomic_reader(handle: Any, ids: list[int], start: Any, stop: Any, out: Any) -> None:
    """Poll context()+state()+context() and snapshot(); report every
    observation that pairs a state with fields of another commit."""
    try:
        with Engine.attach(handle) as eng:
            names = eng.spec.states
            problems: list[str] = []
            pinned = rows = 0
            seen_states: set[str] = set()
            last_version = dict.fromkeys(ids, 0)
            if not start.wait(START_TIMEOUT):
                raise TimeoutError("no start signal")
            i = 0
            while not stop.is_set() and len(problems) < 20:
                i += 1
                if i % 8 == 0:
                    for row in eng.snapshot():
                        rows += 1
                        fields = {k: row[k].item() for k in ATOMIC_FIELDS}
                        fields["tag"] = bytes(row["tag"])
                        version = int(row["context_version"])
                        why = atomic_problem(names[int(row["state"]).bit_length() - 1],
                                             fields, version)
                        if why is None and int(row["generation"]) != version & 0xFFFF:
                            why = (f"generation {int(row['generation'])} != record version "
                                   f"{version}: a commit without its record or vice versa")
                        if why:
                            problems.append(f"snapshot row of {int(row['id']):#x}: {why}")
                    continue
                pos = ids[i % len(ids)]
                c1 = eng.context(pos)
                state = eng.state(pos)
                c2 = eng.context(pos)
                if c2.version < c1.version or c1.version < last_version[pos]:
                    problems.append(f"{pos:#x}: record version went back")
                last_version[pos] = c2.version
                if c1.version != c2.version:
                    continue   # a commit came between: no claim about this state
                pinned += 1    # no commit between the two reads: state belongs to c1
                seen_states.add(state.name)
                why = atomic_problem(state.name, c1._asdict(), c1.version)
                if why:
                    problems.append(f"{pos:#x}: {why}")
            out.put(("reader", pinned, rows, sorted(seen_states), problems))
    except BaseException:
        out.put(("error", traceback.format_exc()))


class TestAtomicFields:
    def test_readers_never_see_a_state_with_another_commits_fields(self, make_engine,
                                                                    spawner):
        """Readers never see a state with another commit's fields.

        Two writer processes flip their position A <-> B, each transition
        setting five fields (i8, f8, u8, i4, S16) derived from its sequence
        number; two reader processes poll context()+state()+context() and
        snapshot().  Whenever no commit came between two context reads (equal
        record versions), the state read between them must be the one
        committed with those fields; every snapshot row likewise, and its
        generation equals its record version (both count commits).
        Forbidden: the new state with the old fields or the old state with
        the new fields; a record mixing two commits; a version going back.
        """
        eng = make_engine(capacity=4, spec=ATOMIC_SPEC)
        ids = [eng.open(**atomic_values(0)) for _ in range(2)]
        ctx = spawner.ctx
        start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        # on Redis every read is a round trip: run longer, expect fewer pinned reads
        seconds, need = (2.0, 50) if eng.url is None else (4.0, 10)
        for pos in ids:
            spawner.start(_atomic_writer, eng.handle, pos, seconds, start, out)
        for _ in range(2):
            spawner.start(_atomic_reader, eng.handle, ids, start, stop, out)
        start.set()
        writers = collect(out, 2, spawner)
        stop.set()
        readers = collect(out, 2, spawner)
        spawner.join_all(30)
        problems = [p for r in readers for p in r[4]]
        assert not problems, "\n".join(problems[:20])
        for _, pos, seq in writers:
            assert seq > 100, f"writer of {pos:#x} made only {seq} transitions"
            ctx_now = eng.context(pos)
            assert atomic_problem(eng.state(pos).name, ctx_now._asdict(),
                                  ctx_now.version) is None
            assert ctx_now.seq == seq
        pinned = sum(r[1] for r in readers)
        rows = sum(r[2] for r in readers)
        states = set().union(*(r[3] for r in readers))
        assert pinned > need and rows > need, (pinned, rows)
        assert states == {"A", "B"}, f"readers saw only {states}"


# =====================================================================================
class TestOrderSpec:
    """The order lifecycle with its record and its keys."""

    def test_spec_shape(self):
        """ORDER_SPEC: its initial state, closed states and record layout as documented."""
        assert ORDER_SPEC.states[0] == "INITIALIZED"
        assert set(ORDER_SPEC.closed) == {"FILLED", "CANCELED", "REJECTED", "EXPIRED",
                                          "DENIED"}
        rec = ORDER_SPEC.record
        assert rec.fixed == {"token"}   # no PnL roles: only token is set at open
        assert rec.by_name["venue"].words == 1 and rec.by_name["symbol"].words == 2
        assert rec.n_words == 20

    def test_fill_flow_with_keys(self, make_engine):
        """An order's fill flow lands each step's fields with its state; keys find it until release.

        SUBMIT, ACCEPT (exchange id bound), PARTIAL_FILL x2, FILL: every
        step's fields land with its state; both keys find the order until it
        is released, then neither does and the id is stale.
        """
        eng = make_engine(capacity=4, spec=ORDER_SPEC)
        other = eng.open(key="cl-other", qty=1.0, side=-1)
        pos = eng.open(key="cl-1001", qty=100.0, leaves_qty=100.0, limit_px=101.25, side=1,
                       order_type=2, time_in_force=1, token=42, account=7,
                       venue="XNAS", symbol="AAPL", updated_ns=1_000)
        S = ORDER_SPEC.State
        assert eng.state(pos) is S.INITIALIZED
        assert eng.lookup("cl-1001") == pos and eng.keys(pos) == ("cl-1001",)
        assert eng.transition(pos, "SUBMIT", updated_ns=2_000) is Outcome.APPLIED
        assert eng.transition(pos, "ACCEPT", updated_ns=3_000) is Outcome.APPLIED
        eng.bind_key(pos, "EX-9001")
        assert eng.keys(pos) == ("cl-1001", "EX-9001")
        assert eng.lookup("EX-9001") == pos
        fills = [(30.0, 101.0), (50.0, 101.25)]
        filled, notional = 0.0, 0.0
        for i, (q, px) in enumerate(fills):
            filled += q
            notional += q * px
            assert eng.transition(pos, "PARTIAL_FILL", last_qty=q, last_px=px,
                                  filled_qty=filled, leaves_qty=100.0 - filled,
                                  avg_px=notional / filled, last_fill_ns=4_000 + i,
                                  updated_ns=4_000 + i) is Outcome.APPLIED
            c = eng.context(pos)
            assert eng.state(pos) is S.PARTIALLY_FILLED
            assert (c.filled_qty, c.leaves_qty, c.last_qty, c.last_px) == (
                filled, 100.0 - filled, q, px)
        assert eng.transition(pos, "FILL", last_qty=20.0, last_px=101.5, filled_qty=100.0,
                              leaves_qty=0.0, avg_px=(notional + 20 * 101.5) / 100,
                              last_fill_ns=5_000, updated_ns=5_000) is Outcome.APPLIED
        assert eng.state(pos) is S.FILLED
        c = eng.context(pos)
        assert (c.qty, c.filled_qty, c.leaves_qty, c.limit_px, c.side, c.order_type,
                c.time_in_force, c.token, c.account, c.venue, c.symbol, c.last_fill_ns) == (
            100.0, 100.0, 0.0, 101.25, 1, 2, 1, 42, 7, b"XNAS", b"AAPL", 5_000)
        assert c.avg_px == (notional + 20 * 101.5) / 100
        assert c.version == 6   # open + 5 transitions with fields
        # a filled order still holds its keys until released
        with pytest.raises(KeyExistsError):
            eng.open(key="EX-9001")
        assert eng.transition(pos, "CANCEL") is Outcome.INVALID   # closed: no way out
        assert eng.release_position(pos) is Outcome.APPLIED
        assert eng.lookup("cl-1001") is None and eng.lookup("EX-9001") is None
        for call in (eng.state, eng.context, eng.keys,
                     lambda p: eng.bind_key(p, "again"),
                     lambda p: eng.transition(p, "FILL", qty=1.0)):
            with pytest.raises(StaleIdError):
                call(pos)
        assert eng.lookup("cl-other") == other and eng.keys(other) == ("cl-other",)

    def test_cancel_flow(self, make_engine):
        """A cancelled order ends CANCELED; a later ACCEPT is INVALID and writes nothing."""
        eng = make_engine(capacity=2, spec=ORDER_SPEC)
        S = ORDER_SPEC.State
        pos = eng.open(key="cl-2", qty=5.0, leaves_qty=5.0, side=-1, symbol="MSFT")
        for trig, state in (("SUBMIT", S.SUBMITTED), ("ACCEPT", S.ACCEPTED),
                            ("REQUEST_CANCEL", S.PENDING_CANCEL)):
            assert eng.transition(pos, trig, updated_ns=eng.context(pos).version) \
                is Outcome.APPLIED
            assert eng.state(pos) is state
        eng.bind_key(pos, "EX-2")
        assert eng.transition(pos, "CANCEL", leaves_qty=0.0) is Outcome.APPLIED
        assert eng.state(pos) is S.CANCELED
        before = eng.context(pos)
        assert eng.transition(pos, "ACCEPT", filled_qty=5.0) is Outcome.INVALID
        assert eng.context(pos) == before
        assert (before.leaves_qty, before.filled_qty, before.side) == (0.0, 0.0, -1)
        assert eng.keys(pos) == ("cl-2", "EX-2")
        assert eng.release_position(pos) is Outcome.APPLIED
        assert eng.lookup("cl-2") is None and eng.lookup("EX-2") is None

    def test_reject_flow(self, make_engine):
        """A rejected order is REJECTED (closed) with its reason, releasable, its key free again."""
        eng = make_engine(capacity=2, spec=ORDER_SPEC)
        pos = eng.open(key="cl-3", qty=1.0)
        assert eng.transition(pos, "SUBMIT") is Outcome.APPLIED
        assert eng.transition(pos, "REJECT", reject_reason=17) is Outcome.APPLIED
        assert eng.state(pos) is ORDER_SPEC.State.REJECTED
        assert eng.context(pos).reject_reason == 17
        assert eng.release_position(pos) is Outcome.APPLIED
        again = eng.open(key="cl-3", qty=2.0)
        assert eng.lookup("cl-3") == again != pos

    def test_reused_slot_never_answers_to_old_keys_or_ids(self, make_engine):
        """A reused slot never answers to the old order's keys or id.

        Capacity 1: every order reuses the slot.  After release, the old
        order's keys find nothing (also once the slot holds a new order), the
        old id is stale for every call, and the old keys are free to bind.
        """
        eng = make_engine(capacity=1, spec=ORDER_SPEC, keys_per_position=3)
        old_ids: list[int] = []
        for n in range(5):
            pos = eng.open(key=f"cl-{n}", qty=float(n + 1), account=n)
            assert eng.transition(pos, "SUBMIT") is Outcome.APPLIED
            assert eng.transition(pos, "ACCEPT") is Outcome.APPLIED
            eng.bind_key(pos, f"EX-{n}")
            assert eng.keys(pos) == (f"cl-{n}", f"EX-{n}")
            for m in range(n):
                assert eng.lookup(f"cl-{m}") is None and eng.lookup(f"EX-{m}") is None
            for old in old_ids:
                assert eng.slot_of(old) == eng.slot_of(pos) and old != pos
                for call in (eng.state, eng.context, eng.keys, eng.price,
                             lambda p: eng.bind_key(p, "zzz"),
                             lambda p: eng.transition(p, "FILL", qty=9.0)):
                    with pytest.raises(StaleIdError):
                        call(old)
            assert eng.context(pos).account == n
            if n:
                eng.bind_key(pos, f"cl-{n - 1}")   # an old order's key: free now
                assert eng.lookup(f"cl-{n - 1}") == pos
                assert eng.keys(pos) == (f"cl-{n}", f"EX-{n}", f"cl-{n - 1}")
            assert eng.transition(pos, "FILL", filled_qty=float(n + 1)) is Outcome.APPLIED
            assert eng.release_position(pos) is Outcome.APPLIED
            old_ids.append(pos)
        assert len(eng.snapshot()) == 0


# =====================================================================================
class TestFingerprint:
    """The fields are part of the spec: an attach must agree on them."""

    @pytest.mark.parametrize("other", [
        {"qty": "i8", "tag": "S8"},                 # a type differs
        {"tag": "S8", "qty": "f8"},                 # the order differs
        {"qty": "f8", "tag": "S9"},                 # a size differs (same words)
        {"qty": "f8"},                              # a field less
        {"qty": "f8", "tag": "S8", "more": "i4"},   # a field more
        {"quantity": "f8", "tag": "S8"},            # a name differs
        None,                                       # the position fields
    ])
    def test_spec_differing_only_in_fields_is_refused(self, make_engine, other):
        """An attach with a spec differing only in its fields is refused; the same fields attach."""
        eng = make_engine(capacity=2, spec=two_state_spec({"qty": "f8", "tag": "S8"}, "fp"))
        other_spec = two_state_spec(other, "fp")
        assert other_spec.fingerprint != eng.spec.fingerprint
        with pytest.raises(SpecMismatchError):
            Engine.attach(eng.name, url=eng.url, spec=other_spec)
        same = two_state_spec({"qty": "f8", "tag": "S8"}, "fp")
        with Engine.attach(eng.name, url=eng.url, spec=same) as again:
            assert again.spec == eng.spec

    def test_order_segment_refuses_the_default_spec(self, make_engine):
        """An order segment refuses the default spec at attach; its handle carries ORDER_SPEC."""
        eng = make_engine(capacity=2, spec=ORDER_SPEC)
        with pytest.raises(SpecMismatchError):
            Engine.attach(eng.name, url=eng.url)
        with Engine.attach(eng.handle) as again:   # the handle carries ORDER_SPEC
            assert again.spec.record.types == ORDER_SPEC.record.types

    def test_custom_spec_without_fields_keeps_the_position_fields(self, make_engine):
        """A custom machine without fields keeps the position record and its price calls."""
        spec = two_state_spec(None, "posfields")
        assert spec.record.types == POSITION_SPEC.record.types
        eng = make_engine(capacity=2, spec=spec)
        pos = eng.open_position(100.0, 2.0, side=-1, token=9)
        assert isinstance(eng.context(pos), Context)
        assert eng.context(pos)[:3] == (100.0, 2.0, 0.0)
        assert eng.update_token_price(9, 90.0) == 1
        assert eng.price(pos).pnl_usd == (90.0 - 100.0) * 2.0 * -1
        assert eng.transition(pos, "TO_B", exit_reason=4) is Outcome.APPLIED
        assert eng.context(pos).exit_reason == 4


# =====================================================================================
class TestMemory:
    @pytest.mark.parametrize("capacity", [1_000, 65_536, 1_000_000])
    def test_default_spec_costs_at_most_576_bytes_per_position(self, capacity):
        """The position spec with 2 keys costs at most 576 segment bytes per position.

        Marginal segment bytes per position (slot, both record copies, key
        records, index and stripe locks) of the position spec (11 words, with
        trailing_stop and exit_price) with the default 2 keys per position.
        """
        n_words = POSITION_SPEC.record.n_words
        one = lib.eng_segment_size(capacity, n_words, 2, 64)
        two = lib.eng_segment_size(2 * capacity, n_words, 2, 64)
        assert one and two
        per = (two - one) / capacity
        assert per <= 576, f"{per:.1f} bytes per position"

    def test_size_grows_with_words_and_keys(self):
        """More words or more keys per position never cost less."""
        c = 4096
        sizes = [[lib.eng_segment_size(c, w, k, 64) for k in range(9)] for w in range(25)]
        for w in range(25):
            for k in range(9):
                if w:
                    assert sizes[w][k] >= sizes[w - 1][k]
                if k:
                    assert sizes[w][k] > sizes[w][k - 1]
        assert lib.eng_segment_size(c, MAX_WORDS + 1, 2, 64) == 0
        assert lib.eng_segment_size(c, 8, lib.ENG_MAX_KEYS_PER_POSITION + 1, 64) == 0
