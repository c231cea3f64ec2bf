"""Links: the compact log of applied commits.

A worker appends three uint64 per commit on its hot path (cheap Python
appends) and packs them, a buffer at a time, into two:

  word 0   63        40 39                         0
          | slot (24)  | time since run start (40) |    time unit: 1024 ns
  word 1   63     48 47      32 31     16 15      0
          | new gen  | new state| old gen | old state|

The state and generation fields come from the C state word layout
(lib.ENG_SW_*); the lock, error and owner bits are not kept.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Sequence

import numpy as np

from engine._native import lib
from engine.core import Engine

LINK_DTYPE = np.dtype([("slot", "<u4"), ("t", "<u8"), ("old_state", "<u2"), ("old_gen", "<u2"),
                       ("new_state", "<u2"), ("new_gen", "<u2")])
_T_BITS = 40
_T_SHIFT = 10               # ns -> units of 1024 ns
_SLOT_SHIFT = 40
_GEN_MOD = lib.ENG_SW_GEN_MASK + 1
_FLUSH_WORDS = 3 * 65536    # raw words buffered before a pack-and-write
#: the ``drop-link`` test fault (``mix.LINK_FAULTS``): the number of the
#: applied commit each log leaves out (0: none), set by the runner for its workers
DROP_LINK_ENV = "ENGINE_STRESS_DROP_LINK"


def encode_links(raw: np.ndarray) -> np.ndarray:
    """Pack raw ``(n, 3)`` rows ``[slot << 40 | t, old_word, new_word]`` into ``(n, 2)``."""
    raw = np.asarray(raw, dtype=np.uint64).reshape(-1, 3)
    sm, gm = np.uint64(lib.ENG_SW_STATE_MASK), np.uint64(lib.ENG_SW_GEN_MASK)
    gs = np.uint64(lib.ENG_SW_GEN_SHIFT)
    old, new = raw[:, 1], raw[:, 2]
    packed = ((old & sm) | (((old >> gs) & gm) << np.uint64(16))
              | ((new & sm) << np.uint64(32)) | (((new >> gs) & gm) << np.uint64(48)))
    return np.stack([raw[:, 0], packed], axis=1)


def decode_links(packed: np.ndarray) -> np.ndarray:
    """Unpack ``(n, 2)`` words (see ``encode_links``) into a ``LINK_DTYPE`` array."""
    packed = np.asarray(packed, dtype=np.uint64).reshape(-1, 2)
    a, b = packed[:, 0], packed[:, 1]
    out = np.empty(len(packed), dtype=LINK_DTYPE)
    out["slot"] = a >> np.uint64(_SLOT_SHIFT)
    out["t"] = a & np.uint64((1 << _T_BITS) - 1)
    for i, name in enumerate(("old_state", "old_gen", "new_state", "new_gen")):
        out[name] = (b >> np.uint64(16 * i)) & np.uint64(0xFFFF)
    return out


def links_from_words(slots: Sequence[int], old_words: Sequence[int], new_words: Sequence[int],
                     times: Sequence[int] | None = None) -> np.ndarray:
    """A ``LINK_DTYPE`` array from raw state words (times default to 0, 1, 2, ...)."""
    n = len(slots)
    t = np.arange(n, dtype=np.uint64) if times is None else np.asarray(times, dtype=np.uint64)
    raw = np.empty((n, 3), dtype=np.uint64)
    raw[:, 0] = (np.asarray(slots, dtype=np.uint64) << np.uint64(_SLOT_SHIFT)) | t
    raw[:, 1] = np.asarray(old_words, dtype=np.uint64)
    raw[:, 2] = np.asarray(new_words, dtype=np.uint64)
    return decode_links(encode_links(raw))


class LinkLog:
    """The applied commits of one Engine, appended to a file 16 bytes each."""

    def __init__(self, eng: Engine, path: str, base_ns: int) -> None:
        self._seg = eng.seg   # last_old_word / last_new_word: C's eng_seg, or the RedisStore
        self._base_ns = base_ns
        self._file = open(path, "ab")   # noqa: SIM115 (closed by close())
        self._buf = array("Q")
        self.count = 0
        self._drop = int(os.environ.get(DROP_LINK_ENV, "0") or 0)

    def record(self, slot: int) -> None:
        """Log the commit this Engine just applied on ``slot`` (call right after APPLIED)."""
        if self._drop:
            self._drop -= 1
            if not self._drop:
                return      # the test fault: this commit goes unlogged
        t = time.monotonic_ns()
        seg = self._seg
        buf = self._buf
        buf.append((slot << _SLOT_SHIFT) | ((t - self._base_ns) >> _T_SHIFT))
        buf.append(seg.last_old_word)
        buf.append(seg.last_new_word)
        self.count += 1
        if len(buf) >= _FLUSH_WORDS:
            self.flush()

    def flush(self) -> None:
        """Pack the buffered links and append them to the file."""
        if self._buf:
            encode_links(np.frombuffer(self._buf, dtype=np.uint64)).tofile(self._file)
            self._buf = array("Q")
        self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
