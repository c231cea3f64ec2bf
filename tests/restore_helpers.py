"""Writers of a journal directory for the restore tests (the format of
engine.durable.format): the ring of a live engine as journal files, and a
checkpoint read from its segment.  Stand-ins for durable's writer, in the
exact format; and what "everything equal" compares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from engine import Engine
from engine._native import ffi, lib
from engine.durable import format as fmt


def ring_records(eng: Engine, after: int = 0) -> np.ndarray:
    """The journal records of eng with seq > after, as JREC_DTYPE (the ring
    must still hold them)."""
    out: list[np.ndarray] = []
    buf = ffi.new("eng_jrec[]", 4096)
    n = ffi.new("uint32_t *")
    resume = ffi.new("uint64_t *")
    while True:
        rc = lib.eng_journal_read(eng.seg, after, buf, 4096, n, resume)
        assert rc == 0, rc
        if not n[0]:
            break
        arr = np.frombuffer(ffi.buffer(buf, n[0] * fmt.JREC_SIZE), dtype=fmt.JREC_DTYPE).copy()
        out.append(arr)
        after = int(arr["seq"][-1])
    return np.concatenate(out) if out else np.zeros(0, dtype=fmt.JREC_DTYPE)


def write_journal(directory: str | os.PathLike[str], recs: np.ndarray, per_file: int = 0,
                  spare_frames: int = 4) -> list[Path]:
    """recs as journal files of per_file records each (0: one file), each
    preallocated with spare_frames zero frames after its records."""
    paths = []
    step = per_file or max(1, len(recs))
    for i in range(0, max(1, len(recs)), step):
        chunk = recs[i:i + step]
        if not len(chunk):
            break
        size = fmt.FILE_HDR + (len(chunk) + spare_frames) * fmt.FRAME_BYTES
        paths.append(fmt.write_journal_file(directory, int(chunk["seq"][0]), chunk, size))
    return paths


def _u64(mm: Any, off: int) -> int:
    return int.from_bytes(mm[off:off + 8], "little")


def checkpoint_records(eng: Engine) -> tuple[int, np.ndarray]:
    """(start seq, the objects) of eng as a checkpoint records them, read
    from its segment at a quiescent point."""
    start = eng.journal_seq
    seg, mm = eng.seg, eng._mm
    assert mm is not None
    base = int(ffi.cast("uintptr_t", seg.base))

    def off(p: Any) -> int:
        return int(ffi.cast("uintptr_t", p)) - base
    slots, ss, rs, nw = off(seg.slots), seg.slot_size, seg.rec_size, seg.n_words
    so = {f: int(ffi.offsetof("eng_slot", f)) for f in ("word", "pword", "opening", "price")}
    recs: list[tuple[Any, ...]] = []
    w = np.zeros(lib.ENG_MAX_FIELD_WORDS, dtype=np.uint64)
    for i in range(seg.capacity):
        s0 = slots + i * ss
        opening = int.from_bytes(mm[s0 + so["opening"]:s0 + so["opening"] + 4], "little")
        if not opening:
            continue
        word = _u64(mm, s0 + so["word"])
        c0 = s0 + lib.ENG_SLOT_HEAD + ((word >> 18) & 1) * rs
        version, cause = _u64(mm, c0 + 8), _u64(mm, c0 + 16)
        w[:] = 0
        w[:nw] = np.frombuffer(mm[c0 + 24:c0 + 24 + 8 * nw], dtype=np.uint64)
        pid = (opening << lib.ENG_ID_SLOT_BITS) | i
        st = word & lib.ENG_SW_STATE_MASK
        kind = lib.ENG_JK_TRANSITION if st else lib.ENG_JK_RELEASE
        recs.append((0, 0, 0, pid, word, kind, cause if st else 0, w.copy(), version))
        if st:
            pw = _u64(mm, s0 + so["pword"])
            q = pw >> lib.ENG_PW_SEQ_SHIFT
            p0 = s0 + so["price"] + (q & 1) * 32
            pw_words = np.zeros(lib.ENG_MAX_FIELD_WORDS, dtype=np.uint64)
            pw_words[:4] = np.frombuffer(mm[p0:p0 + 32], dtype=np.uint64)
            recs.append((0, 0, 0, pid, q << lib.ENG_PW_SEQ_SHIFT, lib.ENG_JK_PRICE, 0,
                         pw_words, q))
    kr0, kpp = off(seg.keyrecs), seg.kpp
    for i in range(seg.capacity * kpp):
        k0 = kr0 + i * 64
        tag = _u64(mm, k0)
        if tag & 0xFF != lib.ENG_KR_HELD:
            continue
        length = int.from_bytes(mm[k0 + 8:k0 + 10], "little")
        kw = np.zeros(lib.ENG_MAX_FIELD_WORDS, dtype=np.uint64)
        kw[:6] = np.frombuffer(mm[k0 + 16:k0 + 64], dtype=np.uint64)
        recs.append((0, 0, 0, tag >> 8, i % kpp, lib.ENG_JK_KEY, 0, kw, length))
    a0, asz = off(seg.accounts), ffi.sizeof("eng_account")
    for i in range(seg.max_accounts):
        b = a0 + i * asz
        aw = _u64(mm, b)
        v = aw >> lib.ENG_AW_VERSION_SHIFT
        if not v:
            continue
        books = b + 64 + (v & 1) * 128
        aw_words = np.zeros(lib.ENG_MAX_FIELD_WORDS, dtype=np.uint64)
        aw_words[:16] = np.frombuffer(mm[books:books + 128], dtype=np.uint64)
        aw_words[16:22] = np.frombuffer(mm[b + 16:b + 64], dtype=np.uint64)
        aw_words[22] = int.from_bytes(mm[b + 8:b + 12], "little")
        opening = int(aw_words[3] & 0xFFFFFFFF)
        recs.append((0, 0, 0, (opening << lib.ENG_ID_SLOT_BITS) | i, v << 24,
                     lib.ENG_JK_ACCOUNT, 0, aw_words, v))
    recs.append((0, 0, 0, 0, int(eng.seg.hdr.halted), lib.ENG_JK_HALT, 0,
                 np.zeros(lib.ENG_MAX_FIELD_WORDS, dtype=np.uint64), 0))
    arr = np.zeros(len(recs), dtype=fmt.JREC_DTYPE)
    for j, r in enumerate(recs):
        arr[j] = (*r, 0)   # riders: 0 (a checkpoint's objects stand alone)
    return start, arr


def write_directory(directory: str | os.PathLike[str], eng: Engine, *,
                    checkpoint: bool = False, per_file: int = 0,
                    ckpt: tuple[int, np.ndarray] | None = None) -> list[Path]:
    """meta.json, the ring as journal files and (checkpoint=True, or ckpt
    given) a checkpoint of eng; returns the journal files."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fmt.write_meta(directory, eng)
    if checkpoint and ckpt is None:
        ckpt = checkpoint_records(eng)
    if ckpt is not None:
        fmt.write_checkpoint(directory, ckpt[0], ckpt[1])
    return write_journal(directory, ring_records(eng), per_file)


