"""Reading the journal files (native/engine.h, "The journal on disk"): the
frames of a journal directory in seq order, each checked (magic, CRC-32C,
seq), and where the valid records end and why.

For ``python -m engine journal DIR`` and the tests: a streaming reader over
the codec of engine/durable/format.py, which owns the format (names,
headers, sizes, the frame check and the record's fields).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from engine._native import lib
from engine.durable import format as fmt

FRAME = fmt.FRAME_BYTES
HDR = fmt.FILE_HDR
#: the frame check and the record's fields, as format has them
check_frame = fmt.check_frame
decode = fmt.decode_record


@dataclass(frozen=True)
class Frame:
    """One valid record, as eng_journal_read returns it, and where it is."""

    path: str
    offset: int
    seq: int
    ts_ns: int
    id: int
    word: int
    kind: int
    trigger: int
    w: tuple[int, ...]
    version: int
    riders: int   # records after this one that ride on its commit (eng_jrec.riders)


@dataclass
class End:
    """Where the valid records end: ``torn`` is None at a clean end (a frame
    whose magic is 0 in the newest file), else what is wrong at ``path`` and
    ``offset`` (a torn or corrupt frame); ``last_seq`` is the last valid seq."""

    last_seq: int = 0
    path: str = ""
    offset: int = 0
    torn: str | None = None


def journal_files(path: str) -> list[tuple[int, str]]:
    """(first seq, file path) of every journal file in directory ``path``, in seq order."""
    return [(seq, os.path.join(path, name)) for seq, name in fmt.list_files(path, "journal")]


def read(path: str, since: int = 0, end: End | None = None) -> Iterator[Frame]:
    """Every valid record with seq > ``since`` in directory ``path``, in seq
    order, a commit's records all or none (as a restore keeps them: a last
    commit whose riders are not all on disk is held back and reported as a
    torn tail); stops at the first invalid frame and fills ``end`` with where
    and why (a clean end leaves ``end.torn`` None)."""
    end = end if end is not None else End()
    held: list[Frame] = []   # a commit's records until its last one is read
    for fr in _valid_frames(path, since, end):
        if fr.riders >= lib.ENG_JOURNAL_MAX_FILL:   # crafted: no commit has that many
            end.path, end.offset = fr.path, fr.offset
            end.torn = (f"the record counts {fr.riders} riders "
                        f"(at most {lib.ENG_JOURNAL_MAX_FILL - 1})")
            end.last_seq = (held[0].seq if held else fr.seq) - 1
            return
        if held or fr.riders:
            held.append(fr)
            if len(held) == 1 + held[0].riders:
                yield from held
                held = []
        else:
            yield fr
    if held:
        end.last_seq = held[0].seq - 1
        cut = (f"a commit cut short ({len(held)} of its {1 + held[0].riders} records, "
               f"from {held[0].path} offset {held[0].offset})")
        end.torn = cut if end.torn is None else f"{cut}; then {end.torn}"


def _valid_frames(path: str, since: int, end: End) -> Iterator[Frame]:
    """read()'s frames one by one, whole commits or not."""
    files = journal_files(path)
    expect = 0
    for i, (first, fpath) in enumerate(files):
        nxt = files[i + 1][0] if i + 1 < len(files) else None
        if nxt is not None and nxt <= since:
            continue
        with open(fpath, "rb") as f:
            head = f.read(HDR)
            if len(head) < HDR:
                end.path, end.offset, end.torn = fpath, 0, "file header cut short"
                return
            if fmt.header_problem(head, fmt.FILE_MAGIC) or fmt.parse_header(head)[3] != first:
                end.path, end.offset, end.torn = fpath, 0, "bad file header"
                return
            if expect and first != expect:
                end.path, end.offset, end.torn = fpath, 0, f"gap: expected seq {expect}"
                return
            seq = first
            if since >= first:   # skip whole frames up to since
                skip = min(since + 1 - first, (os.fstat(f.fileno()).st_size - HDR) // FRAME)
                f.seek(HDR + skip * FRAME)
                seq = first + skip
            while True:
                off = f.tell()
                buf = f.read(FRAME)
                if not buf.strip(b"\0"):
                    break   # the end of this file's records (zeros: never written)
                why = check_frame(buf)
                if why is None:
                    rec = decode(buf[fmt.FRAME_HDR:])
                    if rec["seq"] != seq:
                        why = f"seq {rec['seq']} where {seq} belongs"
                if why is not None:
                    end.path, end.offset, end.torn = fpath, off, why
                    return
                seq += 1
                end.last_seq, end.path, end.offset = rec["seq"], fpath, off + FRAME
                if rec["seq"] > since:
                    yield Frame(fpath, off, **rec)
            expect = seq
            if nxt is not None and nxt != seq:
                if not _has_records(files[i + 1][1]):   # reserved ahead, never written
                    return
                end.path, end.offset, end.torn = fpath, f.tell(), (
                    f"file ends at seq {seq - 1}, the next file starts at {nxt}")
                return


def _has_records(fpath: str) -> bool:
    """Whether a journal file's first frame was ever written (the writer
    reserves the next file before the current one is full)."""
    with open(fpath, "rb") as f:
        f.seek(HDR)
        return bool(f.read(FRAME).strip(b"\0"))


def valid_frame_after(path: str, end: End) -> tuple[str, int] | None:
    """Where the first valid frame after ``end``'s invalid one is (file,
    offset), or None: a valid frame after it means corruption in the middle,
    none a torn tail."""
    started = False
    for _first, fpath in journal_files(path):
        started = started or fpath == end.path
        if not started:
            continue
        with open(fpath, "rb") as f:
            data = f.read()
        off = end.offset + FRAME if fpath == end.path else HDR
        off = HDR + max(0, (off - HDR + FRAME - 1) // FRAME) * FRAME   # on a frame boundary
        for at in range(off, len(data) - FRAME + 1, FRAME):
            if check_frame(data[at:at + FRAME]) is None:
                return fpath, at
    return None
