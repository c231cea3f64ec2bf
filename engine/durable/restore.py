"""Engine.restore: a new segment from a journal directory.

The directory (its format: ``engine.durable.format``) is read and checked
whole before the segment exists: meta.json, the newest checkpoint whose
frames all check, then every journal file.  A journal file's records end at
its first frame that is not whole; what follows is a torn tail (cut at the
last valid record and reported) if nothing valid follows it, and corruption
(``RestoreError`` naming file and offset: nothing is created) if a valid
frame of the same file follows it, or the next file does not continue at
the next seq.  The records after the checkpoint's start seq, with the
checkpoint's objects before them, are reduced to the last record of each
object (numpy over the frames) and placed by C in batches into a segment
created under the name and not ready (native/restore.c): an attach meanwhile
is refused (not ready) and never sees half a restore; any failure removes
the segment again.  Restoring over an existing name is refused before
anything is read into it (the create is exclusive).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine._native import ffi, lib
from engine.durable import format as fmt
from engine.errors import RestoreError, SegmentError
from engine.spec import MachineSpec
from engine.store import check_name, shm

__all__ = ["RestoreReport", "load_directory", "reduce_records", "restore"]

#: records one C call places
BATCH = 65536

_SLOT_KINDS = (lib.ENG_JK_OPEN, lib.ENG_JK_TRANSITION, lib.ENG_JK_RELEASE)


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did.  ``records_replayed``: journal records after the
    checkpoint; ``checkpoint``: the checkpoint file used (None: none) and
    ``checkpoint_seq`` its start seq; ``last_seq``: the last restored seq
    (the journal continues at the next); ``tail_cut``: (file, byte offset)
    where a torn or corrupt tail was cut, None if every file ended cleanly;
    ``skipped_checkpoints``: newer checkpoints that failed their checks;
    ``seconds``: the restore's wall time."""

    name: str
    records_replayed: int
    checkpoint: str | None
    checkpoint_seq: int
    last_seq: int
    tail_cut: tuple[str, int] | None
    skipped_checkpoints: tuple[str, ...]
    seconds: float

    def __str__(self) -> str:
        cut = "none" if self.tail_cut is None else f"{self.tail_cut[0]} at byte {self.tail_cut[1]}"
        return (f"restored {self.name!r}: checkpoint {self.checkpoint or 'none'} "
                f"(start seq {self.checkpoint_seq}), {self.records_replayed} records replayed, "
                f"last seq {self.last_seq}, torn tail cut: {cut}, "
                f"{self.seconds:.3f} s")


@dataclass
class Loaded:
    """A journal directory, read and checked."""

    meta: dict[str, Any]
    spec: MachineSpec
    allr: np.ndarray            # JREC_DTYPE: the checkpoint's objects, then the tail
    n_ck: int                   # how many of allr are the checkpoint's
    ckpt_name: str | None
    ckpt_seq: int
    tail_src: np.ndarray        # int64: each tail record's byte offset in its file
    tail_file: np.ndarray       # int32: its file's index in files
    files: list[str]
    tail_cut: tuple[str, int] | None
    skipped: tuple[str, ...]

    @property
    def ckpt(self) -> np.ndarray:
        return self.allr[:self.n_ck]

    @property
    def tail(self) -> np.ndarray:
        """The records after ckpt_seq, in seq order."""
        return self.allr[self.n_ck:]


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise RestoreError(f"cannot read {path}: {e.strerror}", str(path), None) from None


