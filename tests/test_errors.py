"""The C boundary: every eng_* entry point refuses bad segments, NULL outputs
and bad values with a status code (never a crash), and each code maps to one
exception class (EngineError itself is never raised)."""

from __future__ import annotations

import collections
import os
import pathlib
import re
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from owners_helpers import (
    ANSWER_BOUND,
    CTX,
    LOCK,
    U64,
    assert_own_entry,
    get_from,
    hold_worker,
    monitoring,
    registry,
)
from procs import JOIN_TIMEOUT, sigkill, timed

import engine.errors
from engine import (
    ArgumentError,
    BusyError,
    CapacityError,
    ClosedError,
    Engine,
    EngineError,
    EngineTypeError,
    NotOpenError,
    PriceError,
    SegmentError,
    SlotError,
    SpecMismatchError,
    State,
    Trigger,
    TriggerError,
)
from engine._native import ffi, lib
from engine.errors import InternalError, StaleIdError
from engine.store import shm as segment

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = REPO_ROOT / "native" / "engine.h"


def c_error_codes() -> dict[str, int]:
    """Every ENG_E* error code (an ENG_ERRNO_MIN would be a bound, not a code)."""
    return {n: getattr(lib, n) for n in dir(lib)
            if n.startswith("ENG_E") and n != "ENG_ERRNO_MIN"
            and isinstance(getattr(lib, n), int) and getattr(lib, n) < 0}


ERRNO_MIN = min(c_error_codes().values())   # the lowest C error code


def header_functions() -> set[str]:
    """Every eng_* function declared in the cdef part of native/engine.h."""
    text = HEADER.read_text()
    cdef = text.split("/* cdef-begin */")[1].split("/* cdef-end */")[0]
    return set(re.findall(r"^[A-Za-z_][\w \t]*?\**\s*\b(eng_\w+)\s*\(", cdef, re.M))


INVALID_SEGS = ("null", "zeroed", "detached", "forked")
U64_SPECIAL = [0, 1, 2, 2**24 - 1, 2**24, 2**32 - 1, 2**32, 2**55, 2**56 - 1, 2**56,
               2**63 - 1, 2**63, U64]


I64_SPECIAL = [0, 1, -1, 2, 2**31, -(2**31), 2**62, 2**63 - 1, -(2**63),
               lib.ENG_MAX_TIMEOUT_NS, lib.ENG_MAX_TIMEOUT_NS + 1, 10**18]


U32_SPECIAL = [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 127, 128, 255, 256, 2**24 - 1, 2**24,
               2**31 - 1, 2**31, 2**32 - 1]


I32_SPECIAL = [0, 1, -1, 2, -2, 2**31 - 1, -(2**31)]
U64S = st.one_of(st.sampled_from(U64_SPECIAL), st.integers(0, U64))
I64S = st.one_of(st.sampled_from(I64_SPECIAL), st.integers(-(2**63), 2**63 - 1))
U32S = st.one_of(st.sampled_from(U32_SPECIAL), st.integers(0, 2**32 - 1))
I32S = st.one_of(st.sampled_from(I32_SPECIAL), st.integers(-(2**31), 2**31 - 1))
DOUBLES = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 100.0, 5e-324, 1.7976931348623157e308,
                                     -1e308, float("nan"), float("inf"), float("-inf")]),
                    st.floats())


BAD_PRICES = st.sampled_from([0.0, -0.0, -1.0, -1e308, float("nan"), float("inf"),
                              float("-inf")])


SMALL_BUF = 4096