_SKIP_ROW = {"transitions", "locked"}
_SKIP_ACCT = {"seal", "seal_slot", "seal_word", "latched"}


def state_of(eng: Engine, prices: bool = True) -> dict[str, Any]:
    """Everything a restore must give back, comparable with ==: the open
    positions (ids, states, generations, records, keys; prices when
    ``prices``), the accounts with their keys, the halt flag."""
    snap = eng.snapshot()
    skip = _SKIP_ROW | (set() if prices else {"price", "price_ts_ns", "pnl_pct", "pnl_usd",
                                                "price_version"})
    cols = [c for c in snap.dtype.names if c not in skip]
    rows = sorted((tuple(r[c].item() for c in cols), eng.keys(int(r["id"]))) for r in snap)
    acc = eng.accounts()
    acols = [c for c in acc.dtype.names if c not in _SKIP_ACCT]
    accts = sorted(tuple(np.asarray(r[c]).tolist() for c in acols) for r in acc)
    return {"rows": rows, "accounts": accts, "halted": int(eng.seg.hdr.halted)}


def whole_commits(riders: Any, n: int) -> int:
    """How many of the first ``n`` records (``riders``: their eng_jrec.riders)
    a restore keeps: n, or the first record of a commit whose riders run past
    n (a commit is restored whole or not at all)."""
    for i in range(n):
        if riders[i] and i + int(riders[i]) >= n:
            return i
    return n
