"""Unique keys: ``open(key=)``, ``bind_key``, ``lookup``, ``keys`` and their
removal by ``release_position``.

A key (str as UTF-8, or bytes; 1 to ``ENG_KEY_MAX`` bytes) names at most one
open position at a time; an opening has at most ``keys_per_position`` keys;
``lookup`` never returns a released opening.  The unit tests pin each call
and each refusal (nothing changes on an error); a model test runs random
sequences against a plain dict; the multiprocess tests race inserts of one
key and lookups against open/bind/release churn; the chaos tests SIGKILL
inserters (mid-insert, through ``ENG_FAULT_DIE_IN_KEY``, and at random) and
check what ``recover()`` and the next insert make of what they left.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pathlib
import random
import signal
import time
import traceback
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from procs import READY_TIMEOUT, collect, sigkill, timed, until

from engine import (
    ORDER_SPEC,
    ArgumentError,
    BusyError,
    CapacityError,
    Engine,
    EngineError,
    EngineTypeError,
    KeyExistsError,
    KeyLimitError,
    NotOpenError,
    Outcome,
    StaleIdError,
)
from engine._native import lib

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

KEY_MAX = lib.ENG_KEY_MAX
ANSWER_BOUND = 2.0      # seconds: an insert over a dead inserter's leftovers returns within this
S = ORDER_SPEC.State


def close_order(eng: Engine, pos: int) -> None:
    """Move an order to a closed state (DENIED from INITIALIZED, else CANCELED)."""
    st_ = eng.state(pos)
    trig = "DENY" if st_ is S.INITIALIZED else "CANCEL"
    assert eng.transition(pos, trig) is Outcome.APPLIED, (st_, trig)


def release(eng: Engine, pos: int) -> None:
    close_order(eng, pos)
    assert eng.release_position(pos) is Outcome.APPLIED


def norm(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def everything(eng: Engine) -> tuple[Any, ...]:
    """What a refused key call must leave as it was: every state word and
    every open row (ids, states, record versions) with its keys."""
    rows = eng.snapshot()
    return (tuple(eng.state_word(s) for s in range(eng.capacity)),
            tuple((int(r["id"]), int(r["state"]), int(r["context_version"])) for r in rows),
            tuple(eng.keys(int(i)) for i in rows["id"]))


# -- raw views of the key tables (layout from engine.h) ------------------------------
def held_stripes(eng: Engine) -> list[int]:
    """Key-index buckets whose insert stripe lock is held."""
    return [b for b in range(eng._seg.key_buckets) if eng._seg.stripes[b]]


def key_tags(eng: Engine) -> list[int]:
    return [int(eng._seg.keyrecs[i].tag) for i in range(eng.capacity * eng.keys_per_position)]


def busy_records(eng: Engine) -> list[int]:
    """Key records left BUSY (being inserted) or CLEARING (being cleared)."""
    return [i for i, t in enumerate(key_tags(eng))
            if t & 0xFF in (lib.ENG_KR_BUSY, lib.ENG_KR_CLEARING)]


def used_cells(eng: Engine) -> int:
    return sum(1 for i in range(eng._seg.key_buckets * lib.ENG_KEY_BUCKET)
               if eng._seg.keyidx[i])


def live_keys(eng: Engine) -> dict[bytes, int]:
    """key -> id over every open row."""
    out: dict[bytes, int] = {}
    for pos in (int(i) for i in eng.snapshot()["id"]):
        for k in eng.keys(pos):
            assert norm(k) not in out, f"key {k!r} held by {out[norm(k)]:#x} and {pos:#x}"
            out[norm(k)] = pos
    return out


@pytest.fixture
def orders(make_engine):
    """An 8-slot order engine with 2 keys per position."""
    return make_engine(capacity=8, spec=ORDER_SPEC, keys_per_position=2)


# =====================================================================================
class TestKeysUnit:
    def test_open_with_key_and_lookup(self, orders):
        """open(key=) returns an id that lookup finds; keys() lists the key."""
        pos = orders.open(key="cl-1", qty=1.0)
        assert orders.lookup("cl-1") == pos
        assert orders.keys(pos) == ("cl-1",)
        other = orders.open(qty=2.0)
        assert orders.keys(other) == ()
        assert orders.lookup("cl-1") == pos

    @pytest.mark.parametrize("key", ["nope", b"nope", "x" * KEY_MAX, b"\0", "cl-1 ", "CL-1"])
    def test_lookup_of_an_unknown_key_is_none(self, orders, key):
        """lookup of a key no opening holds is None."""
        orders.open(key="cl-1")
        assert orders.lookup(key) is None

    def test_bind_key_and_keys_in_bind_order(self, make_engine):
        """keys() lists the keys in the order they were bound (open's first)."""
        eng = make_engine(capacity=4, spec=ORDER_SPEC, keys_per_position=4)
        pos = eng.open(key="c")
        for k in ("a", b"\xff\xfe", "b"):
            eng.bind_key(pos, k)
        assert eng.keys(pos) == ("c", "a", b"\xff\xfe", "b")
        for k in ("c", "a", b"\xff\xfe", "b"):
            assert eng.lookup(k) == pos
        p2 = eng.open()
        for k in ("z", "y", "x"):
            eng.bind_key(p2, k)
        assert eng.keys(p2) == ("z", "y", "x")

    def test_keys_survive_transitions_until_release(self, orders):
        """Keys survive every transition and go at release; the next opening starts with none."""
        pos = orders.open(key="a")
        orders.bind_key(pos, "b")
        assert orders.transition(pos, "SUBMIT", qty=3.0) is Outcome.APPLIED
        close_order(orders, pos)
        assert orders.lookup("a") == pos and orders.keys(pos) == ("a", "b")
        assert orders.release_position(pos) is Outcome.APPLIED
        assert orders.lookup("a") is None and orders.lookup("b") is None
        with pytest.raises(StaleIdError):
            orders.keys(pos)
        again = [orders.open() for _ in range(orders.capacity)]
        assert all(orders.keys(p) == () for p in again)

    def test_released_key_is_free_for_another_position(self, orders):
        """A released position's keys can be bound to or opened with by another position."""
        pos = orders.open(key="k")
        orders.bind_key(pos, "k2")
        other = orders.open()
        release(orders, pos)
        orders.bind_key(other, "k")
        assert orders.lookup("k") == other
        third = orders.open(key="k2")
        assert orders.lookup("k2") == third
        assert orders.keys(other) == ("k",) and orders.keys(third) == ("k2",)

    def test_release_of_an_open_position_keeps_its_keys(self, orders):
        """release of a position not closed is INVALID and drops nothing."""
        pos = orders.open(key="k")
        assert orders.release_position(pos) is Outcome.INVALID
        assert orders.lookup("k") == pos and orders.keys(pos) == ("k",)

    def test_key_limit(self, orders):
        """A key past the position's limit raises KeyLimitError and binds nothing."""
        pos = orders.open(key="a")
        orders.bind_key(pos, "b")
        before = everything(orders)
        with pytest.raises(KeyLimitError, match="keys_per_position=2"):
            orders.bind_key(pos, "c")
        assert everything(orders) == before
        assert orders.lookup("c") is None and orders.keys(pos) == ("a", "b")
        other = orders.open(key="c")
        assert orders.lookup("c") == other

    def test_eight_keys_is_the_most(self, make_engine):
        """keys_per_position=8 is the most: a ninth key raises KeyLimitError.

        keys_per_position=8 (the maximum): eight keys bind, the ninth is a
        KeyLimitError; 9, -1 or a non-int are refused at create.
        """
        eng = make_engine(capacity=2, spec=ORDER_SPEC,
                          keys_per_position=lib.ENG_MAX_KEYS_PER_POSITION)
        pos = eng.open(key="k0")
        for i in range(1, 8):
            eng.bind_key(pos, f"k{i}")
        with pytest.raises(KeyLimitError, match="keys_per_position=8"):
            eng.bind_key(pos, "k8")
        assert eng.keys(pos) == tuple(f"k{i}" for i in range(8))
        assert all(eng.lookup(f"k{i}") == pos for i in range(8))
        for bad, exc in ((9, ArgumentError), (-1, ArgumentError), (2.0, EngineTypeError),
                         (True, EngineTypeError), ("2", EngineTypeError)):
            with pytest.raises(exc, match="keys_per_position"):
                Engine.create(capacity=2, spec=ORDER_SPEC, keys_per_position=bad)

    def test_key_limit_one(self, make_engine):
        """keys_per_position=1: a second key is refused (KeyLimitError), the first stays."""
        eng = make_engine(capacity=2, spec=ORDER_SPEC, keys_per_position=1)
        pos = eng.open(key="a")
        with pytest.raises(KeyLimitError):
            eng.bind_key(pos, "b")
        p2 = eng.open()
        eng.bind_key(p2, "b")
        with pytest.raises(KeyLimitError):
            eng.bind_key(p2, "c")
        assert eng.keys(pos) == ("a",) and eng.keys(p2) == ("b",)

    def test_no_keys_per_position(self, make_engine):
        """keys_per_position=0 refuses every key with KeyLimitError; keyless opens work."""
        eng = make_engine(capacity=3, spec=ORDER_SPEC, keys_per_position=0)
        assert eng.keys_per_position == 0
        pos = eng.open(qty=1.0)
        before = everything(eng)
        with pytest.raises(KeyLimitError, match="keys_per_position=0") as info:
            eng.open(key="a", qty=2.0)
        assert "id None" not in str(info.value), f"unclear message: {info.value}"
        with pytest.raises(KeyLimitError, match="keys_per_position=0"):
            eng.bind_key(pos, "a")
        assert everything(eng) == before
        assert eng.lookup("a") is None and eng.keys(pos) == ()
        assert len(eng.snapshot()) == 1
        release(eng, pos)

    def test_key_exists_on_open_opens_nothing(self, orders):
        """open(key=) of a held key raises KeyExistsError and opens nothing.

        open(key=) of a held key: KeyExistsError; no slot taken, no row
        added, no state word changed; the holder keeps the key.
        """
        pos = orders.open(key="dup", qty=1.0)
        before = everything(orders)
        for key in ("dup", b"dup", bytearray(b"dup"), memoryview(b"dup")):
            with pytest.raises(KeyExistsError):
                orders.open(key=key, qty=2.0)
        assert everything(orders) == before
        assert orders.lookup("dup") == pos
        # the engine stays fully usable: every other slot still opens
        rest = [orders.open() for _ in range(orders.capacity - 1)]
        assert len(set(rest)) == orders.capacity - 1
        with pytest.raises(CapacityError):
            orders.open(key="fresh")
        assert orders.lookup("fresh") is None

    def test_key_exists_on_bind_binds_nothing(self, orders):
        """bind_key of a key already held raises KeyExistsError and binds nothing."""
        a = orders.open(key="a")
        b = orders.open()
        before = everything(orders)
        with pytest.raises(KeyExistsError):
            orders.bind_key(b, "a")
        with pytest.raises(KeyExistsError):
            orders.bind_key(a, "a")
        assert everything(orders) == before
        assert orders.keys(b) == () and orders.keys(a) == ("a",)
        orders.bind_key(b, "b")   # b still has both of its keys free
        orders.bind_key(b, "c")
        assert orders.keys(b) == ("b", "c")

    def test_key_of_a_closed_unreleased_position_is_still_held(self, orders):
        """A closed position keeps its key until it is released: a new open with it is refused."""
        pos = orders.open(key="a")
        close_order(orders, pos)
        with pytest.raises(KeyExistsError):
            orders.open(key="a")
        assert orders.lookup("a") == pos

    def test_str_and_bytes_of_the_same_bytes_are_one_key(self, orders):
        """A str key is its UTF-8 bytes: the str and those bytes are one key.

        A str is its UTF-8 bytes: "é" and b"\\xc3\\xa9" are the same key;
        composed and decomposed forms are different keys; keys() returns a str
        where the bytes decode, bytes otherwise.
        """
        pos = orders.open(key="é")
        assert orders.lookup("é".encode()) == pos
        with pytest.raises(KeyExistsError):
            orders.bind_key(orders.open(), b"\xc3\xa9")
        other = orders.open(key="e\u0301")
        assert orders.lookup("e\u0301") == other != pos
        raw = orders.open(key=b"\xff\x00")
        assert orders.keys(raw) == (b"\xff\x00",)
        assert orders.keys(pos) == ("é",)
        b = orders.open(key=b"plain")
        assert orders.keys(b) == ("plain",) and orders.lookup("plain") == b

    def test_nul_bytes_are_part_of_the_key(self, orders):
        """Keys differing only by NUL bytes are distinct keys."""
        a = orders.open(key=b"a")
        b = orders.open(key=b"a\0")
        c = orders.open(key=b"\0a")
        assert (orders.lookup(b"a"), orders.lookup(b"a\0"), orders.lookup(b"\0a")) == (a, b, c)
        assert orders.keys(b) == ("a\0",)

    @pytest.mark.parametrize("key", ["€" * 16, "é" * 24, "x" * KEY_MAX, b"\xff" * KEY_MAX,
                                     "x" * 45 + "€"])
    def test_keys_of_48_bytes_are_accepted(self, orders, key):
        """48 bytes (of UTF-8 for a str: 16 three-byte characters) is the limit."""
        assert len(norm(key)) == KEY_MAX
        pos = orders.open(key=key)
        assert orders.lookup(key) == pos and norm(orders.keys(pos)[0]) == norm(key)
        p2 = orders.open()
        orders.bind_key(p2, norm(key)[:-1] + b"!")
        assert orders.lookup(norm(key)[:-1] + b"!") == p2

    @pytest.mark.parametrize("key", ["€" * 16 + "a", "é" * 25, "x" * 47 + "é", b"x" * 49,
                                     "x" * 1000, "", b"", bytearray()])
    def test_bad_key_lengths_are_refused(self, orders, key):
        """A key of 0 or more than 48 bytes raises ArgumentError; nothing changes."""
        pos = orders.open(key="held")
        before = everything(orders)
        for call in (lambda: orders.open(key=key), lambda: orders.bind_key(pos, key),
                     lambda: orders.lookup(key)):
            with pytest.raises(ArgumentError, match="1 to 48 bytes"):
                call()
        assert everything(orders) == before

    @pytest.mark.parametrize("key", [5, 5.0, ["a"], ("a",), object(), True, {"a": 1}])
    def test_wrong_key_types_are_refused(self, orders, key):
        """Anything but str or bytes: EngineTypeError; nothing changes."""
        pos = orders.open(key="held")
        before = everything(orders)
        for call in (lambda: orders.open(key=key), lambda: orders.bind_key(pos, key),
                     lambda: orders.lookup(key)):
            with pytest.raises(EngineTypeError, match="str or bytes"):
                call()
        assert everything(orders) == before

    def test_none_is_not_a_key_for_bind_or_lookup(self, orders):
        """None as a key is an EngineTypeError for bind_key and lookup; nothing is bound."""
        pos = orders.open()
        with pytest.raises(EngineTypeError):
            orders.bind_key(pos, None)   # type: ignore[arg-type]
        with pytest.raises(EngineTypeError):
            orders.lookup(None)   # type: ignore[arg-type]
        assert orders.keys(pos) == ()

    @pytest.mark.parametrize("key", ["\ud800", "ok\udfff"])
    def test_unencodable_str_is_an_engine_error(self, orders, key):
        """A str key with no UTF-8 form raises an engine error, not a codec error."""
        pos = orders.open(key="held")
        before = everything(orders)
        for call in (lambda: orders.open(key=key), lambda: orders.bind_key(pos, key),
                     lambda: orders.lookup(key)):
            with pytest.raises(EngineError):
                call()
        assert everything(orders) == before

    @pytest.mark.shm_only
    @pytest.mark.parametrize("kind", ["ENG_KR_CLEARING", "ENG_KR_BUSY"])
    def test_keys_stay_in_bind_order_when_record_0_is_taken(self, make_engine, kind):
        """An opening's first key comes first in keys() even when record 0 was taken at insert.

        The first key of an opening must come first in keys() even if, when
        it was inserted, the slot's key record 0 was held by another live
        process: CLEARING by a concurrent release of the slot's previous
        opening (keys_drop), or BUSY by a late bind_key on that previous
        opening's id -- states real processes reach (see
        TestRaces.test_keys_stay_in_bind_order_under_slot_reuse).  Simulated
        here by tagging record 0 with another live Engine's token during
        open(key=), then freeing it as its holder would.
        """
        eng = make_engine(capacity=1, spec=ORDER_SPEC, keys_per_position=2)
        with Engine.attach(eng.handle) as other:
            rec0 = eng._seg.keyrecs[0]
            rec0.tag = (int(other._seg.token) << 8) | getattr(lib, kind)
            pos = eng.open(key="first")
            assert eng.lookup("first") == pos
            rec0.tag = 0   # its holder is done
        eng.bind_key(pos, "second")
        assert eng.lookup("second") == pos
        assert eng.keys(pos) == ("first", "second"), "keys() out of bind order"

    @pytest.mark.shm_only
    def test_stale_and_never_issued_ids(self, orders):
        """bind_key/keys: StaleIdError for a released id, NotOpenError for one never issued.

        bind_key / keys on a released id: StaleIdError (nothing bound, the
        slot's next opening untouched); on a never-issued id: NotOpenError.
        """
        pos = orders.open(key="a")
        release(orders, pos)
        with pytest.raises(StaleIdError):
            orders.bind_key(pos, "b")
        with pytest.raises(StaleIdError):
            orders.keys(pos)
        assert orders.lookup("b") is None
        fresh = [orders.open() for _ in range(orders.capacity)]
        reused = next(p for p in fresh if orders.slot_of(p) == orders.slot_of(pos))
        with pytest.raises(StaleIdError):
            orders.bind_key(pos, "b")
        assert orders.keys(reused) == () and orders.lookup("b") is None
        never = ((orders._slot(0).opening + 5) << lib.ENG_ID_SLOT_BITS) | 0
        with pytest.raises(NotOpenError):
            orders.bind_key(never, "c")
        with pytest.raises(NotOpenError):
            orders.keys(never)

    def test_metrics_count_binds_and_lookups(self, orders):
        """Metrics count every bind attempt and lookup, and the applied ones."""
        pos = orders.open(key="a")
        orders.bind_key(pos, "b")
        with contextlib.suppress(KeyExistsError):
            orders.bind_key(pos, "a")
        for _ in range(5):
            orders.lookup("a")
        orders.lookup("missing")
        m = orders.metrics()
        assert m["key"].attempts == 2 and m["key"].applied == 1
        assert m["lookup"].attempts == 6 and m["lookup"].applied == 6


# =====================================================================================
MODEL_CAPACITY = 4
MODEL_KPP = 3
KEY_POOL: list[str | bytes] = ["k0", "k1", "k2", "k3", "k4", "k5", "ключ", "€", "x" * KEY_MAX,
                               b"\xff\x00", b"k0\x00"]
keys_st = st.builds(lambda k, as_bytes: norm(k) if as_bytes else k,
                    st.sampled_from(KEY_POOL), st.booleans())


class KeyMachine(RuleBasedStateMachine):
    """A tiny order engine (4 slots, 3 keys each: slots are reused all the
    time) beside a dict model: key -> id, id -> [keys], id -> state."""

    def __init__(self) -> None:
        super().__init__()
        self.eng = Engine.create(capacity=MODEL_CAPACITY, spec=ORDER_SPEC,
                                 keys_per_position=MODEL_KPP)
        self.owner: dict[bytes, int] = {}
        self.keys_of: dict[int, list[bytes]] = {}
        self.state: dict[int, str] = {}
        self.account: dict[int, int] = {}
        self.stale: list[int] = []
        self.serial = 0

    def teardown(self) -> None:
        self.eng.close()
        self.eng.unlink()

    def _pick(self, i: int) -> int:
        live = sorted(self.keys_of)
        return live[i % len(live)]

    def _has_live(self) -> bool:
        return bool(self.keys_of)

    # -- rules -----------------------------------------------------------------------
    @rule(key=st.none() | keys_st)
    def open_order(self, key: str | bytes | None) -> None:
        self.serial += 1
        if len(self.keys_of) == MODEL_CAPACITY:
            with pytest.raises(CapacityError):
                self.eng.open(key=key, account=self.serial)
            return
        if key is not None and norm(key) in self.owner:
            with pytest.raises(KeyExistsError):
                self.eng.open(key=key, account=self.serial)
            return
        pos = self.eng.open(key=key, account=self.serial)
        assert pos not in self.keys_of and pos not in self.stale, f"id {pos:#x} reissued"
        self.keys_of[pos] = [] if key is None else [norm(key)]
        if key is not None:
            self.owner[norm(key)] = pos
        self.state[pos] = "INITIALIZED"
        self.account[pos] = self.serial

    @precondition(_has_live)
    @rule(i=st.integers(0, 99), key=keys_st)
    def bind_key(self, i: int, key: str | bytes) -> None:
        pos = self._pick(i)
        if norm(key) in self.owner:
            with pytest.raises(KeyExistsError):
                self.eng.bind_key(pos, key)
        elif len(self.keys_of[pos]) == MODEL_KPP:
            with pytest.raises(KeyLimitError):
                self.eng.bind_key(pos, key)
        else:
            self.eng.bind_key(pos, key)
            self.keys_of[pos].append(norm(key))
            self.owner[norm(key)] = pos

    @precondition(_has_live)
    @rule(i=st.integers(0, 99))
    def submit(self, i: int) -> None:
        pos = self._pick(i)
        out = self.eng.transition(pos, "SUBMIT", updated_ns=i)
        if self.state[pos] == "INITIALIZED":
            assert out is Outcome.APPLIED
            self.state[pos] = "SUBMITTED"
        else:
            assert out is Outcome.INVALID

    @precondition(_has_live)
    @rule(i=st.integers(0, 99))
    def close_order(self, i: int) -> None:
        pos = self._pick(i)
        trig, target = {"INITIALIZED": ("DENY", "DENIED")}.get(self.state[pos],
                                                               ("CANCEL", "CANCELED"))
        out = self.eng.transition(pos, trig)
        if self.state[pos] in ("INITIALIZED", "SUBMITTED"):
            assert out is Outcome.APPLIED
            self.state[pos] = target
        else:
            assert out is Outcome.INVALID

    @precondition(_has_live)
    @rule(i=st.integers(0, 99))
    def release_order(self, i: int) -> None:
        pos = self._pick(i)
        out = self.eng.release_position(pos)
        if self.state[pos] not in ("DENIED", "CANCELED"):
            assert out is Outcome.INVALID
            return
        assert out is Outcome.APPLIED
        for k in self.keys_of.pop(pos):
            del self.owner[k]
        del self.state[pos], self.account[pos]
        self.stale.append(pos)

    @precondition(lambda self: bool(self.stale))
    @rule(i=st.integers(0, 99), key=keys_st)
    def use_stale(self, i: int, key: str | bytes) -> None:
        pos = self.stale[i % len(self.stale)]
        for call in (lambda: self.eng.bind_key(pos, key), lambda: self.eng.keys(pos),
                     lambda: self.eng.state(pos), lambda: self.eng.release_position(pos)):
            with pytest.raises(StaleIdError):
                call()

    @rule(key=keys_st)
    def lookup_key(self, key: str | bytes) -> None:
        assert self.eng.lookup(key) == self.owner.get(norm(key))

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def every_key_resolves_as_in_the_model(self) -> None:
        for key in KEY_POOL:
            got = self.eng.lookup(key)
            assert got == self.owner.get(norm(key)), \
                f"lookup({key!r}) = {got!r}, model {self.owner.get(norm(key))!r}"

    @invariant()
    def every_live_id_has_its_keys_and_record(self) -> None:
        rows = self.eng.snapshot()
        assert sorted(int(i) for i in rows["id"]) == sorted(self.keys_of)
        for pos, keys in self.keys_of.items():
            assert [norm(k) for k in self.eng.keys(pos)] == keys, pos
            assert self.eng.context(pos).account == self.account[pos]
            assert self.eng.state(pos).name == self.state[pos]

    @invariant()
    def stale_ids_are_refused(self) -> None:
        for pos in self.stale[-6:]:
            with pytest.raises(StaleIdError):
                self.eng.keys(pos)


TestKeyModel = KeyMachine.TestCase
TestKeyModel.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


# =====================================================================================
# Multiprocess races.  Workers are module level (spawned children import them).
def _same_key_opener(handle: Any, rounds: int, barrier: Any, out: Any) -> None:
    """Each round: wait for everyone, then open with that round's key."""
    try:
        with Engine.attach(handle) as eng:
            results: list[tuple[str, int]] = []
            for r in range(rounds):
                barrier.wait(READY_TIMEOUT)
                try:
                    results.append(("won", eng.open(key=f"race-{r}", account=os.getpid())))
                except KeyExistsError:
                    results.append(("exists", 0))
                except BusyError:
                    results.append(("busy", 0))
            out.put(("ok", os.getpid(), results))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def account_of(wid: int, n: int) -> int:
    return wid * 1_000_000_000 + n


def churn_keys(wid: int, n: int) -> tuple[str, str]:
    """The client key (at open) and exchange key (bound after ACCEPT) of
    writer ``wid``'s n-th order."""
    return f"cl-{wid}-{n}", f"ex-{wid}-{n}"


def _churn_writer(handle: Any, wid: int, seconds: float, progress: Any, start: Any,
                  out: Any) -> None:
    """Open an order with its client key, ACCEPT it, bind its exchange key,
    cancel and release it; over and over.  Check its own keys on the way."""
    try:
        with Engine.attach(handle) as eng:
            problems: list[str] = []
            misordered: list[str] = []
            busy = done = 0
            if not start.wait(READY_TIMEOUT):
                raise TimeoutError("no start signal")
            stop = time.monotonic() + seconds
            n = 0
            while time.monotonic() < stop and len(problems) < 20:
                n += 1
                ckey, xkey = churn_keys(wid, n)
                progress[wid] = n
                try:
                    pos = eng.open(key=ckey, account=account_of(wid, n), symbol=ckey)
                except (BusyError, CapacityError):
                    busy += 1
                    continue
                if eng.lookup(ckey) != pos:
                    problems.append(f"lookup({ckey}) = {eng.lookup(ckey)} != own {pos:#x}")
                eng.transition(pos, "SUBMIT")
                eng.transition(pos, "ACCEPT", updated_ns=n)
                try:
                    eng.bind_key(pos, xkey)
                    keys = eng.keys(pos)
                    if eng.lookup(xkey) != pos or set(keys) != {ckey, xkey}:
                        problems.append(f"{pos:#x}: after bind, lookup({xkey}) = "
                                        f"{eng.lookup(xkey)}, keys {keys}")
                    elif keys != (ckey, xkey):
                        misordered.append(f"{pos:#x}: bound {ckey} then {xkey}, keys() "
                                          f"says {keys}")
                except BusyError:
                    busy += 1
                assert eng.transition(pos, "CANCEL") is Outcome.APPLIED
                assert eng.release_position(pos) is Outcome.APPLIED
                if eng.lookup(ckey) is not None or eng.lookup(xkey) is not None:
                    problems.append(f"{ckey}/{xkey} still found after release of {pos:#x}")
                done += 1
            out.put(("writer", wid, done, busy, problems, misordered))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _churn_reader(handle: Any, writers: int, progress: Any, seed: int, start: Any,
                  stop: Any, out: Any) -> None:
    """Look up recent keys of random writers; read the record of each id found."""
    try:
        with Engine.attach(handle) as eng:
            rng = random.Random(seed)
            problems: list[str] = []
            lookups = found = checked = stale = busy = 0
            if not start.wait(READY_TIMEOUT):
                raise TimeoutError("no start signal")
            while not stop.is_set() and len(problems) < 20:
                wid = rng.randrange(writers)
                n = progress[wid] - rng.randrange(3)
                if n < 1:
                    continue
                key = churn_keys(wid, n)[rng.randrange(2)]
                lookups += 1
                try:
                    pos = eng.lookup(key)
                except BusyError:
                    busy += 1
                    continue
                if pos is None:
                    continue
                found += 1
                try:
                    ctx = eng.context(pos)
                    keys = eng.keys(pos)
                except StaleIdError:
                    stale += 1   # released since the lookup: allowed
                    continue
                checked += 1
                own = churn_keys(wid, n)[0].encode()
                if ctx.account != account_of(wid, n) or ctx.symbol != own:
                    problems.append(f"lookup({key}) = {pos:#x}, whose record is account "
                                    f"{ctx.account} symbol {ctx.symbol!r}: another order's")
                if key not in keys:
                    problems.append(f"lookup({key}) = {pos:#x}, whose keys are {keys}")
            out.put(("reader", lookups, found, checked, stale, busy, problems))
    except BaseException:
        out.put(("error", traceback.format_exc()))


class TestRaces:
    def test_one_winner_per_key(self, make_engine, spawner):
        """Of processes opening with one key at once, exactly one wins each round.

        6 processes (on 2 cores) open with the same key at once, 25 rounds:
        each round exactly one open succeeds and the others get
        KeyExistsError (BusyError -- a live holder preempted past the wait
        bound, nothing changed -- is tolerated twice in the run, for an
        overloaded host).  Forbidden: two winners, no winner, a loser's slot
        left taken, a key that does not find its winner.
        """
        procs, rounds = 6, 25
        eng = make_engine(capacity=rounds + procs, spec=ORDER_SPEC)
        barrier, out = spawner.ctx.Barrier(procs), spawner.ctx.Queue()
        for _ in range(procs):
            spawner.start(_same_key_opener, eng.handle, rounds, barrier, out)
        results = collect(out, procs, spawner)
        spawner.join_all(30)
        busy = 0
        for r in range(rounds):
            outcomes = [(pid, res[r]) for _, pid, res in results]
            winners = [(pid, pos) for pid, (what, pos) in outcomes if what == "won"]
            assert len(winners) == 1, f"round {r}: winners {winners}"
            busy += sum(1 for _, (what, _) in outcomes if what == "busy")
            losers = [what for _, (what, _) in outcomes if what != "won"]
            assert set(losers) <= {"exists", "busy"}, f"round {r}: {outcomes}"
            pid, pos = winners[0]
            assert eng.lookup(f"race-{r}") == pos
            assert eng.keys(pos) == (f"race-{r}",)
            assert eng.context(pos).account == pid
        assert busy <= 2, f"{busy} of {rounds * (procs - 1)} losing opens got BusyError"
        assert len(eng.snapshot()) == rounds, "a losing open left a position behind"
        if eng.url is None:
            assert not held_stripes(eng) and not busy_records(eng)

    def test_keys_stay_in_bind_order_under_slot_reuse(self, make_engine, spawner):
        """keys() lists an order's keys in bind order under constant slot reuse.

        3 writers churn orders (client key at open, exchange key bound after
        ACCEPT) on a 3-slot table, so a slot is often reopened while the
        release of its previous order is still clearing that order's key
        records.  keys() must list (client key, exchange key) in bind order
        every time.  Forbidden: any other order of the two keys.
        """
        writers = 3
        eng = make_engine(capacity=writers, spec=ORDER_SPEC)
        ctx = spawner.ctx
        progress = ctx.Array("q", writers, lock=False)
        start, out = ctx.Event(), ctx.Queue()
        for w in range(writers):
            spawner.start(_churn_writer, eng.handle, w, 2.0, progress, start, out)
        start.set()
        wres = collect(out, writers, spawner)
        spawner.join_all(30)
        problems = [p for r in wres for p in r[4]]
        assert not problems, "\n".join(problems[:20])
        done = sum(r[2] for r in wres)
        misordered = [p for r in wres for p in r[5]]
        assert not misordered, (f"{len(misordered)} of {done} orders listed their keys out "
                                "of bind order:\n" + "\n".join(misordered[:10]))

    def test_lookups_never_reach_another_orders_record(self, make_engine, spawner):
        """A lookup never returns an id whose record is another order's.

        3 writers open / bind / release orders with unique keys on a 4-slot
        table (slots reused constantly) while 3 readers look up recent keys
        and read the record of the id found.  Allowed: None, or an id released
        since (StaleIdError).  Forbidden: an id whose record (account, symbol)
        is another order's, an id whose keys lack the key looked up, a writer
        not finding its own keys while it holds them, a key found after its
        order was released.
        """
        writers, readers = 3, 3
        eng = make_engine(capacity=4, spec=ORDER_SPEC)
        ctx = spawner.ctx
        progress = ctx.Array("q", writers, lock=False)
        start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        for w in range(writers):
            spawner.start(_churn_writer, eng.handle, w, 2.5, progress, start, out)
        for r in range(readers):
            spawner.start(_churn_reader, eng.handle, writers, progress, r, start, stop, out)
        start.set()
        wres = collect(out, writers, spawner)
        stop.set()
        rres = collect(out, readers, spawner)
        spawner.join_all(30)
        problems = [p for r in wres for p in r[4]] + [p for r in rres for p in r[6]]
        assert not problems, "\n".join(problems[:20])
        done = sum(r[2] for r in wres)
        checked = sum(r[3] for r in rres)
        assert done > 100, f"writers completed only {done} orders"
        assert checked > 50, f"readers checked only {checked} records"
        assert len(eng.snapshot()) == 0
        if eng.url is None:
            assert used_cells(eng) == 0 and not busy_records(eng) and not held_stripes(eng)
        assert not eng.recover().changed


# =====================================================================================
# Chaos: inserters killed mid-insert.
def _die_in_open(handle: Any, key: str, ready: Any) -> None:
    """Open with ``key``; the fault kills this process mid-insert."""
    eng = Engine.attach(handle)
    ready.set()
    eng._set_fault(lib.ENG_FAULT_DIE_IN_KEY)
    eng.open(key=key, account=666)
    raise AssertionError("the fault did not kill this process")


def _die_in_bind(handle: Any, pos: int, key: str, ready: Any) -> None:
    """bind_key(pos, key); the fault kills this process mid-insert."""
    eng = Engine.attach(handle)
    ready.set()
    eng._set_fault(lib.ENG_FAULT_DIE_IN_KEY)
    eng.bind_key(pos, key)
    raise AssertionError("the fault did not kill this process")


def run_to_death(spawner: Any, eng: Engine, target: Any, *args: Any) -> int:
    """Run ``target`` in a spawned child until the fault kills it (SIGKILL);
    then switch the segment-wide fault off.  Returns the child's pid."""
    ready = spawner.ctx.Event()
    p = spawner.start(target, *args, ready)
    p.join(READY_TIMEOUT)
    eng._set_fault()
    assert ready.is_set() and not p.is_alive(), "the worker did not run"
    assert p.exitcode == -signal.SIGKILL, f"worker exit code {p.exitcode}"
    return p.pid


def assert_clean_after_recover(eng: Engine, expected: dict[bytes, int]) -> None:
    """After recover(): nothing of the dead is left in the key tables, the
    index holds exactly the live keys, every live key finds its opening."""
    assert not held_stripes(eng), f"stripe locks left: {held_stripes(eng)}"
    assert not busy_records(eng), f"BUSY key records left: {busy_records(eng)}"
    for s in range(eng.capacity):
        assert not eng.state_word(s) & lib.ENG_SW_LOCK, f"slot {s} still locked"
    assert live_keys(eng) == expected
    for k, pos in expected.items():
        assert eng.lookup(k) == pos
    assert used_cells(eng) == len(expected), "index cells left that no live key owns"


@pytest.mark.shm_only
class TestDeadInserters:
    @pytest.fixture
    def eng(self, make_engine):
        eng = make_engine(capacity=4, spec=ORDER_SPEC, keys_per_position=2)
        yield eng
        eng._set_fault()

    @pytest.fixture
    def live(self, eng):
        """A live order with two keys that must come through untouched."""
        pos = eng.open(key="live-cl", account=1)
        eng.bind_key(pos, "live-ex")
        return pos

    def test_open_killed_mid_insert_then_recover(self, eng, live, spawner):
        """An open killed mid key insert is invisible to lookup and rolled back by recover().

        A child dies inside open(key="half") between placing its index cell
        and publishing (stripe lock held, key record BUSY, slot locked).
        Before recover(): lookup("half") finds nothing, the live order's keys
        work.  recover() rolls the open back, clears the stripe lock, the
        record and the cell, drops the child's registry entry; afterwards the
        index holds exactly the live keys, "half" inserts freely, and a second
        recover() finds nothing left.
        """
        pid = run_to_death(spawner, eng, _die_in_open, eng.handle, "half")
        assert held_stripes(eng) and busy_records(eng), "the child did not die mid-insert"
        assert any(eng.state_word(s) & lib.ENG_SW_LOCK for s in range(eng.capacity))
        assert eng.lookup("half") is None
        assert eng.lookup("live-cl") == live and eng.keys(live) == ("live-cl", "live-ex")
        rep = eng.recover()
        assert rep.rolled_back == 1 and rep.rolled_forward == 0
        assert rep.keys_cleared >= 3, rep   # stripe lock, key record, index cell
        assert pid in rep.removed_pids
        assert_clean_after_recover(eng, {b"live-cl": live, b"live-ex": live})
        again = eng.recover()
        assert not again.changed, again
        pos = eng.open(key="half", account=2)
        assert eng.lookup("half") == pos and eng.keys(pos) == ("half",)
        assert len(eng.snapshot()) == 2

    def test_bind_killed_mid_insert_then_recover(self, eng, live, spawner):
        """A bind killed mid insert is cleared by recover(); the key then binds again."""
        pos = eng.open(key="mine", account=3)
        pid = run_to_death(spawner, eng, _die_in_bind, eng.handle, pos, "half")
        assert held_stripes(eng) and busy_records(eng), "the child did not die mid-insert"
        assert eng.keys(pos) == ("mine",) and eng.lookup("half") is None
        rep = eng.recover()
        assert rep.rolled_back == rep.rolled_forward == 0
        assert rep.keys_cleared >= 3, rep
        assert pid in rep.removed_pids
        assert_clean_after_recover(eng, {b"live-cl": live, b"live-ex": live, b"mine": pos})
        assert not eng.recover().changed
        eng.bind_key(pos, "half")
        assert eng.keys(pos) == ("mine", "half") and eng.lookup("half") == pos

    def test_dead_open_does_not_block_its_key(self, eng, live, spawner):
        """Without recover(), a dead open's key is taken over by the next open in bound."""
        run_to_death(spawner, eng, _die_in_open, eng.handle, "half")
        pos, took = timed(lambda: eng.open(key="half", account=4))
        assert took < ANSWER_BOUND, f"open over a dead inserter took {took:.2f} s"
        assert eng.lookup("half") == pos and eng.keys(pos) == ("half",)
        assert not held_stripes(eng)
        rep = eng.recover()
        assert rep.rolled_back == 1
        assert_clean_after_recover(eng, {b"live-cl": live, b"live-ex": live, b"half": pos})
        assert not eng.recover().changed

    def test_dead_bind_does_not_block_its_key_or_record(self, eng, live, spawner):
        """Without recover(), a dead bind's key and key record are taken over in bound."""
        pos = eng.open(key="mine", account=5)
        run_to_death(spawner, eng, _die_in_bind, eng.handle, pos, "half")
        other = eng.open(account=6)
        _, took = timed(lambda: eng.bind_key(other, "half"))
        assert took < ANSWER_BOUND, f"bind over a dead inserter took {took:.2f} s"
        assert eng.lookup("half") == other
        _, took = timed(lambda: eng.bind_key(pos, "second"))
        assert took < ANSWER_BOUND
        assert eng.keys(pos) == ("mine", "second") and eng.keys(other) == ("half",)
        eng.recover()
        assert_clean_after_recover(eng, {b"live-cl": live, b"live-ex": live, b"mine": pos,
                                         b"second": pos, b"half": other})
        assert not eng.recover().changed


# -- random SIGKILLs ---------------------------------------------------------------------
def _key_churner(handle: Any, log_dir: str, seed: int, ready: Any) -> None:
    """Open (with a client key), ACCEPT, bind an exchange key, cancel,
    release, forever; every key is logged before it is inserted; problems go
    to <seed>.problems.  Keys and accounts are made from ``seed`` (unique per
    worker; a pid could be reused by a replacement)."""
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    base = pathlib.Path(log_dir)
    log = (base / f"{seed}.keys").open("a", buffering=1)
    problems = base / f"{seed}.problems"
    ready.set()
    n = 0
    while True:
        n += 1
        ckey, xkey = churner_keys(seed, n)
        try:
            log.write(ckey + "\n")
            pos = eng.open(key=ckey, account=seed * CHURN_N + n)
            if eng.lookup(ckey) != pos:
                raise AssertionError(f"own key {ckey} not found")
            eng.transition(pos, "SUBMIT")
            eng.transition(pos, "ACCEPT")
            log.write(xkey + "\n")
            eng.bind_key(pos, xkey)
            if set(eng.keys(pos)) != {ckey, xkey} or eng.lookup(xkey) != pos:
                raise AssertionError(f"keys of {pos:#x}: {eng.keys(pos)}")
            if rng.random() < 0.3:
                time.sleep(0.001)
            eng.transition(pos, "CANCEL")
            eng.release_position(pos)
        except (BusyError, CapacityError):
            pass   # allowed: a live holder past the bound; slots taken by the dead
        except Exception:
            with problems.open("a") as f:
                f.write(traceback.format_exc() + "\n")


CHURN_N = 1_000_000   # account = seed * CHURN_N + n


def churner_keys(seed: int, n: int) -> tuple[str, str]:
    return f"o{seed}-{n}", f"e{seed}-{n}"


@pytest.mark.shm_only
class TestRandomKills:
    def test_random_kills_of_key_churners(self, make_engine, tmp_path):
        """Random kills of key churners leave every live key resolving to its opening only.

        4 processes (on 2 cores) loop open(key) / bind_key / release on an
        order table; random ones are SIGKILLed (and replaced) 12 times,
        recover() sometimes runs meanwhile.  After the last kill and a
        recover(): every live opening's keys resolve to it and are its client
        key and perhaps its exchange key, of its own record; nothing
        else is in the index; every other key ever tried (including any killed
        mid-insert) is free to insert; a second recover() finds nothing left.
        Forbidden: any worker error but BusyError/CapacityError.  (Workers come
        from a forkserver, as in test_chaos_kills: replacements start fast.)
        """
        eng = make_engine(capacity=48, spec=ORDER_SPEC, keys_per_position=2)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["engine", "numpy", __name__])
        rng = random.Random(15)
        pool: list[tuple[Any, Any]] = []
        everyone: list[Any] = []

        def start() -> None:
            ready = ctx.Event()
            p = ctx.Process(target=_key_churner, args=(eng.handle, str(tmp_path),
                                                       rng.randrange(2**32), ready), daemon=True)
            p.start()
            pool.append((p, ready))
            everyone.append(p)

        kills = 0
        try:
            for _ in range(4):
                start()
            until(lambda: all(r.is_set() for _, r in pool), "workers to start")
            t0 = time.monotonic()
            while kills < 12 and time.monotonic() - t0 < 15:
                time.sleep(rng.uniform(0.01, 0.1))
                ready_ones = [i for i, (_, r) in enumerate(pool) if r.is_set()]
                if not ready_ones:
                    continue
                p, _ = pool.pop(rng.choice(ready_ones))
                sigkill(p)
                kills += 1
                if rng.random() < 0.3:
                    eng.recover()
                start()
        finally:
            for p in everyone:
                if p.is_alive():
                    sigkill(p, may_have_exited=True)   # clean-up: the problems files judge
        assert kills >= 8, f"only {kills} kills"
        problems = "".join(f.read_text() for f in tmp_path.glob("*.problems"))
        assert not problems, problems[:4000]

        rep = eng.recover()
        live = live_keys(eng)
        for row in eng.snapshot():
            pos, acct = int(row["id"]), int(row["account"])
            want = churner_keys(*divmod(acct, CHURN_N))
            got = set(eng.keys(pos))
            assert got in ({want[0]}, set(want)), f"{pos:#x} (account {acct}) has keys {got}"
        assert_clean_after_recover(eng, live)
        again = eng.recover()
        assert not again.changed, f"second recover() still found {again} (first: {rep})"

        tried = {line for f in tmp_path.glob("*.keys") for line in f.read_text().split()}
        assert len(tried) > 100, f"only {len(tried)} keys tried"
        for key in sorted(tried - {k.decode() for k in live}):
            assert eng.lookup(key) is None, f"{key} still found"
            pos = eng.open(key=key)
            assert eng.lookup(key) == pos
            release(eng, pos)
        for k, pos in live.items():
            with pytest.raises(KeyExistsError):
                eng.open(key=k)
            assert eng.lookup(k) == pos
