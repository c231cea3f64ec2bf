"""The journal on disk: the one Python source of its format.

The numbers are native/engine.h's ("The journal on disk"), read through
``lib.ENG_DJ_*``; the record is ``eng_jrec`` as ``eng_journal_read`` returns
it.  A journal directory holds ``meta.json``, ``journal-<seq>.log`` files
(a header, then frames back to back; the first frame whose magic is 0 ends
the records) and ``checkpoint-<seq>.ckpt`` files (a header, then one frame
per object).  A frame: u32 magic, u32 CRC-32C of the record, the record.

This module encodes and decodes files, frames and meta.json; the restore
(``engine.durable.restore``), the frame reader (``engine.durable.frames``)
and the writer (durable) use it, and no other module spells a size, an
offset or a magic of the format.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from engine._native import ffi, lib

__all__ = ["CKPT_MAGIC", "FILE_HDR", "FILE_MAGIC", "FORMAT", "FRAME_BYTES", "FRAME_DTYPE",
           "FRAME_HDR", "FRAME_MAGIC", "JREC_DTYPE", "JREC_SIZE", "META_FORMAT", "META_NAME",
           "check_frame", "checkpoint_name", "crc32c", "decode_record", "encode_checkpoint",
           "encode_frames", "encode_journal_file", "header_problem", "journal_name",
           "list_files", "parse_header", "read_meta", "seal_frames", "write_checkpoint",
           "write_journal_file", "write_meta"]

FORMAT: int = lib.ENG_DJ_FORMAT
FILE_MAGIC: int = lib.ENG_DJ_FILE_MAGIC
CKPT_MAGIC: int = lib.ENG_DJ_CKPT_MAGIC
FRAME_MAGIC: int = lib.ENG_DJ_FRAME_MAGIC
FILE_HDR: int = lib.ENG_DJ_FILE_HDR
FRAME_BYTES: int = lib.ENG_DJ_FRAME_BYTES
JREC_SIZE: int = lib.ENG_JREC_SIZE
#: a frame's bytes before its record: u32 magic, u32 CRC-32C
FRAME_HDR: int = FRAME_BYTES - JREC_SIZE
META_NAME = "meta.json"
#: meta.json's "format"
META_FORMAT = 1

_W = lib.ENG_MAX_FIELD_WORDS


def _field(name: str) -> int:
    return int(ffi.offsetof("eng_jrec", name))


#: one eng_jrec, field by field at the C offsets
JREC_DTYPE = np.dtype({
    "names": ["seq", "latch", "ts_ns", "id", "word", "kind", "trigger", "w", "version",
              "riders"],
    "formats": ["<u8", "<u8", "<i8", "<u8", "<u8", "<u4", "<u4", ("<u8", (_W,)), "<u8", "<u4"],
    "offsets": [_field(n) for n in ("seq", "latch", "ts_ns", "id", "word", "kind", "trigger",
                                    "w", "version", "riders")],
    "itemsize": JREC_SIZE})
#: one frame: magic, CRC-32C of the record, the record
FRAME_DTYPE = np.dtype({"names": ["magic", "crc", "rec"],
                        "formats": ["<u4", "<u4", JREC_DTYPE],
                        "offsets": [0, 4, FRAME_HDR], "itemsize": FRAME_BYTES})
assert ffi.sizeof("eng_jrec") == JREC_SIZE and 2 * np.dtype("<u4").itemsize == FRAME_HDR

#: a file's header: u32 magic, u32 format, u32 frame bytes, u32 0, u64 seq,
#: (a checkpoint:) u64 frames; zeros to FILE_HDR bytes
_HDR = struct.Struct("<IIIIQQ")


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, crc: int = 0) -> int:
    """The CRC-32C (Castagnoli) of ``data`` (bytes, or a contiguous uint8
    array), continuing ``crc``."""
    n = data.nbytes if isinstance(data, np.ndarray) else len(data)
    return int(lib.eng_dj_crc32c(crc, ffi.from_buffer(data), n))


def journal_name(first_seq: int) -> str:
    """A journal file's name: the seq of its first record, 20 digits."""
    return f"journal-{first_seq:020d}.log"


def checkpoint_name(start_seq: int) -> str:
    """A checkpoint's name: its start seq, 20 digits."""
    return f"checkpoint-{start_seq:020d}.ckpt"


def list_files(directory: str | os.PathLike[str], kind: str) -> list[tuple[int, str]]:
    """(seq, file name) of every file of ``kind`` ("journal" | "checkpoint")
    in ``directory``, in seq order."""
    return sorted((parsed[1], name) for name in os.listdir(directory)
                  if (parsed := parse_name(name)) is not None and parsed[0] == kind)


def parse_name(name: str) -> tuple[str, int] | None:
    """("journal" | "checkpoint", seq) for a file of the format, else None."""
    for kind, pre, suf in (("journal", "journal-", ".log"), ("checkpoint", "checkpoint-", ".ckpt")):
        mid = name[len(pre):-len(suf)]
        if name.startswith(pre) and name.endswith(suf) and len(mid) == 20 and mid.isdigit():
            return kind, int(mid)
    return None


def header(magic: int, seq: int, frames: int = 0) -> bytes:
    """A file header of FILE_HDR bytes."""
    return _HDR.pack(magic, FORMAT, FRAME_BYTES, 0, seq, frames).ljust(FILE_HDR, b"\0")


