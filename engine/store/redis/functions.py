"""The engine's server-side functions (``functions.lua``), as the client sees them.

The numbers they use, read from the C header and written into a Lua prelude;
the library (``FUNCTION LOAD``) and the script (``EVALSHA``, for a server
without Functions) built from the prelude and the file, named by a hash of
both; and what the client must know of each function: which ones write
(``once``: a request number and the client's request record), which slot
keys each declares, which reply carries a commit's state words.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engine._native import lib

# the header's numbers the Redis backend uses
# the header's numbers this module uses
ACCOUNT_ID_MAX: int = lib.ENG_ACCOUNT_ID_MAX
APPLIED: int = lib.ENG_APPLIED
CONFLICT: int = lib.ENG_CONFLICT
DEFAULT_SAMPLE_MASK: int = lib.ENG_DEFAULT_SAMPLE_MASK
EACCTFULL: int = lib.ENG_EACCTFULL
EBADACCOUNT: int = lib.ENG_EBADACCOUNT
EBADARG: int = lib.ENG_EBADARG
EBADKEY: int = lib.ENG_EBADKEY
EKEYEXISTS: int = lib.ENG_EKEYEXISTS
EBADMONEY: int = lib.ENG_EBADMONEY
EBADPRICE: int = lib.ENG_EBADPRICE
EBADSLOT: int = lib.ENG_EBADSLOT
EBADTRIGGER: int = lib.ENG_EBADTRIGGER
EBUSY: int = lib.ENG_EBUSY
ECLOSED: int = lib.ENG_ECLOSED
EFORKED: int = lib.ENG_EFORKED
EFULL: int = lib.ENG_EFULL
EGUARDFAIL: int = lib.ENG_EGUARDFAIL
ENOTOPEN: int = lib.ENG_ENOTOPEN
ESTALE: int = lib.ENG_ESTALE
ETIMEDOUT: int = lib.ENG_ETIMEDOUT
HALTED: int = lib.ENG_HALTED
HIST_BUCKETS: int = lib.ENG_HIST_BUCKETS
ID_MAX: int = lib.ENG_ID_MAX
ID_SLOT_BITS: int = lib.ENG_ID_SLOT_BITS
ID_SLOT_MASK: int = lib.ENG_ID_SLOT_MASK
INVALID: int = lib.ENG_INVALID
KEY_MAX: int = lib.ENG_KEY_MAX
MAX_TRIGGERS: int = lib.ENG_MAX_TRIGGERS
MONEY_SCALE: int = lib.ENG_MONEY_SCALE
MANY_ERROR: int = lib.ENG_MANY_ERROR
OP_ACCOUNT: int = lib.ENG_OP_ACCOUNT
OP_COUNT: int = lib.ENG_OP_COUNT
OP_KEY: int = lib.ENG_OP_KEY
OP_LOOKUP: int = lib.ENG_OP_LOOKUP
OP_OPEN: int = lib.ENG_OP_OPEN
OP_PRICE: int = lib.ENG_OP_PRICE
OP_PRICE_BATCH: int = lib.ENG_OP_PRICE_BATCH
OP_READ: int = lib.ENG_OP_READ
OP_TRANSITION: int = lib.ENG_OP_TRANSITION
OP_TRANSITION_CTX: int = lib.ENG_OP_TRANSITION_CTX
OP_WAIT: int = lib.ENG_OP_WAIT
REDIS_BUSY_TRIES: int = lib.ENG_REDIS_BUSY_TRIES
REDIS_FREE_SCAN: int = lib.ENG_REDIS_FREE_SCAN
REDIS_CREATE_CHUNK: int = lib.ENG_REDIS_CREATE_CHUNK
REDIS_CREATE_LEASE_MS: int = lib.ENG_REDIS_CREATE_LEASE_MS
REDIS_GUARD_TTL_MS: int = lib.ENG_REDIS_GUARD_TTL_MS
REDIS_REQUEST_WINDOW_MS: int = lib.ENG_REDIS_REQUEST_WINDOW_MS
REDIS_RESEND_BACKOFF_US: int = lib.ENG_REDIS_RESEND_BACKOFF_US
REDIS_RELOAD_TRIES: int = lib.ENG_REDIS_RELOAD_TRIES
REDIS_SNAPSHOT_PAGE: int = lib.ENG_REDIS_SNAPSHOT_PAGE
REJECTED: int = lib.ENG_REJECTED
RULE_GUARDED: int = lib.ENG_RULE_GUARDED
RULE_TARGET_MASK: int = lib.ENG_RULE_TARGET_MASK
SW_GEN_MASK: int = lib.ENG_SW_GEN_MASK
SW_GEN_SHIFT: int = lib.ENG_SW_GEN_SHIFT
SW_LOCK: int = lib.ENG_SW_LOCK

#: an APPLIED reply of tx, gcommit and release is >= this and carries the
#: commit's state words (see ``committed`` in functions.lua)
_COMMITTED = 1 << 30
#: the operation (metrics) each function counts under, for latency samples
_OP_OF = {"tx": OP_TRANSITION, "gcommit": OP_TRANSITION_CTX,
          "open": OP_OPEN, "upd": OP_PRICE, "upds": OP_PRICE_BATCH,
          "tokp": OP_PRICE_BATCH, "price": OP_READ, "context": OP_READ,
          "wprep": OP_WAIT, "bind": OP_KEY, "lookup": OP_LOOKUP,
          "aopen": OP_ACCOUNT, "acash": OP_ACCOUNT, "aset": OP_ACCOUNT,
          "alookup": OP_LOOKUP}
#: the functions that write, wrapped in ``once`` (functions.lua): each
#: call carries a request number and declares the client's request record
_ONCE = frozenset({"tx", "glock", "gcommit", "upd", "upds", "tokp", "txmany", "open", "bind",
                   "release", "wprep", "aopen", "acash", "aset", "aclose"})
#: the keys of the position's slot each function touches (p: the position,
#: g: its guard lock, pk: its keys, wf, w: its wait flag and stream)
_SLOT_KEYS = {"tx": ("p", "g", "wf", "w"), "gcommit": ("p", "g", "wf", "w"),
              "glock": ("p", "g"), "gunlock": ("g",), "state": ("p",), "word": ("p", "g"),
              "price": ("p",), "context": ("p",), "upd": ("p", "g", "wf", "w"), "bind": ("p", "pk"),
              "keys": ("p", "pk"), "release": ("p", "g", "pk", "wf", "w"),
              "wprep": ("p", "wf", "w")}
#: the functions whose further keys depend on the position's data (the account
#: a closing books on, the token set and key records a release clears): the
#: client declares the ones it learned (see _fn)
_LEARNS = frozenset({"tx", "gcommit", "release"})
_NEED = b"NEED"

#: the functions that write what a caller was told: with ``?wait=N`` each
#: waits for N replicas before it returns
_MUTATING = frozenset({"tx", "gcommit", "upd", "upds", "tokp", "txmany", "open", "bind",
                       "release", "halt", "setmetrics", "aopen", "acash", "aset", "aclose"})
#: the replies of the create and remove steps (functions.lua, "create and remove")
_C = {"C_OK": 0, "C_EXISTS": 1, "C_BUSY": 2, "C_FOREIGN": 3, "C_REMAINS": 4, "C_LOST": 5,
      "C_GONE": 6}
C_OK, C_EXISTS, C_BUSY, C_FOREIGN, C_REMAINS, C_LOST, C_GONE = _C.values()


def _constants() -> str:
    """The Lua prelude: every number the functions use, from the C header."""
    names = {"APPLIED": APPLIED, "INVALID": INVALID,
             "CONFLICT": CONFLICT, "REJECTED": REJECTED,
             "HALTED": HALTED, "MAX_TRIGGERS": MAX_TRIGGERS,
             "RULE_GUARDED": RULE_GUARDED, "RULE_TARGET_MASK": RULE_TARGET_MASK,
             "MONEY_SCALE": MONEY_SCALE, "COMMITTED": _COMMITTED,
             "REQUEST_WINDOW_MS": REDIS_REQUEST_WINDOW_MS, "FREE_SCAN": REDIS_FREE_SCAN,
             "BOOK_PRICE_MULT": lib.ENG_BOOK_PRICE_MULT, "MANY_ERROR": MANY_ERROR, **_C}
    for n in dir(lib):
        if n.startswith("ENG_E") and isinstance(getattr(lib, n), int):
            names[n[4:]] = getattr(lib, n)
    return "".join(f"local {k} = {v}\n" for k, v in sorted(names.items()))


_BODY = Path(__file__).with_name("functions.lua").read_text()
_PRELUDE = _constants()
# REG wraps every function in ENGINE_CHECK (the incarnation check; the body sets it)
_CHECKED = "function(k, a) return ENGINE_CHECK(n, f, k, a) end"
_VERSION = hashlib.sha1((_PRELUDE + _CHECKED + _BODY).encode()).hexdigest()[:10]
_LIBNAME = f"engine_{_VERSION}"
# a reader's flags ({'no-writes'}, see functions.lua) go with its registration
_LIBRARY = (f"#!lua name={_LIBNAME}\n{_PRELUDE}local ENGINE_CHECK\n"
            f"local function REG(n, f, flags) redis.register_function{{function_name="
            f"'e{_VERSION}_' .. n, callback={_CHECKED}, flags=flags or {{}}}} end\n{_BODY}")
_SCRIPT = (f"{_PRELUDE}local F = {{}}\nlocal ENGINE_CHECK\n"
           f"local function REG(n, f) F[n] = {_CHECKED} end\n{_BODY}\n"
           "local args = {}\nfor i = 2, #ARGV do args[i - 1] = ARGV[i] end\n"
           "return F[ARGV[1]](KEYS, args)\n")
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


def _needs(reply: Any) -> bool:
    """Is ``reply`` a NEED answer (keys to declare; nothing applied)?"""
    return reply.__class__ is list and bool(reply) and reply[0] == _NEED