class CFuzz:
    """Raw calls into engine._native.lib with hostile segments and values.

    Segments: NULL, zeroed (never attached), detached, forked (a view whose
    fork count is not this process's), and foreign: a live view of another
    engine that never opened a position, so every id is bad there.  The home
    engine (which owns the ids used as hostile values) is never passed in."""

    def __init__(self, home_handle: Any, foreign_handle: Any, home_pos: int, log_fd: int):
        self.home = Engine.attach(home_handle)
        self.foreign = Engine.attach(foreign_handle)
        self.log_fd = log_fd
        self.calls: collections.Counter[str] = collections.Counter()
        f = self.foreign._seg
        detached = ffi.new("eng_seg *")
        fd = os.open(os.path.join(segment.SHM_DIR, self.foreign.name), os.O_RDWR)
        assert lib.eng_attach(detached, f.base, f.size, 0, fd) == 0   # detach closes fd
        lib.eng_detach(detached)
        self.segs = {"null": ffi.NULL, "zeroed": ffi.new("eng_seg *"), "detached": detached,
                     "forked": self._forked_copy(), "foreign": f}
        cap = int(f.capacity)
        slot = home_pos & lib.ENG_ID_SLOT_MASK
        opening = home_pos >> lib.ENG_ID_SLOT_BITS
        self.ids = st.one_of(st.sampled_from(
            [*U64_SPECIAL, home_pos, slot, (1 << 24) | cap, (1 << 24) | (cap - 1), cap,
             ((opening + 5) << 24) | slot, lib.ENG_ID_MAX, lib.ENG_ID_MAX + 1,
             lib.ENG_ID_SLOT_MASK]), U64S)
        self.slots = st.one_of(st.sampled_from([0, cap - 1, cap, cap + 1, 2**24, 2**32 - 1]),
                               U32S)
        self.buf = ffi.new("uint8_t[]", SMALL_BUF)
        self.table = ffi.new("uint8_t[]", lib.ENG_MAX_STATES * lib.ENG_MAX_TRIGGERS)
        self.guards = [ffi.NULL, ffi.callback("eng_guard_fn", lambda *a: 1),
                       ffi.callback("eng_guard_fn", lambda *a: 0),
                       ffi.callback("eng_guard_fn", lambda *a: -1)]

    def _forked_copy(self) -> Any:
        """A copy of the foreign view as a fork child would hold it (another fork count)."""
        f = self.foreign._seg
        forked = ffi.new("eng_seg *")
        forked[0] = f[0]
        forked.fork_epoch = (int(f.fork_epoch) + 1) & 0xFFFFFFFF
        forked.pid = (int(f.pid) % 4_000_000) + 1
        return forked

    # -- drawing ----------------------------------------------------------------------------
    def seg(self, d: Any, foreign: bool = True) -> tuple[str, Any]:
        kind = d(st.sampled_from(INVALID_SEGS + (("foreign",) if foreign else ())))
        return kind, self.segs[kind]

    @staticmethod
    def out(d: Any, ctype: str) -> Any:
        return ffi.NULL if d(st.booleans()) else ffi.new(ctype)

    def update(self, d: Any) -> Any:
        if d(st.booleans()):
            return ffi.NULL
        words = [d(U64S) for _ in range(lib.ENG_MAX_FIELD_WORDS)]
        return ffi.new("eng_ctx_update *", {"mask": d(U32S), "w": words})

    @staticmethod
    def key(d: Any) -> tuple[Any, int]:
        """(key pointer, length): NULL, or bytes with their length or a hostile one."""
        if d(st.booleans()):
            return ffi.NULL, d(U32S)
        data = d(st.binary(min_size=0, max_size=lib.ENG_KEY_MAX))
        buf = ffi.new("char[]", max(len(data), 1))
        ffi.memmove(buf, data, len(data))
        return buf, d(st.one_of(st.just(len(data)), st.integers(0, len(data)), U32S
                                if not data else st.integers(0, len(data))))

    @staticmethod
    def layout(d: Any) -> Any:
        if d(st.booleans()):
            return ffi.NULL
        return ffi.new("eng_rec_layout *", {
            "n_words": d(U32S), "keys_per_position": d(U32S),
            "word_type": [d(st.integers(0, 255)) for _ in range(lib.ENG_MAX_FIELD_WORDS)],
            "roles": [d(st.integers(0, 255)) for _ in range(lib.ENG_ROLE_COUNT)]})

    def call(self, name: str, kind: str, fn: Callable[..., Any], *args: Any) -> Any:
        shown = ", ".join("NULL" if a is ffi.NULL else ("<cdata>" if isinstance(a, ffi.CData)
                                                        else repr(a)) for a in args)
        os.write(self.log_fd, f"{name}[{kind}]({shown})\n".encode())
        self.calls[name] += 1
        return fn(*args)

    @staticmethod
    def expect(name: str, kind: str, rc: int, foreign_ok: tuple[int, int] | None = None) -> None:
        """Invalid segments: a negative code.  Foreign: a negative code, unless
        ``foreign_ok`` gives the documented range."""
        lo = ERRNO_MIN
        if kind in INVALID_SEGS or foreign_ok is None:
            ok = lo <= rc < 0
        else:
            ok = foreign_ok[0] <= rc <= foreign_ok[1]
        assert ok, f"{name} on a {kind} segment returned {rc}"

    # -- one call per function --------------------------------------------------------------
    def one(self, d: Any, name: str) -> None:   # a table written as code
        x, ids, cap = self.expect, self.ids, int(self.segs["foreign"].capacity)
        if name == "eng_noop":
            assert self.call(name, "-", lib.eng_noop) == 0
        elif name == "eng_strerror":
            p = self.call(name, "-", lib.eng_strerror, d(st.one_of(st.integers(-64, 64), I32S)))
            assert p != ffi.NULL and ffi.string(p)
        elif name == "eng_segment_size":
            self.call(name, "-", lib.eng_segment_size, d(U32S), d(U32S), d(U32S), d(U32S))
        elif name == "eng_format":
            base = d(st.sampled_from(["null", "buf"]))
            size = d(st.integers(0, SMALL_BUF)) if base == "buf" else d(U64S)
            rc = self.call(name, base, lib.eng_format,
                           self.buf if base == "buf" else ffi.NULL, size, d(U32S),
                           d(st.sampled_from([ffi.NULL, self.table])), d(U32S), d(U32S),
                           d(U32S), d(U32S), d(U64S), d(U32S), self.layout(d), d(U32S),
                           d(U32S), d(U32S))
            x(name, base, rc)
        elif name == "eng_segment_size_journal":
            self.call(name, "-", lib.eng_segment_size_journal, d(U32S), d(U32S), d(U32S),
                      d(U32S), d(U32S))
        elif name == "eng_journal_seq":
            kind, s = self.seg(d)
            self.call(name, kind, lib.eng_journal_seq, s)
        elif name == "eng_journal_read":
            kind, s = self.seg(d)
            out = ffi.NULL if d(st.booleans()) else ffi.new("eng_jrec[]", 4)
            n = d(U32S) if out == ffi.NULL else d(st.integers(0, 4))
            x(name, kind, self.call(name, kind, lib.eng_journal_read, s, d(U64S), out, n,
                                    self.out(d, "uint32_t *"), self.out(d, "uint64_t *")),
              (ERRNO_MIN, 0))
        elif name == "eng_journal_wait":
            kind, s = self.seg(d)
            timeout = d(I64S) if kind != "foreign" else d(st.integers(-(2**63), 1_000_000))
            x(name, kind, self.call(name, kind, lib.eng_journal_wait, s, d(U64S), timeout,
                                    self.out(d, "uint64_t *")), (ERRNO_MIN, 0))
        elif name == "eng_validate":
            base = d(st.sampled_from(["null", "buf", "foreign"]))
            fsize = int(self.segs["foreign"].size)
            if base == "foreign":
                size = d(st.one_of(st.integers(0, fsize), st.just(fsize)))
                rc = self.call(name, base, lib.eng_validate, self.segs["foreign"].base, size,
                               d(U64S))
                assert (ERRNO_MIN <= rc <= 0) and (rc < 0 or size == fsize), rc
            else:
                size = d(st.integers(0, SMALL_BUF)) if base == "buf" else d(U64S)
                x(name, base, self.call(name, base, lib.eng_validate,
                                        self.buf if base == "buf" else ffi.NULL, size, d(U64S)))
        elif name == "eng_attach":
            into = d(st.sampled_from(["null", "fresh"]))
            s = ffi.NULL if into == "null" else ffi.new("eng_seg *")
            base = d(st.sampled_from(["null", "buf", "foreign-truncated", "foreign-other-spec"]))
            f = self.segs["foreign"]
            if base == "null":
                args = (ffi.NULL, d(U64S), d(U64S))
            elif base == "buf":
                args = (self.buf, d(st.integers(0, SMALL_BUF)), d(U64S))
            elif base == "foreign-truncated":
                args = (f.base, d(st.integers(0, int(f.size) - 1)), d(U64S))
            else:
                real = int(self.foreign.spec.fingerprint)
                args = (f.base, int(f.size), d(U64S.filter(lambda v: v not in (0, real))))
            fd = d(st.sampled_from([-1, -(2**31), 0, 1, 2, 1023, 2**31 - 1]))
            x(name, f"{into}/{base}",
              self.call(name, f"{into}/{base}", lib.eng_attach, s, *args, fd))
        elif name == "eng_detach":
            kind, s = self.seg(d, foreign=False)
            assert self.call(name, kind, lib.eng_detach, s) is None
            if kind == "forked":   # detach forgot (zeroed) it: keep a forked view for later calls
                self.segs["forked"] = self._forked_copy()
        elif name == "eng_check":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_check, s), (0, 0))
        elif name == "eng_open":
            kind, s = self.seg(d)
            words = ffi.new("uint64_t[]", [d(U64S) for _ in range(lib.ENG_MAX_FIELD_WORDS)])
            if kind == "foreign":   # foreign stays pristine: a bad entry price
                words[0] = struct.unpack("<Q", struct.pack("<d", d(BAD_PRICES)))[0]
            x(name, kind, self.call(name, kind, lib.eng_open, s,
                                    ffi.NULL if d(st.booleans()) else words, *self.key(d),
                                    self.out(d, "uint64_t *"), self.out(d, "uint64_t *")))
        elif name == "eng_bind_key":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_bind_key, s, d(ids), *self.key(d)))
        elif name in ("eng_lookup", "eng_lookup_account"):
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, getattr(lib, name), s, *self.key(d)),
              (ERRNO_MIN, 0))
        elif name == "eng_keys":
            kind, s = self.seg(d)
            k = d(st.integers(0, 3))
            outs = ffi.NULL if d(st.booleans()) else ffi.new("eng_key[]", max(k, 1))
            x(name, kind, self.call(name, kind, lib.eng_keys, s, d(ids), outs,
                                    d(U32S) if outs == ffi.NULL else k,
                                    self.out(d, "uint32_t *")))
        elif name == "eng_abandon_open":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_abandon_open, s, d(ids), d(U64S)))
        elif name in ("eng_release_position", "eng_state"):
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, getattr(lib, name), s, d(ids)))
        elif name == "eng_transition":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_transition, s, d(ids), d(U32S)))
        elif name == "eng_transition_ctx":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_transition_ctx, s, d(ids), d(U32S),
                                    self.update(d)))
        elif name == "eng_guard_transition":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_guard_transition, s, d(ids), d(U32S),
                                    self.update(d), d(st.sampled_from(self.guards)), ffi.NULL))
        elif name in ("eng_state_word", "eng_id_of"):
            kind, s = self.seg(d)
            slot, out = d(self.slots), self.out(d, "uint64_t *")
            rc = self.call(name, kind, getattr(lib, name), s, slot, out)
            ok_zero = name == "eng_state_word" and slot < cap and out != ffi.NULL
            x(name, kind, rc, (0, 0) if ok_zero else None)
        elif name == "eng_update_price":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_update_price, s, d(ids), d(DOUBLES)))
        elif name == "eng_update_prices":
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            id_vals = [d(ids) for _ in range(k)]
            idp = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t[]", id_vals or [0])
            pp = ffi.NULL if d(st.booleans()) else ffi.new(
                "double[]", [d(DOUBLES) for _ in range(k)] or [1.0])
            n = d(U64S) if idp == ffi.NULL and pp == ffi.NULL else d(st.integers(0, k))
            rc = self.call(name, kind, lib.eng_update_prices, s, idp, pp, n,
                           self.out(d, "uint64_t *"), self.out(d, "uint64_t *"))
            x(name, kind, rc, (ERRNO_MIN, 0) if n == 0 else None)
        elif name in ("eng_states", "eng_prices", "eng_transition_many"):
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            idp = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t[]", [d(ids) for _ in range(k)]
                                                            or [0])
            ctype = {"eng_states": "uint16_t[]", "eng_prices": "eng_price_out[]",
                     "eng_transition_many": "uint8_t[]"}[name]
            outp = ffi.NULL if d(st.booleans()) else ffi.new(ctype, max(k, 1))
            trig = ffi.NULL if d(st.booleans()) else ffi.new("uint32_t[]", [d(U32S) for _ in
                                                                            range(max(k, 1))])
            n = d(U64S) if idp == ffi.NULL and outp == ffi.NULL else d(st.integers(0, k))
            args = (s, idp, trig, n, outp) if name == "eng_transition_many" else (s, idp, n, outp)
            rc = self.call(name, kind, getattr(lib, name), *args, self.out(d, "uint64_t *"))
            x(name, kind, rc, (ERRNO_MIN, 0) if n == 0 else None)
        elif name == "eng_tindex_check":
            kind, s = self.seg(d)
            outp = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t[4]")
            x(name, kind, self.call(name, kind, lib.eng_tindex_check, s, outp), (ERRNO_MIN, 0))
        elif name == "eng_tindex_slots":
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            outp = ffi.NULL if d(st.booleans()) else ffi.new("uint32_t[]", max(k, 1))
            mx = d(U32S) if outp == ffi.NULL else d(st.integers(0, k))
            x(name, kind, self.call(name, kind, lib.eng_tindex_slots, s, d(I64S), outp, mx,
                                    self.out(d, "uint32_t *")), (ERRNO_MIN, 0))
        elif name == "eng_update_token_price":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_update_token_price, s, d(I64S),
                                    d(DOUBLES)), (ERRNO_MIN, 0))
        elif name in ("eng_read_price", "eng_read_context"):
            kind, s = self.seg(d)
            ctype = "eng_price_out *" if name == "eng_read_price" else "eng_ctx_out *"
            x(name, kind, self.call(name, kind, getattr(lib, name), s, d(ids),
                                    self.out(d, ctype)))
        elif name == "eng_wait_change":
            kind, s = self.seg(d)
            timeout = d(I64S) if kind != "foreign" else d(st.integers(-(2**63), 1_000_000))
            x(name, kind, self.call(name, kind, lib.eng_wait_change, s, d(ids), d(I64S),
                                    timeout, self.out(d, "int64_t *")))
        elif name == "eng_snapshot":
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            rows = ffi.NULL if d(st.booleans()) else ffi.new("eng_row[]", max(k, 1))
            max_rows = d(U32S) if rows == ffi.NULL else d(st.integers(0, k))
            x(name, kind, self.call(name, kind, lib.eng_snapshot, s, rows, max_rows,
                                    self.out(d, "uint32_t *")), (ERRNO_MIN, 0))
        elif name == "eng_recover":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_recover, s,
                                    self.out(d, "eng_recover_report *")), (ERRNO_MIN, 0))
        elif name == "eng_proc_alive":
            rc = self.call(name, "-", lib.eng_proc_alive, d(U32S), d(U64S))
            assert ERRNO_MIN <= rc <= 1, rc
        elif name == "eng_entry_held":   # a probe through stdin: any answer, no crash
            rc = self.call(name, "-", lib.eng_entry_held, d(st.sampled_from([-1, 0, 2**31 - 1])),
                           d(U64S), d(U32S))
            assert ERRNO_MIN <= rc <= 1, rc
        elif name == "eng_attach_path":   # a path that is not the mapped file: refused
            into = d(st.sampled_from(["null", "fresh"]))
            s = ffi.NULL if into == "null" else ffi.new("eng_seg *")
            f = self.foreign
            fst = os.stat(os.path.join(segment.SHM_DIR, f.name))
            base = d(st.sampled_from(["null", "buf", "foreign"]))
            args = ((ffi.NULL, d(U64S)) if base == "null" else (self.buf, d(U64S))
                    if base == "buf" else (f._seg.base, int(f._seg.size)))
            path = d(st.sampled_from([ffi.NULL, b"", b"/nonexistent/x", b"/dev/null",
                                      os.path.join(segment.SHM_DIR, f.name).encode()]))
            ident = d(st.sampled_from([(fst.st_dev, fst.st_ino), (0, 0), (U64, U64)]))
            rc = self.call(name, f"{into}/{base}", lib.eng_attach_path, s, *args,
                           d(st.sampled_from([0, U64])), path, *ident)
            assert ERRNO_MIN <= rc < 4096, rc   # > 0: an errno (the path)
            if rc == 0:
                lib.eng_detach(s)
        elif name == "eng_test_recover_hook":   # NULL: none (a hook would run in recover)
            assert self.call(name, "-", lib.eng_test_recover_hook, ffi.NULL) is None
        elif name == "eng_owner_alive":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_owner_alive, s, d(U32S)),
              (ERRNO_MIN, 1))
        elif name == "eng_proc_start_time":
            self.call(name, "-", lib.eng_proc_start_time, d(U32S))
        elif name == "eng_set_halt":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_set_halt, s, d(U32S)),
              (ERRNO_MIN, 0))
        elif name == "eng_set_metrics":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_set_metrics, s, d(U32S), d(U32S)),
              (ERRNO_MIN, 0))
        elif name == "eng_set_faults":   # a live segment would really stop or kill us
            kind, s = self.seg(d, foreign=False)
            x(name, kind, self.call(name, kind, lib.eng_set_faults, s, d(U32S), d(U64S)))
        elif name == "eng_test_hold":
            kind, s = self.seg(d)
            what = d(U32S) if kind != "foreign" else d(st.sampled_from([0, 1, 2, 4, 2**32 - 1]))
            x(name, kind, self.call(name, kind, lib.eng_test_hold, s, what, d(ids)))
        elif name in ("eng_open_account", "eng_deposit", "eng_withdraw", "eng_close_account",
                      "eng_halt_account", "eng_update_account", "eng_read_account"):
            self.account_call(d, name)
        elif name == "eng_accounts":
            kind, s = self.seg(d)
            rows = ffi.NULL if d(st.booleans()) else ffi.new("eng_account_row[]", 4)
            max_rows = d(U32S) if rows == ffi.NULL else d(st.integers(0, 4))
            x(name, kind, self.call(name, kind, lib.eng_accounts, s, rows, max_rows,
                                    self.out(d, "uint32_t *")), (ERRNO_MIN, 0))
        elif name == "eng_money_of":
            rc = self.call(name, "-", lib.eng_money_of, d(st.floats()), d(st.floats()))
            assert rc >= 0 or rc == lib.ENG_EBADMONEY, rc
        elif name == "eng_price_clock":   # any int: one of the two modes, never a crash
            mode = self.call(name, "-", lib.eng_price_clock, d(I32S))
            assert mode in (lib.ENG_CLOCK_REALTIME, lib.ENG_CLOCK_TSC), mode
        elif name == "eng_price_clock_ns":
            assert self.call(name, "-", lib.eng_price_clock_ns) > 0
        elif name == "eng_test_faults":   # any int: the switch is 0 or 1; put back after
            was = lib.eng_test_faults(-1)
            assert self.call(name, "-", lib.eng_test_faults, d(I32S)) in (0, 1)
            lib.eng_test_faults(was)
        elif name == "eng_validate_detail":   # eng_validate, with NULL or real outputs
            base = d(st.sampled_from(["null", "buf"]))
            size = d(st.integers(0, SMALL_BUF)) if base == "buf" else d(U64S)
            field = ffi.NULL if d(st.booleans()) else ffi.new("const char **")
            value = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t *")
            x(name, base, self.call(name, base, lib.eng_validate_detail,
                                    self.buf if base == "buf" else ffi.NULL, size, d(U64S),
                                    field, value))
        elif name == "eng_gate_enter":   # entered, then left: the view's gate stays balanced
            kind, s = self.seg(d)
            rc = self.call(name, kind, lib.eng_gate_enter, s)
            assert rc in (0, lib.ENG_ECLOSED) and (rc or s != ffi.NULL), rc
            if rc == 0:
                lib.eng_gate_leave(s)
        elif name == "eng_gate_leave":   # after an enter only, as every caller does
            kind, s = self.seg(d)
            if lib.eng_gate_enter(s) == 0:
                assert self.call(name, kind, lib.eng_gate_leave, s) is None
        elif name == "eng_gate_shut":    # no call in flight here: 0; opened again after
            kind, s = self.seg(d)
            assert self.call(name, kind, lib.eng_gate_shut, s) == 0
            lib.eng_gate_open(s)
        elif name == "eng_gate_open":
            kind, s = self.seg(d)
            assert self.call(name, kind, lib.eng_gate_open, s) is None
        elif name.startswith(("eng_durable_", "eng_dw_", "eng_crc32c")):   # test_durable*.py
            kind, s, dw = *self.seg(d), lib.eng_dw_new()   # no segment here is durable
            out = self.out(d, "uint64_t *")
            args = {"eng_durable_setup": (b"/tmp", d(I32S), d(U64S), d(U64S), d(I32S)),
                    "eng_durable_fault": (d(U32S),), "eng_durable_dir": (ffi.NULL, d(U32S)),
                    "eng_durable_info_of": (self.out(d, "eng_durable_info *"),),
                    "eng_durable_run": (dw,), "eng_durable_checkpoint": (dw, out),
                    "eng_durable_flush": (dw, d(I32S), out),
                    "eng_durable_release": (dw, d(I32S), out),
                    "eng_durable_continue": (d(U64S),)}.get(name)
            if args is None:   # no segment: the CRC (its known vector), the writer state
                args = {"eng_crc32c": (0, b"123456789", 9), "eng_crc32c_hw": (),
                        "eng_dw_new": (), "eng_dw_free": (ffi.NULL,),
                        "eng_dw_stop": (ffi.NULL if d(st.booleans()) else dw, d(U32S)),
                        "eng_durable_refusal": (self.out(d, "eng_durable_info *"),)}[name]
                rc = self.call(name, "-", getattr(lib, name), *args)
                assert rc in ({0xE3069283} if name == "eng_crc32c" else {0, 1, None}) or (
                    name == "eng_dw_new" and lib.eng_dw_free(rc) is None), rc
            else:
                x(name, kind, self.call(name, kind, getattr(lib, name), s, *args))
            lib.eng_dw_free(dw)
        elif name == "eng_restore_format":   # a fresh view; the buffer is below a header
            s = ffi.NULL if d(st.booleans()) else ffi.new("eng_seg *")
            base = d(st.sampled_from(["null", "buf"]))
            rc = self.call(name, base, lib.eng_restore_format, s,
                           self.buf if base == "buf" else ffi.NULL,
                           d(st.integers(0, SMALL_BUF)) if base == "buf" else d(U64S), d(U32S),
                           d(st.sampled_from([ffi.NULL, self.table])), d(U32S), d(U32S),
                           d(U32S), d(U32S), d(U64S), d(U32S), self.layout(d), d(U32S),
                           d(U32S), d(U32S))
            x(name, base, rc)
        elif name in ("eng_restore_slots", "eng_restore_prices", "eng_restore_keys",
                      "eng_restore_accounts", "eng_restore_ring", "eng_restore_finish"):
            kind, s = self.seg(d)   # none of them is a restore's not-ready view: refused
            recs = ffi.NULL if d(st.booleans()) else ffi.new("eng_jrec[]", 4)
            n = d(st.integers(0, 4)) if recs != ffi.NULL else d(U64S)
            if name == "eng_restore_ring":
                args: tuple[Any, ...] = (recs, n)
            elif name == "eng_restore_finish":
                args = (d(U32S), d(U64S), d(st.integers(-(2**63), 2**63 - 1)),
                        self.out(d, "uint64_t *"))
            else:
                idx = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t[]", [d(U64S)] * 4)
                args = (recs, d(U64S), idx, n, self.out(d, "uint64_t *"))
            x(name, kind, self.call(name, kind, getattr(lib, name), s, *args))
        elif name == "eng_dj_crc32c":
            data = d(st.sampled_from([ffi.NULL, self.buf]))
            self.call(name, "-", lib.eng_dj_crc32c, d(U32S), data,
                      d(st.integers(0, SMALL_BUF)) if data != ffi.NULL else d(U64S))
        elif name == "eng_dj_check_frames":
            k = SMALL_BUF // lib.ENG_DJ_FRAME_BYTES
            buf = d(st.sampled_from([ffi.NULL, self.buf]))
            n = d(st.integers(0, k)) if buf != ffi.NULL else d(U64S)
            out = ffi.NULL if d(st.booleans()) else ffi.new("uint8_t[]", k)
            rc = self.call(name, "-", lib.eng_dj_check_frames, buf, n, out)
            assert rc in (0, lib.ENG_EBADARG), rc
        else:
            raise AssertionError(f"{name}: no fuzz plan (add one to CFuzz.one)")

    def account_call(self, d: Any, name: str) -> None:
        """Account calls: hostile segments, ids and money.  The foreign engine
        never opened an account, so every id is bad there, and open_account
        gets negative money (it stays pristine)."""
        kind, s = self.seg(d)
        money = st.integers(-(2**63), 2**63 - 1)
        aid = d(st.one_of(self.ids, st.sampled_from([1 << 24, (1 << 24) | 63, 2 << 24])))
        if name == "eng_open_account":
            cash = d(st.integers(-(2**63), -1)) if kind == "foreign" else d(money)
            args: tuple[Any, ...] = (cash, d(money), d(U32S), d(money), ffi.NULL, 0,
                                     self.out(d, "uint64_t *"))
        elif name in ("eng_deposit", "eng_withdraw"):
            args = (aid, d(money))
        elif name == "eng_halt_account":
            args = (aid, d(U32S))
        elif name == "eng_close_account":
            args = (aid,)
        elif name == "eng_read_account":
            args = (aid, self.out(d, "eng_account_row *"))
        else:
            args = (aid, d(U64S), d(money), d(U32S), d(money), d(U32S), d(U32S))
        self.expect(name, kind, self.call(name, kind, getattr(lib, name), s, *args))

    def finish(self) -> dict[str, Any]:
        """The foreign engine is still pristine and both entries are intact."""
        f = self.segs["foreign"]
        out = ffi.new("uint64_t *")
        for slot in range(int(f.capacity)):
            assert lib.eng_state_word(f, slot, out) == 0
            assert out[0] & (lib.ENG_SW_STATE_MASK | LOCK) == 0, f"foreign slot {slot} touched"
        for eng in (self.home, self.foreign):
            assert_own_entry(eng)
        for fd in (0, 1, 2):   # a refused attach never closes the descriptor it was given
            os.fstat(fd)
        return {"calls": dict(self.calls)}