def parse_header(data: bytes | memoryview) -> tuple[int, int, int, int, int]:
    """(magic, format, frame bytes, seq, frames) of a file's first bytes."""
    magic, fmt, fb, _zero, seq, frames = _HDR.unpack_from(data, 0)
    return magic, fmt, fb, seq, frames


def header_problem(data: bytes | memoryview, magic: int) -> str | None:
    """None if ``data`` starts with a header of a file of ``magic``
    (FILE_MAGIC or CKPT_MAGIC) this engine reads, else what is wrong."""
    if len(data) < FILE_HDR:
        return f"{len(data)} bytes, shorter than its header ({FILE_HDR} bytes)"
    got, version, fb, _seq, _frames = parse_header(data)
    for what, have, want in (("magic", got, magic), ("format", version, FORMAT),
                             ("frame bytes", fb, FRAME_BYTES)):
        if have != want:
            return f"header {what} is {have:#x}, expected {want:#x}"
    return None


def check_frame(buf: bytes | memoryview) -> str | None:
    """None for a valid frame (its first FRAME_BYTES bytes), else why not."""
    if len(buf) < FRAME_BYTES:
        return f"cut short ({len(buf)} of {FRAME_BYTES} bytes)"
    status = ffi.new("uint8_t *")
    if lib.eng_dj_check_frames(ffi.from_buffer(buf), 1, status) == 0 and status[0] == 1:
        return None
    head = np.frombuffer(buf, dtype=FRAME_DTYPE, count=1)[0]
    if int(head["magic"]) != FRAME_MAGIC:
        return f"bad frame magic {int(head['magic']):#x}"
    if crc32c(memoryview(buf)[FRAME_HDR:FRAME_BYTES]) != int(head["crc"]):
        return "checksum mismatch"
    return None


def decode_record(rec: bytes | memoryview) -> dict[str, Any]:
    """The fields of one record (JREC_SIZE bytes), by the header's struct."""
    r = ffi.cast("eng_jrec *", ffi.from_buffer(rec))
    return {"seq": int(r.seq), "ts_ns": int(r.ts_ns), "id": int(r.id), "word": int(r.word),
            "kind": int(r.kind), "trigger": int(r.trigger), "w": tuple(int(x) for x in r.w),
            "version": int(r.version), "riders": int(r.riders)}


def seal_frames(frames: np.ndarray) -> None:
    """Set magic and CRC of every frame (FRAME_DTYPE) from its record."""
    raw = frames.view(np.uint8).reshape(len(frames), FRAME_BYTES)
    frames["magic"] = FRAME_MAGIC
    frames["crc"] = [crc32c(raw[i, FRAME_HDR:]) for i in range(len(frames))]


def encode_frames(recs: np.ndarray) -> bytes:
    """Records (JREC_DTYPE) as sealed frames, back to back."""
    frames = np.zeros(len(recs), dtype=FRAME_DTYPE)
    frames["rec"] = recs
    seal_frames(frames)
    return frames.tobytes()


def encode_journal_file(first_seq: int, recs: np.ndarray, size: int | None = None) -> bytes:
    """A journal file: header, frames, zeros up to ``size`` bytes (None: none)."""
    data = header(FILE_MAGIC, first_seq) + encode_frames(recs)
    return data if size is None else data.ljust(size, b"\0")


def encode_checkpoint(start_seq: int, recs: np.ndarray) -> bytes:
    """A checkpoint file: header (start seq, frames), one frame per object."""
    return header(CKPT_MAGIC, start_seq, len(recs)) + encode_frames(recs)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def write_journal_file(directory: str | os.PathLike[str], first_seq: int, recs: np.ndarray,
                       size: int | None = None) -> Path:
    """Write ``recs`` as the journal file starting at ``first_seq``."""
    path = Path(directory) / journal_name(first_seq)
    _write(path, encode_journal_file(first_seq, recs, size))
    return path


def write_checkpoint(directory: str | os.PathLike[str], start_seq: int,
                     recs: np.ndarray) -> Path:
    """Write a checkpoint (tmp, fsync, rename)."""
    path = Path(directory) / checkpoint_name(start_seq)
    _write(path, encode_checkpoint(start_seq, recs))
    return path


# -- meta.json ------------------------------------------------------------------------
def write_meta(directory: str | os.PathLike[str], engine: Any,
               options: dict[str, Any] | None = None) -> Path:
    """Write meta.json for ``engine`` as ``Engine.create(journal=DIR)`` does
    (engine.durable.writer.write_meta), with the create options read from the
    engine (``options`` overrides or adds to them)."""
    from engine.durable.writer import write_meta as write
    opts: dict[str, Any] = {"keys_per_position": engine.keys_per_position,
                            "max_accounts": engine.max_accounts,
                            "journal": bool(engine.journal_records),
                            "journal_records": engine.journal_records
                            or lib.ENG_JOURNAL_DEFAULT_RECORDS,
                            "journal_prices": bool(engine.journal_records
                                                   and engine._seg.jprices)}
    opts.update(options or {})
    write(os.fspath(directory), engine.name, engine.capacity, engine.spec, opts)
    return Path(directory) / META_NAME


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json as written (checked by the restore)."""
    with open(Path(directory) / META_NAME, "rb") as f:
        meta = json.loads(f.read())
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not an object")
    return meta


def load_spec(meta: dict[str, Any]) -> Any:
    """The spec meta.json carries (unpickled: a journal directory is trusted
    as the engine's own files are)."""
    return pickle.loads(base64.b64decode(meta["spec"]))