def _frames(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The frames after the header: (frames, status per frame, bytes after
    the last whole frame)."""
    body = memoryview(data)[fmt.FILE_HDR:]
    n = len(body) // fmt.FRAME_BYTES
    frames = np.frombuffer(body, dtype=fmt.FRAME_DTYPE, count=n)
    status = np.empty(n, dtype=np.uint8)
    if n:
        rc = lib.eng_dj_check_frames(ffi.from_buffer(body), n, ffi.from_buffer(status))
        if rc:
            raise RestoreError(f"cannot check the frames of {path} (code {rc})", str(path), None)
    return frames, status, len(body) - n * fmt.FRAME_BYTES


def _check_header(data: bytes, path: Path, magic: int) -> tuple[int, int]:
    why = fmt.header_problem(data, magic)
    if why is not None:
        raise RestoreError(f"{path}: {why}", str(path), 0)
    _magic, _version, _fb, seq, frames = fmt.parse_header(data)
    return seq, frames


def _load_checkpoint(path: Path) -> tuple[np.ndarray, int]:
    """A checkpoint's objects and start seq; RestoreError if any check fails."""
    data = _read(path)
    seq, count = _check_header(data, path, fmt.CKPT_MAGIC)
    want = fmt.FILE_HDR + count * fmt.FRAME_BYTES
    if len(data) != want:
        raise RestoreError(f"{path}: {len(data)} bytes, its header says {count} frames "
                           f"({want} bytes)", str(path), min(len(data), want))
    frames, status, _ = _frames(data, path)
    bad = np.flatnonzero(status != 1)
    if len(bad):
        off = fmt.FILE_HDR + int(bad[0]) * fmt.FRAME_BYTES
        raise RestoreError(f"{path}: frame at byte {off} fails its check", str(path), off)
    return _records(frames, len(frames)), seq


def _check_meta(meta: dict[str, Any], directory: Path) -> MachineSpec:
    where = str(directory / fmt.META_NAME)
    if meta.get("format") != fmt.META_FORMAT:
        raise RestoreError(f"{where}: format {meta.get('format')!r}, this engine reads "
                           f"{fmt.META_FORMAT}", where, None)
    for key, typ in (("name", str), ("capacity", int), ("spec", str), ("options", dict)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise RestoreError(f"{where}: {key} must be a {typ.__name__}, got "
                               f"{meta.get(key)!r}", where, None)
    try:
        spec = fmt.load_spec(meta)
    except Exception as e:   # a spec that does not unpickle: the file is bad
        raise RestoreError(f"{where}: its spec does not load ({e!r})", where, None) from None
    if not isinstance(spec, MachineSpec):
        raise RestoreError(f"{where}: spec is a {type(spec).__name__}, not a MachineSpec",
                           where, None)
    return spec


def load_directory(directory: str | os.PathLike[str]) -> Loaded:
    """Read and check a journal directory (nothing is created)."""
    d = Path(directory)
    if not d.is_dir():
        raise RestoreError(f"{d} is not a directory", str(d), None)
    try:
        meta = fmt.read_meta(d)
    except (OSError, ValueError) as e:
        raise RestoreError(f"{d / fmt.META_NAME}: cannot be read ({e})",
                           str(d / fmt.META_NAME), None) from None
    spec = _check_meta(meta, d)
    journals = fmt.list_files(d, "journal")
    ckpts = fmt.list_files(d, "checkpoint")[::-1]
    ckpt = np.zeros(0, dtype=fmt.JREC_DTYPE)
    ckpt_name, ckpt_seq, skipped = None, 0, []
    for seq, entry in ckpts:
        try:
            ckpt, got = _load_checkpoint(d / entry)
        except RestoreError:
            skipped.append(entry)
            continue
        if got != seq:
            skipped.append(entry)
            continue
        ckpt_name, ckpt_seq = entry, seq
        break
    # every journal file: its whole records, where they stop, and what follows
    parts: list[tuple[int, str, np.ndarray, int]] = []   # first, name, frames, whole ones
    files: list[str] = []
    tail_cut: tuple[str, int] | None = None
    prev_last = None   # the last seq of the file before
    prev_cut: tuple[str, int] | None = None
    for first, entry in journals:
        path = d / entry
        data = _read(path)
        seq, _ = _check_header(data, path, fmt.FILE_MAGIC)
        if seq != first:
            raise RestoreError(f"{path}: header seq {seq}, its name says {first}", str(path), 0)
        frames, status, rest = _frames(data, path)
        ok = status == 1
        stop = len(status) if ok.all() else int(np.argmin(ok))
        if stop < len(status) and (status[stop:] == 1).any():
            bad = fmt.FILE_HDR + stop * fmt.FRAME_BYTES
            raise RestoreError(f"{path}: corrupt frame at byte {bad} with valid frames after "
                               "it (corruption in the middle: nothing restored)", str(path), bad)
        seqs = frames["rec"]["seq"][:stop]
        want = np.arange(first, first + stop, dtype=np.uint64)
        wrong = np.flatnonzero(seqs != want)
        if len(wrong):
            bad = fmt.FILE_HDR + int(wrong[0]) * fmt.FRAME_BYTES
            raise RestoreError(f"{path}: frame at byte {bad} holds seq "
                               f"{int(seqs[wrong[0]])}, expected {int(want[wrong[0]])}",
                               str(path), bad)
        end = fmt.FILE_HDR + stop * fmt.FRAME_BYTES
        cut = (str(path), end) if np.frombuffer(data, np.uint8, offset=end).any() else None
        # a gap or an overlap matters where the restore needs the records
        if prev_last is not None and stop and first != prev_last + 1 and \
                max(first - 1, prev_last) > ckpt_seq:
            where = prev_cut or (files[-1], -1)
            raise RestoreError(f"{path}: starts at seq {first}, the file before ends at seq "
                               f"{prev_last} (records missing or repeated in the middle: nothing "
                               "restored)",
                               where[0], where[1] if where[1] >= 0 else None)
        if stop:
            files.append(str(path))
            parts.append((first, str(path), frames, stop))
            prev_last = first + stop - 1
            prev_cut = cut
            tail_cut = cut   # only the last file's cut stands (an earlier one was continued)
        elif cut is not None:
            tail_cut = cut
        del rest
    # the records after the checkpoint, copied once (bytes) behind the checkpoint's
    ranges = [(i, frames, max(0, ckpt_seq + 1 - first), stop)
              for i, (first, _name, frames, stop) in enumerate(parts)
              if max(0, ckpt_seq + 1 - first) < stop]
    n_ck = len(ckpt)
    allr = np.empty(n_ck + sum(hi - lo for _, _, lo, hi in ranges), dtype=fmt.JREC_DTYPE)
    raw = allr.view(np.uint8).reshape(len(allr), fmt.JREC_SIZE)
    raw[:n_ck] = ckpt.view(np.uint8).reshape(n_ck, fmt.JREC_SIZE)
    at = n_ck
    srcs, fidx = [], []
    for i, frames, lo, hi in ranges:
        fr = frames.view(np.uint8).reshape(len(frames), fmt.FRAME_BYTES)
        raw[at:at + hi - lo] = fr[lo:hi, fmt.FRAME_HDR:]
        at += hi - lo
        srcs.append(fmt.FILE_HDR + np.arange(lo, hi, dtype=np.int64) * fmt.FRAME_BYTES)
        fidx.append(np.full(hi - lo, i, dtype=np.int32))
    del parts, ranges
    tail = allr[n_ck:]
    tail_src = np.concatenate(srcs) if srcs else np.zeros(0, dtype=np.int64)
    tail_file = np.concatenate(fidx) if fidx else np.zeros(0, dtype=np.int32)
    # records missing before the tail, checked before a cut commit could empty it
    first_needed = ckpt_seq + 1
    if len(tail) and int(tail["seq"][0]) != first_needed:
        raise RestoreError(f"{files[int(tail_file[0])]}: the journal resumes at seq "
                           f"{int(tail['seq'][0])}, the restore needs seq {first_needed} "
                           f"({'checkpoint ' + ckpt_name if ckpt_name else 'no checkpoint'}): "
                           "records missing", files[int(tail_file[0])], int(tail_src[0]))
    split = _split_commit(tail, lambda j: (files[int(tail_file[j])], int(tail_src[j])))
    if split is not None:   # the last commit lost riders: cut whole, as a torn tail
        tail_cut = (files[int(tail_file[split])], int(tail_src[split]))
        allr, tail_src, tail_file = allr[:n_ck + split], tail_src[:split], tail_file[:split]
        tail = allr[n_ck:]
    return Loaded(meta, spec, allr, n_ck, ckpt_name, ckpt_seq, tail_src, tail_file, files,
                  tail_cut, tuple(skipped))


def _split_commit(tail: np.ndarray, where: Any) -> int | None:
    """A commit's records are all or none.  The slot's record of a keyed open
    or a booked change counts the records that ride on its commit (the key's,
    the account's: ``riders``, native/keys.c), each right after it with the
    same latch word.  A power cut can keep the slot's record and lose riders
    after it (the writer's batches and files end anywhere, past what any
    flush() reported): the index of that last commit's first record, to cut
    it whole, or None.  Riders missing or foreign before the end are
    corruption (RestoreError naming the file and offset, via ``where``)."""
    riders = tail["riders"].astype(np.int64)
    heads = np.flatnonzero(riders)
    if not len(heads):
        return None
    over = heads[riders[heads] >= lib.ENG_JOURNAL_MAX_FILL]
    if len(over):
        path, off = where(int(over[0]))
        raise RestoreError(f"{path}: the record at byte {off} counts {int(riders[over[0]])} "
                           f"riders (at most {lib.ENG_JOURNAL_MAX_FILL - 1})", path, off)
    n, latch = len(tail), tail["latch"]
    for k in range(1, lib.ENG_JOURNAL_MAX_FILL):   # the k-th rider of each commit read
        has = heads[(riders[heads] >= k) & (heads + k < n)]
        bad = has[(latch[has + k] != latch[has]) | (riders[has + k] != 0)]
        if len(bad):
            path, off = where(int(bad[0]) + k)
            raise RestoreError(f"{path}: the record at byte {off} should ride on the commit "
                               f"of the record before it and does not (corruption in the "
                               "middle: nothing restored)", path, off)
    last = int(heads[-1])
    return last if last + int(riders[last]) >= n else None


def _records(frames: np.ndarray, stop: int) -> np.ndarray:
    """The records of the first stop frames, copied out as JREC_DTYPE (bytes,
    not fields: a nested field's copy goes field by field)."""
    raw = frames.view(np.uint8).reshape(len(frames), fmt.FRAME_BYTES)[:stop, fmt.FRAME_HDR:]
    return np.ascontiguousarray(raw).view(fmt.JREC_DTYPE).reshape(stop)


def _last_per(keys: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of each key (keys in order), sorted."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    rev = keys[::-1]
    _, first = np.unique(rev, return_index=True)
    return np.sort(len(keys) - 1 - first)


def reduce_records(allr: np.ndarray) -> dict[str, np.ndarray]:
    """The last record of each object in allr (the checkpoint's objects
    first, then the tail in seq order).  Returns index arrays into allr per
    kind: slots, prices, keys, accounts, halt (at most one), bad (kinds the
    journal has not)."""
    kind = allr["kind"]
    slot = allr["id"] & np.uint64(lib.ENG_ID_SLOT_MASK)
    out: dict[str, np.ndarray] = {}
    is_slot = np.isin(kind, np.array(_SLOT_KINDS, dtype=np.uint32))
    idx = np.flatnonzero(is_slot)
    out["slots"] = idx[_last_per(slot[idx])]
    idx = np.flatnonzero(kind == lib.ENG_JK_PRICE)
    out["prices"] = idx[_last_per(slot[idx])]
    idx = np.flatnonzero(kind == lib.ENG_JK_KEY)
    kk = allr["id"][idx] * np.uint64(8) + allr["word"][idx] % np.uint64(8)
    out["keys"] = idx[_last_per(kk)] if len(idx) and int(allr["id"][idx].max()) < (1 << 60) \
        else idx   # an id too large for the key product: C refuses it (ENG_ECORRUPT)
    idx = np.flatnonzero(kind == lib.ENG_JK_ACCOUNT)
    out["accounts"] = idx[_last_per(slot[idx])]
    idx = np.flatnonzero(kind == lib.ENG_JK_HALT)
    out["halt"] = idx[-1:]
    other = np.flatnonzero(kind > lib.ENG_JK_PRICE)
    out["bad"] = other
    return out


def _options(meta: dict[str, Any]) -> tuple[int, int, int, int]:
    """(keys_per_position, max_accounts, journal_records, journal_flags) of
    meta's options, checked as Engine.create checks them."""
    opts = meta["options"]
    from engine.core import _DEFAULT_ACCOUNTS, _DEFAULT_KEYS, _journal_args
    kpp = opts.get("keys_per_position", _DEFAULT_KEYS)
    acc = opts.get("max_accounts", _DEFAULT_ACCOUNTS)
    journal = opts.get("journal", False)
    durable = isinstance(journal, str)   # a journal directory: written on after the restore
    records = opts.get("journal_records", lib.ENG_JOURNAL_DEFAULT_RECORDS)
    n_records, flags = _journal_args(True if durable else journal, records,
                                     bool(opts.get("journal_prices", False)))
    if durable:
        flags |= lib.ENG_JOURNAL_DURABLE
    for what, v, hi in (("keys_per_position", kpp, lib.ENG_MAX_KEYS_PER_POSITION),
                        ("max_accounts", acc, lib.ENG_MAX_ACCOUNTS)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
            raise RestoreError(f"meta.json: options.{what} must be an int in [0, {hi}], "
                               f"got {v!r}", None, None)
    return kpp, acc, n_records, flags


def _place(seg: Any, call: Any, recs: np.ndarray, idx: np.ndarray | None, where: Any,
           what: str) -> None:
    """Place recs[idx] (idx None: all of recs) in batches through call, with
    no copy of the records; a refusal names the record's file and offset
    (where(i) for the index into recs)."""
    bad = ffi.new("uint64_t *")
    recs = np.ascontiguousarray(recs)
    base = ffi.cast("eng_jrec *", ffi.from_buffer(recs)) if len(recs) else ffi.NULL
    n = len(recs) if idx is None else len(idx)
    picks = None if idx is None else np.ascontiguousarray(idx, dtype=np.uint64)
    for start in range(0, n, BATCH):
        if picks is None:
            rc = call(seg, base + start, len(recs) - start, ffi.NULL, min(BATCH, n - start), bad)
        else:
            chunk = picks[start:start + BATCH]
            rc = call(seg, base, len(recs), ffi.cast("uint64_t *", ffi.from_buffer(chunk)),
                      len(chunk), bad)
        if rc:
            i = start + int(bad[0])
            path, off = where(i if idx is None else int(idx[i]))
            raise RestoreError(f"{path}: the {what} record at byte {off} is refused "
                               f"({ffi.string(lib.eng_strerror(rc)).decode()}, code {rc})",
                               path, off)


def restore(cls: Any, directory: str | os.PathLike[str], name: str | None = None) -> Any:
    """Engine.restore (see there)."""
    t0 = time.perf_counter()
    _refuse_a_live_directory(directory)
    ld = load_directory(directory)
    spec = ld.spec
    meta = ld.meta
    name = check_name(name if name is not None else meta["name"])
    capacity = meta["capacity"]
    if not 1 <= capacity <= lib.ENG_MAX_CAPACITY:
        raise RestoreError(f"meta.json: capacity must be in [1, {lib.ENG_MAX_CAPACITY}], "
                           f"got {capacity}", None, None)
    kpp, max_accounts, n_records, flags = _options(meta)
    n_ck = len(ld.ckpt)
    allr = ld.allr
    red = reduce_records(allr)

    def where(i: int) -> tuple[str, int]:
        if i < n_ck:
            return (str(Path(directory) / (ld.ckpt_name or "?")),
                    fmt.FILE_HDR + i * fmt.FRAME_BYTES)
        j = i - n_ck
        return ld.files[int(ld.tail_file[j])], int(ld.tail_src[j])

    if len(red["bad"]):
        path, off = where(int(red["bad"][0]))
        raise RestoreError(f"{path}: the record at byte {off} has kind "
                           f"{int(allr['kind'][red['bad'][0]])} (not a kind of the journal)",
                           path, off)
    # accounts: their last records (a booked change journals its account's books
    # with it, as a rider: see _split_commit)
    acct_idx = red["accounts"]
    acct_recs = allr[acct_idx].copy()
    last_seq = max(ld.ckpt_seq, int(ld.tail["seq"][-1]) if len(ld.tail) else 0)
    last_ts = int(ld.tail["ts_ns"][-1]) if len(ld.tail) else 0
    halted = int(allr["word"][red["halt"][0]]) if len(red["halt"]) else 0
    if halted > 1:
        path, off = where(int(red["halt"][0]))
        raise RestoreError(f"{path}: the halt record at byte {off} has flag {halted} "
                           "(0 or 1)", path, off)
    size = lib.eng_segment_size_journal(capacity, spec.record.n_words, kpp, max_accounts,
                                        n_records)
    mm, ident = shm.create_mapped(name, size)   # exclusive: an existing name is refused here
    try:
        seg = ffi.new("eng_seg *")
        with ffi.from_buffer(mm) as buf:
            rc = lib.eng_restore_format(seg, buf, size, capacity, spec.table_bytes(),
                                        len(spec.states), len(spec.triggers),
                                        spec.state_index[spec.initial], spec.closed_mask,
                                        spec.fingerprint, os.getpid(), spec.c_layout(kpp),
                                        max_accounts, n_records, flags)
            if rc:
                raise RestoreError(f"meta.json: the segment cannot be formatted for it "
                                   f"(code {rc})", None, None)

            _place(seg, lib.eng_restore_slots, allr, red["slots"], where, "slot")
            _place(seg, lib.eng_restore_prices, allr, red["prices"], where, "price")
            _place(seg, lib.eng_restore_keys, allr, red["keys"], where, "key")
            _place(seg, lib.eng_restore_accounts, acct_recs, None,
                   lambda i: where(int(acct_idx[i])), "account")
            if n_records and len(ld.tail):
                ring = np.ascontiguousarray(ld.tail[-(n_records - 1):])
                rc = lib.eng_restore_ring(seg, ffi.cast("eng_jrec *", ffi.from_buffer(ring)),
                                          len(ring))
                if rc:
                    raise RestoreError(f"the journal's last records do not go back into the "
                                       f"ring (code {rc})", None, None)
            bad = ffi.new("uint64_t *")
            rc = lib.eng_restore_finish(seg, halted, last_seq + 1 if n_records else 0,
                                        last_ts, bad)
            if rc:
                raise RestoreError(f"slot {int(bad[0])}: an open position booked on an "
                                   f"account that is not open (code {rc})", None, None)
    except BaseException:
        mm.close()
        with contextlib.suppress(OSError):   # only the segment this restore created
            st = os.stat(shm.path_of(name))
            if (st.st_dev, st.st_ino) == ident:
                shm.unlink(name)
        raise
    report = RestoreReport(name, len(ld.tail), ld.ckpt_name, ld.ckpt_seq, last_seq,
                           ld.tail_cut, ld.skipped, 0.0)
    eng = cls._made(name, spec, None, lambda eng: shm.attach_mapped(
        eng, name, (mm, ident), spec, check_spec=True))
    if flags & lib.ENG_JOURNAL_DURABLE:
        try:
            _continue_files(eng, os.path.abspath(directory), ld, meta, last_seq)
        except BaseException:
            eng.close()
            shm.unlink(name)
            raise
    eng.restore_report = RestoreReport(**{**report.__dict__,
                                          "seconds": time.perf_counter() - t0})
    return eng


def _refuse_a_live_directory(directory: str | os.PathLike[str]) -> None:
    """SegmentError if an attached Engine writes the directory (it holds its
    lock, see Writer.hold): read mid-write, its files could show a frame
    written before an earlier one, and the restored engine would write into
    the same files.  A copy of the directory restores."""
    from engine.durable.writer import live_holders
    if live_holders(os.fspath(directory)):
        try:
            owner = repr(fmt.read_meta(directory).get("name"))
        except (OSError, ValueError):
            owner = "(meta.json unreadable)"
        raise SegmentError(f"{os.fspath(directory)!r} is written by live engine {owner} (its "
                           f"processes hold {os.path.join(os.fspath(directory), 'lock')}): "
                           f"restore a copy of the directory, or close that engine first")


def _sync_read_files(directory: str, ld: Loaded) -> None:
    """fsync what the restore read (its journal files, its checkpoint,
    meta.json) and the directory: the restored engine's durable_seq starts at
    the last seq read, and the files may be only in the page cache (a copy,
    or the writer killed before its fdatasync); a power cut after the
    restore must not lose what durable_seq reports.  Cheap for files
    already on disk."""
    paths = [*ld.files, os.path.join(directory, fmt.META_NAME)]
    if ld.ckpt_name:
        paths.append(os.path.join(directory, ld.ckpt_name))
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _continue_files(eng: Any, directory: str, ld: Loaded, meta: dict[str, Any],
                    last_seq: int) -> None:
    """A restored engine created with journal=DIR journals on in ``directory``:
    the bytes after a cut tail are zeroed (the next frames go there), meta.json
    names the restored engine, and the writer continues after ``last_seq``
    (every record up to it is in the files it was read from)."""
    from engine.durable.writer import durable_args, write_meta
    opts = meta["options"]
    sync_ns, ckpt_records, ckpt_ns = durable_args(
        opts.get("journal_sync_ms", lib.ENG_DJ_SYNC_NS / 1e6),
        opts.get("checkpoint_records", lib.ENG_DJ_CKPT_RECORDS),
        opts.get("checkpoint_s", lib.ENG_DJ_CKPT_NS / 1e9))
    if ld.tail_cut is not None:   # zeros from the cut, in its file and every later one
        cut_path, cut_off = ld.tail_cut
        later = ld.files[ld.files.index(cut_path) + 1:] if cut_path in ld.files else []
        for path, off in ((cut_path, cut_off), *((p, fmt.FILE_HDR) for p in later)):
            fd = os.open(path, os.O_WRONLY)
            try:
                size = os.fstat(fd).st_size
                zeros = bytes(1 << 20)
                while off < size:
                    off += os.pwrite(fd, zeros[: min(len(zeros), size - off)], off)
                os.fsync(fd)
            finally:
                os.close(fd)
    if eng.name != meta["name"] or opts.get("journal") != directory:
        write_meta(directory, eng.name, eng.capacity, eng.spec, {**opts, "journal": directory})
    if eng._durable is None:
        raise RestoreError(f"{directory}: the restored segment has no journal writer",
                           directory, None)
    _sync_read_files(directory, ld)   # before durable_seq says last_seq
    for rc in (lib.eng_durable_continue(eng.seg, last_seq),
               lib.eng_durable_setup(eng.seg, directory.encode(), sync_ns,
                                     lib.ENG_DJ_FILE_RECORDS, ckpt_records, ckpt_ns)):
        if rc:
            raise RestoreError(f"{directory}: the journal cannot go on in it "
                               f"({ffi.string(lib.eng_strerror(rc)).decode()}, code {rc})",
                               directory, None)
    eng._durable.hold(directory)
    eng._durable.flush(5.0)   # the next file reserved: a full disk fails here