FUZZ_PLANNED = sorted(header_functions())


def c_fuzz_worker(home_handle: Any, foreign_handle: Any, home_pos: int, log_path: str,
                  examples: int, q: Any) -> None:
    """Run the raw-call fuzz (hypothesis) in a child: a crash kills only it."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    fz = CFuzz(home_handle, foreign_handle, home_pos, log_fd)

    def plan(n_examples: int, name: str | None) -> Callable[[], None]:
        @settings(max_examples=n_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data: Any) -> None:
            fz.one(data.draw, name or data.draw(st.sampled_from(FUZZ_PLANNED)))
        return fuzz

    for name in FUZZ_PLANNED:   # every function a few times, whatever the mix below draws
        plan(10, name)()
    plan(examples, None)()
    q.put(fz.finish())


def _exception_class(v: Any) -> type:
    if isinstance(v, type):
        return v
    if isinstance(v, (tuple, list)):
        for item in v:
            if isinstance(item, type):
                return item
    for attr in ("cls", "exc", "error", "exception", "type"):
        if isinstance(getattr(v, attr, None), type):
            return getattr(v, attr)
    raise AssertionError(f"cannot find the exception class in table value {v!r}")


def error_table() -> dict[int, type]:
    """The one code -> exception table (engine.errors.ERRORS or the like)."""
    for name in ("ERRORS", "ERROR_TABLE", "CODE_ERRORS", "ERRORS_BY_CODE", "_ERRORS"):
        t = getattr(engine.errors, name, None)
        if isinstance(t, Mapping):
            break
    else:
        found = [v for mod in (engine.errors, engine.core) for v in vars(mod).values()
                 if isinstance(v, Mapping) and lib.ENG_ESTALE in v]
        assert found, "no code -> exception table in engine.errors (expected ERRORS)"
        t = found[0]
    return {int(code): _exception_class(v) for code, v in t.items()}


#: what the contract and DESIGN name for these codes
EXPECTED_CLASSES = {
    "ENG_ESTALE": StaleIdError, "ENG_ENOTOPEN": NotOpenError, "ENG_EBADSLOT": SlotError,
    "ENG_EBADTRIGGER": TriggerError, "ENG_EBADPRICE": PriceError, "ENG_EBADARG": ArgumentError,
    "ENG_EFULL": CapacityError, "ENG_ENOPROC": CapacityError, "ENG_EBUSY": BusyError,
    "ENG_ERECOVERING": BusyError, "ENG_ECLOSED": ClosedError, "ENG_EFORKED": ClosedError,
    "ENG_ETIMEDOUT": TimeoutError, "ENG_EMAGIC": SegmentError, "ENG_ELAYOUT": SegmentError,
    "ENG_ESIZE": SegmentError, "ENG_ENOTREADY": SegmentError, "ENG_ECORRUPT": SegmentError,
    "ENG_ESPEC": SpecMismatchError,
}


class TestRawCBoundary:
    """Every exported C function, called directly, refuses hostile segments,
    NULL out-pointers and hostile values with a code: never a crash."""

    def test_every_header_function_has_a_fuzz_plan(self):
        """The fuzz covers every eng_* function the header declares."""
        assert len(FUZZ_PLANNED) >= 30, FUZZ_PLANNED
        missing = [n for n in FUZZ_PLANNED if not hasattr(lib, n)]
        assert not missing, f"declared but not in lib: {missing}"

    def test_hostile_raw_calls_return_codes(self, make_engine, spawn, tmp_path):
        """Hostile raw lib calls return negative codes; never a crash or a change.

        Raw lib calls with NULL / zeroed / detached / forked / foreign segments,
        NULL outs and hostile ids and values return a negative code (or a
        documented value); forbidden: a crash, a change to the home engine.
        """
        home, foreign = make_engine(capacity=4), make_engine(capacity=3)
        pos = monitoring(home)
        slot = home.slot_of(pos)
        before = (home.state_word(slot), home.price(pos), home.context(pos), registry(home))
        log = tmp_path / "calls.log"
        q = CTX.Queue()
        p = spawn(c_fuzz_worker, home.handle, foreign.handle, pos, str(log), 1500, q)
        try:
            result = get_from(q, p, timeout=240.0)
        except AssertionError:
            p.join(JOIN_TIMEOUT)
            lines = log.read_text().splitlines() if log.exists() else []
            why = (f"killed by signal {-p.exitcode}" if p.exitcode and p.exitcode < 0
                   else f"exit code {p.exitcode}")
            pytest.fail(f"fuzz child {why} after {len(lines)} calls; last: "
                        f"{lines[-1] if lines else None}")
        p.join(JOIN_TIMEOUT)
        print(f"\nraw C fuzz: {sum(result['calls'].values())} calls over "
              f"{len(result['calls'])} functions")
        assert set(result["calls"]) == set(FUZZ_PLANNED)
        after_registry = [e for e in registry(home) if e[1] != p.pid]
        assert (home.state_word(slot), home.price(pos), home.context(pos), after_registry) == \
            before


class TestErrors:
    """Each C code maps, in one table, to one exception class below
    EngineError; EngineError itself is never raised."""

    def test_codes_are_contiguous_and_each_has_words(self):
        """Every code from -1 to ENG_ERRNO_MIN has a name and its own eng_strerror text."""
        codes = c_error_codes()
        assert sorted(codes.values()) == list(range(min(codes.values()), 0)), codes
        words = {code: ffi.string(lib.eng_strerror(code)).decode() for code in codes.values()}
        assert all(words.values()), words
        assert len(set(words.values())) == len(words), f"two codes share their words: {words}"

    def test_every_code_maps_to_a_proper_subclass(self):
        """Every ENG_E* code maps to its own subclass of EngineError, never EngineError itself."""
        table = error_table()
        for name, code in c_error_codes().items():
            assert code in table, f"{name} ({code}) has no exception class"
            cls = table[code]
            assert issubclass(cls, EngineError) and cls is not EngineError, (name, cls)
            if name in EXPECTED_CLASSES:
                assert issubclass(cls, EXPECTED_CLASSES[name]), (name, cls)
        assert table[lib.ENG_ENOTOPEN] is not StaleIdError
        assert not issubclass(table[lib.ENG_ENOTOPEN], StaleIdError)

    def test_raise_for_every_code_raises_a_proper_subclass(self):
        """raise_for() raises a proper EngineError subclass with a message for every code."""
        table = error_table()
        for code in [*c_error_codes().values(), -999]:
            with pytest.raises(EngineError) as info:
                engine.errors.raise_for(code)
            assert type(info.value) is not EngineError and str(info.value), (code, info.value)
            if code in table:
                assert type(info.value) is table[code], (code, type(info.value))

    def test_engine_error_is_never_raised_in_the_source(self):
        """No module of the engine package raises EngineError itself."""
        offenders = []
        for path in sorted((REPO_ROOT / "engine").glob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\braise\s+EngineError\b(?!\w)", line):
                    offenders.append(f"{path.name}:{i}: {line.strip()}")
        assert not offenders, offenders

    def test_class_hierarchy(self):
        """StaleIdError is a NotOpenError and InternalError a RuntimeError, both EngineErrors.

        StaleIdError is a NotOpenError (so SlotError, IndexError, LookupError);
        InternalError is a RuntimeError; both are EngineErrors.
        """
        for base in (NotOpenError, SlotError, EngineError, IndexError, LookupError):
            assert issubclass(StaleIdError, base), base
        assert issubclass(InternalError, EngineError) and issubclass(InternalError, RuntimeError)

    def test_busy_recover_says_recovering_not_slot_none(self, make_engine, spawn):
        """recover() beside a live recoverer raises BusyError naming no slot; a dead one's is taken.

        recover() while a live process holds the recovery flag raises BusyError
        whose message names no slot; once that process is dead, recover() takes
        the flag over; forbidden: "slot None", a hang.
        """
        eng = make_engine()
        q = CTX.Queue()
        holder = spawn(hold_worker, eng.handle, [(3, 0)], q)
        pid, token, rcs = get_from(q, holder)
        assert rcs == [0] and int(eng._seg.hdr.recovering) == token
        with pytest.raises(BusyError) as info:
            eng.recover()
        assert "slot None" not in str(info.value) and "None" not in str(info.value), \
            str(info.value)
        sigkill(holder)
        report, took = timed(eng.recover)
        assert took < ANSWER_BOUND and report.removed_pids == (pid,)
        assert int(eng._seg.hdr.recovering) == 0

    @pytest.mark.parametrize("timeout", [1e10, 2.0**62, sys.float_info.max])
    def test_wait_with_huge_timeout_returns_on_change(self, make_engine, timeout):
        """wait_for_change with a huge finite timeout returns the new state on a change.

        wait_for_change with any huge finite timeout returns the new state when
        the slot changes; forbidden: a type error, an immediate timeout.
        """
        eng = make_engine()
        pos = monitoring(eng)
        other = Engine.attach(eng.handle)
        timer = threading.Timer(0.2, lambda: other.transition(pos, Trigger.PAUSE))
        try:
            timer.start()
            state, took = timed(lambda: eng.wait_for_change(pos, timeout=timeout))
        finally:
            timer.join()
            other.close()
        assert state is State.PAUSED and 0.1 < took < ANSWER_BOUND, (state, took)

    def test_raw_wait_with_int64_max_timeout_does_not_overflow(self, make_engine):
        """eng_wait_change(INT64_MAX) sleeps until the change; its deadline does not overflow."""
        eng = make_engine()
        pos = monitoring(eng)
        other = Engine.attach(eng.handle)
        out = ffi.new("int64_t *")
        timer = threading.Timer(0.2, lambda: other.transition(pos, Trigger.PAUSE))
        try:
            timer.start()
            rc, took = timed(lambda: lib.eng_wait_change(eng._seg, pos, -1, 2**63 - 1, out))
            while rc == lib.ENG_EINTR:
                rc = lib.eng_wait_change(eng._seg, pos, out[0], 2**63 - 1, out)
        finally:
            timer.join()
            other.close()
        assert rc == lib.ENG_APPLIED and took > 0.1, (rc, took)

    @pytest.mark.parametrize("price", [np.complex128(5 + 7j), 5 + 7j, np.complex64(5 + 0j),
                                       complex(5, 0)], ids=repr)
    def test_complex_price_refused(self, make_engine, price):
        """update_price with a complex number raises EngineTypeError and changes nothing.

        update_price with a complex number raises EngineTypeError and changes
        nothing; forbidden: storing its real part.
        """
        eng = make_engine()
        pos = monitoring(eng)
        before = eng.price(pos)
        with pytest.raises(EngineTypeError):
            eng.update_price(pos, price)
        with pytest.raises(EngineTypeError):
            eng.update_prices(np.array([pos]), np.array([price]))
        assert eng.price(pos) == before
