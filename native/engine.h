/*
 * engine.h - the shared layout and C API of the shared-memory state engine.
 *
 * This header is the ONE source of every size, offset, bit position, flag and
 * status code.  The region between the cdef markers is read by
 * native/build_native.py as the cffi cdef (each `#define NAME value` becomes
 * `#define NAME ...` and each `[MACRO]` array bound becomes `[...]`), so
 * Python reads lib.ENG_* and ffi.offsetof(...) and never retypes a number.
 *
 * Segment layout (every part starts on a cache line):
 *
 *   +--------------------+  0
 *   | eng_header         |  identity, controls, transition table
 *   +--------------------+  hdr.registry_off
 *   | eng_proc[MAX_PROCS]|  one entry per attached Engine (pid, start time)
 *   +--------------------+  hdr.shards_off
 *   | eng_shard[PROCS+1] |  metrics: one shard per entry + one "retired"
 *   +--------------------+  hdr.slots_off
 *   | slots[capacity]    |  hdr.slot_size bytes per position: eng_slot (hot
 *   |                    |  words, prices) + two record copies (the spec's
 *   |                    |  fields), see "records" below
 *   +--------------------+  hdr.keyrecs_off
 *   | eng_keyrec[cap][k] |  k = keys_per_position key records per slot
 *   +--------------------+  hdr.keyidx_off
 *   | uint64_t[buckets*8]|  the key index: ENG_KEY_BUCKET cells per bucket
 *   +--------------------+  hdr.stripes_off
 *   | uint32_t[buckets]  |  key insert stripe locks, one per bucket
 *   +--------------------+  hdr.tindex_off
 *   | uint64_t[tbuckets] |  the token index: one bucket word per token hash
 *   +--------------------+  hdr.accounts_off
 *   | eng_account[max_ac]|  accounts: latch word + two sealed copies of books
 *   +--------------------+  hdr.journal_off (journal_records > 0)
 *   | eng_journal        |  the journal's latch word (its own line)
 *   | eng_jrec[records]  |  the ring: one record per committed change
 *   +--------------------+  hdr.segment_size
 */
#ifndef ENGINE_H
#define ENGINE_H

#include <stdint.h>

/* cdef-begin */

/* ---- identity ---------------------------------------------------------- */
#define ENG_MAGIC            0x31454E49474E4545ULL   /* "EENGINE1" little-endian */
#define ENG_LAYOUT_VERSION   10
#define ENG_CACHE_LINE       64

/* ---- limits ------------------------------------------------------------ */
#define ENG_MAX_STATES       16
#define ENG_MAX_TRIGGERS     256
#define ENG_MAX_PROCS        128
#define ENG_MAX_LOCAL_ENGINES 1024   /* Engines attached at once in one process */
#define ENG_MAX_CAPACITY     16777216
#define ENG_HIST_BUCKETS     48      /* bucket b holds latencies in [2^(b-1), 2^b) ns */
#define ENG_MAX_ACCOUNTS     65536

/*
 * ---- fencing tokens ----------------------------------------------------------
 *
 *   23                         7 6          0
 *  +----------------------------+------------+
 *  | incarnation (17 bits, != 0)| entry (7)  |
 *  +----------------------------+------------+
 *
 * A lock word names its owner by token: the registry entry it attached
 * through and that entry's incarnation (bumped every time the entry is
 * claimed; never 0, so a token is never 0).  An owner is dead only when
 * proven so: its entry moved to another incarnation or was freed, or nobody
 * holds the entry's liveness lock any more.  The liveness lock is an OFD
 * write lock on the entry's first byte of the segment file, taken before the
 * entry is claimed and held for the whole attachment; the kernel drops it
 * only when the holder's last descriptor closes (its process died, or it
 * detached), whatever pid namespace it runs in and however fast its pid is
 * reused.  Any failure to tell (EMFILE, ENOLCK, ...) means alive.  The entry
 * also records pid and start time, for people and tools.
 */
#define ENG_TOKEN_BITS       24
#define ENG_TOKEN_MASK       0xFFFFFFULL
#define ENG_TOKEN_ENTRY_BITS 7
#define ENG_TOKEN_ENTRY_MASK 0x7FU
#define ENG_TOKEN_INC_MASK   0x1FFFFU

/*
 * ---- ids ----------------------------------------------------------------------
 *
 *   63       56 55                       24 23                 0
 *  +-----------+---------------------------+--------------------+
 *  | 0         | opening count (32 bits)   | slot (24 bits)     |
 *  +-----------+---------------------------+--------------------+
 *
 * open returns an id naming this opening of the slot; eng_slot.opening counts
 * the slot's openings (the first is 1, so no id is 0).  Every call by id
 * checks the opening against the slot's, next to the state word it loads.
 */
#define ENG_ID_SLOT_BITS     24
#define ENG_ID_SLOT_MASK     0xFFFFFFULL
#define ENG_ID_MAX           0x00FFFFFFFFFFFFFFULL

/*
 * ---- the state word (eng_slot.word, 64 bits) -------------------------------
 *
 *   63 62            39 38          23 22   19 18 17 16 15        0
 *  +--+----------------+--------------+-------+--+--+--+-----------+
 *  |0 | owner token    | generation   |target |C |E |L | one-hot   |
 *  +--+----------------+--------------+-------+--+--+--+-----------+
 *
 *  one-hot   the current state, 1 << state index; 0 = slot free (never opened
 *            or released)
 *  L         transition lock; owner and target are meaningful only while set
 *  E         the last slow-path transition on this slot was rolled back by a
 *            takeover after its owner died; cleared by the next commit
 *  C         which of the slot's two context copies is the published one
 *  target    index of the state the lock holder is moving to
 *  generation +1 on every commit (mod 2^16): a CAS can never succeed against
 *            a state that left and came back
 *  owner     the lock holder's fencing token (see above)
 */
#define ENG_SW_STATE_MASK    0xFFFFULL
#define ENG_SW_LOCK          0x10000ULL
#define ENG_SW_ERROR         0x20000ULL
#define ENG_SW_CTX           0x40000ULL
#define ENG_SW_TARGET_SHIFT  19
#define ENG_SW_TARGET_MASK   0xFULL
#define ENG_SW_GEN_SHIFT     23
#define ENG_SW_GEN_MASK      0xFFFFULL
#define ENG_SW_OWNER_SHIFT   39

/*
 * ---- records ------------------------------------------------------------------
 *
 * A position's record is the machine spec's fields, compiled into up to
 * ENG_MAX_FIELD_WORDS 8-byte words (an i4 takes a whole word, sign-extended;
 * bytes fields span 1-4 words).  The header keeps each word's type, which C
 * checks on every write, and the word index of the fields C itself uses
 * (roles): PnL needs entry_price, amount and side; update_token_price needs
 * token; open stamps opened_ns.  Role words are set at open only.
 *
 * One record copy in the segment:  | commit | version | word 0 .. n-1 |
 * padded to ENG_REC_ALIGN; the slot is eng_slot followed by two copies and
 * the trailing peak pair (ENG_SLOT_PEAKS bytes: two doubles, see exits in
 * the prices part), padded to a cache line (hdr.slot_size).
 */
#define ENG_MAX_FIELD_WORDS  24
#define ENG_REC_META_WORDS   3       /* commit, version, cause */
#define ENG_REC_ALIGN        16
#define ENG_FT_F8            1       /* double, finite */
#define ENG_FT_I8            2
#define ENG_FT_I4            3       /* int64 in [INT32_MIN, INT32_MAX] */
#define ENG_FT_U8            4
#define ENG_FT_BYTES         5       /* raw bytes (part of an S8..S32 field) */
#define ENG_ROLE_ENTRY_PRICE 0       /* f8 > 0 */
#define ENG_ROLE_AMOUNT      1       /* f8 > 0 */
#define ENG_ROLE_SIDE        2       /* i4/i8, +1 or -1 */
#define ENG_ROLE_TOKEN       3       /* i8: update_token_price */
#define ENG_ROLE_OPENED_NS   4       /* i8: stamped by open */
/* i8: the account the opening reserved on (0: none); only with the PnL roles */
#define ENG_ROLE_ACCOUNT     5
/* exits (see "exits fired by the price" in the prices part): the levels an
 * armed position fires at (f8, 0: off), and what a fire writes */
#define ENG_ROLE_STOP_LOSS   6       /* f8 */
#define ENG_ROLE_TAKE_PROFIT 7       /* f8 */
#define ENG_ROLE_TRAILING    8       /* f8: the trailing stop's distance */
#define ENG_ROLE_EXIT_REASON 9       /* i4/i8: ENG_EXIT_* */
#define ENG_ROLE_EXIT_PRICE  10      /* f8: the firing price; a closing books at it when given */
#define ENG_ROLE_COUNT       16
#define ENG_ROLE_AT_OPEN     6       /* roles below it are set at open only */
#define ENG_ROLE_NONE        0xFF
#define ENG_EXITS_NONE       0xFF    /* eng_rec_layout.exit_state: the spec has no exits */
/* exit reasons a fire writes (Python: ExitReason; other codes are the user's) */
#define ENG_EXIT_NONE        0
#define ENG_EXIT_STOP_LOSS   1
#define ENG_EXIT_TAKE_PROFIT 2
#define ENG_EXIT_TRAILING_STOP 3

/*
 * ---- keys -----------------------------------------------------------------------
 *
 * Each slot has keys_per_position key records (eng_keyrec); record r of a
 * slot holds the r-th key of the slot's current opening.  Its tag:
 *
 *   0                          free
 *   token << 8 | KR_BUSY       a key being inserted by that token
 *   id << 8 | KR_HELD          the key of opening `id` (valid while id is open)
 *   token << 8 | KR_CLEARING   a gone key being cleared by that token
 *
 * The index is an array of buckets of ENG_KEY_BUCKET 64-bit cells (one cache
 * line per bucket); a key may live in either of its two buckets.  A cell:
 *
 *   63  62           39 38  36 35               20 19               0
 *  +---+---------------+------+-------------------+------------------+
 *  | 1 | slot (24)     | r (3)| record gen (16)   | fingerprint (20) |   0 = free
 *  +---+---------------+------+-------------------+------------------+
 *
 * Every claim of a key record bumps its gen, so a cell placed for a key
 * inserted again into the same record (same key, same or later opening)
 * differs from every stale cell of an earlier insert.
 */
#define ENG_KEY_MAX          48      /* bytes of one key */
#define ENG_MAX_KEYS_PER_POSITION 8
#define ENG_KEY_BUCKET       8       /* cells per bucket */
#define ENG_KR_BUSY          1
#define ENG_KR_HELD          2
#define ENG_KR_CLEARING      3
#define ENG_KC_USED          0x8000000000000000ULL
#define ENG_KC_SLOT_SHIFT    39
#define ENG_KC_R_SHIFT       36
#define ENG_KC_GEN_SHIFT     20
#define ENG_KC_GEN_MASK      0xFFFFU
#define ENG_KC_FP_MASK       0xFFFFFULL

/*
 * ---- accounts --------------------------------------------------------------------
 *
 * Money is exact fixed point: int64 units of 1 / ENG_MONEY_SCALE.  An account
 * id names one opening of an account record, as a position id names one
 * opening of a slot:
 *
 *   63       56 55                       24 23                 0
 *  +-----------+---------------------------+--------------------+
 *  | 0         | opening count (32 bits)   | account index (24) |
 *  +-----------+---------------------------+--------------------+
 *
 * The account word (eng_account.word) is a latch-seqlock like the price word:
 *
 *   63                                   24 23                  0
 *  +---------------------------------------+---------------------+
 *  | version (40 bits)                     | holder token or 0   |
 *  +---------------------------------------+---------------------+
 *
 * books[version & 1] is published; a holder fills books[(version + 1) & 1],
 * seals it (eng_books.seal = the latched word, written last) and publishes
 * by CAS (v, token) -> (v + 1, 0).  See "accounts" in accounts.c.
 */
#define ENG_MONEY_SCALE      100000000LL
/*
 * A booked close books its last price, which nothing bounds but this: the
 * close of a position is booked at a price up to ENG_BOOK_PRICE_MULT times
 * its entry price.  Its opening reserves room for the worst case within that
 * band (eng_books.worst_gain, worst_loss), so every such close can be booked;
 * a close at a price above the band is refused (nothing changes; a price
 * within it closes).
 */
#define ENG_BOOK_PRICE_MULT  1024
#define ENG_AW_VERSION_SHIFT 24
#define ENG_ACCOUNT_ID_MAX   0x00FFFFFFFFFFFFFFULL

/*
 * ---- the price word (eng_slot.pword, 64 bits) ------------------------------
 *
 *   63                                   24 23                  0
 *  +---------------------------------------+---------------------+
 *  | sequence = price version (40 bits)    | writer token or 0   |
 *  +---------------------------------------+---------------------+
 *
 * The writer latches by CAS (seq, 0) -> (seq, token) and publishes by CAS
 * (seq, token) -> (seq + 1, 0): publish and unlatch are one CAS from the
 * exact latched word, so a writer whose latch was taken over never publishes.
 * On the same line, open leaves the opening's PnL inputs under the latch
 * (eng_slot.pnl_entry, pnl_size): a price writer computes PnL from the line
 * it latches and never reads the context record.
 */
#define ENG_PW_SEQ_SHIFT     24

/*
 * ---- the token index (update_token_price) ---------------------------------------
 *
 * hdr.tindex_buckets bucket words (a power of two >= capacity); a token's
 * bucket is fmix64(token ^ key_seed) & (buckets - 1).  Each bucket heads a
 * singly linked chain of slots through eng_slot.tnext; eng_slot.tbucket names
 * the bucket a slot was linked into.  A bucket word:
 *
 *   63                       32 31      24 23                  0
 *  +---------------------------+----------+---------------------+
 *  | head: slot + 1 (0: empty) | 0        | holder token or 0   |
 *  +---------------------------+----------+---------------------+
 *
 * See "the token index" in token_index.c for the protocol.
 */
#define ENG_TB_HEAD_SHIFT    32
#define ENG_TB_MIN_BUCKETS   64

/* ---- transition_many: an element that failed holds this | -code --------- */
#define ENG_MANY_ERROR       0x80

/* ---- transition table entries: target index + 1 (0 = no rule) ---------- */
#define ENG_RULE_TARGET_MASK 0x1F
#define ENG_RULE_GUARDED     0x80

/* ---- outcomes (>= 0) ----------------------------------------------------- */
#define ENG_APPLIED          0
#define ENG_INVALID          1       /* no rule for this trigger from this state */
#define ENG_CONFLICT         2       /* retries spent against other writers */
#define ENG_REJECTED         3       /* a guard said no */
#define ENG_HALTED           4       /* emergency stop is on */

/* ---- errors (< 0); eng_strerror(code) gives each one's words -------------- */
#define ENG_EBADSLOT         -1      /* id's slot >= capacity, or id > ENG_ID_MAX */
#define ENG_ENOTOPEN         -2      /* id never issued (opening 0 or not yet reached) */
#define ENG_EBADTRIGGER      -3      /* trigger >= number of triggers */
#define ENG_EBADPRICE        -4      /* price not finite or <= 0 */
#define ENG_EBADARG          -5      /* other argument out of range, or a NULL pointer */
#define ENG_EFULL            -6      /* no free slot */
#define ENG_ETIMEDOUT        -7
#define ENG_EINTR            -8      /* a signal arrived: Python checks it, then resumes */
#define ENG_EBUSY            -9      /* a live writer held the record past the bound */
#define ENG_EMAGIC           -10     /* not an engine segment */
#define ENG_ELAYOUT          -11     /* another layout version */
#define ENG_ESIZE            -12     /* sizes in the header disagree with the mapping */
#define ENG_ENOTREADY        -13     /* creator has not finished formatting */
#define ENG_ESPEC            -14     /* machine spec fingerprint differs */
#define ENG_ENOPROC          -15     /* process registry full */
#define ENG_ESTALE           -16     /* id's opening was released (slot free or reopened) */
#define ENG_EGUARDED         -17     /* rule has a guard: use the guarded path */
#define ENG_ECORRUPT         -18     /* a field of the header is out of range */
#define ENG_ECLOSED          -19     /* the eng_seg was detached, or never attached */
#define ENG_EFORKED          -20     /* the eng_seg was attached by the parent of a fork */
#define ENG_ERECOVERING      -21     /* another live process runs recover() */
#define ENG_EGUARDFAIL       -22     /* the guard callback raised; nothing was changed */
#define ENG_ETOOMANY         -23     /* this process has ENG_MAX_LOCAL_ENGINES attached */
#define ENG_EKEYEXISTS       -24     /* the key names another open position */
#define ENG_EKEYLIMIT        -25     /* the opening has keys_per_position keys */
#define ENG_EKEYFULL         -26     /* both of the key's index buckets are full */
#define ENG_EBADFIELD        -27     /* a field value out of its type's range, or a set-at-open field */
#define ENG_EBADKEY          -28     /* key length 0 or > ENG_KEY_MAX */
#define ENG_ERISK_HALTED     -29     /* risk: the account is halted */
#define ENG_ERISK_EXPOSURE   -30     /* risk: reserved + notional would pass max_exposure */
#define ENG_ERISK_COUNT      -31     /* risk: open_positions would pass max_positions */
#define ENG_ERISK_CASH       -32     /* risk: notional (or a withdrawal) > cash - reserved */
#define ENG_EBADACCOUNT      -33     /* account id out of range or never issued */
#define ENG_ESTALEACCOUNT    -34     /* account id's opening was closed */
#define ENG_EBADMONEY        -35     /* money negative or beyond the fixed-point range */
#define ENG_EACCTFULL        -36     /* no free account record */
#define ENG_EACCTBUSY        -37     /* close_account: the account has open positions */
#define ENG_EVERSION         -38     /* update_account: the version moved (Python retries) */
#define ENG_ELAPPED          -39     /* journal: the record after the reader's seq was overwritten */
#define ENG_ENOJOURNAL       -40     /* journal: the engine was created without one */
#define ENG_EJOURNALFULL     -41     /* durable: the file writer is behind (ring full) */
#define ENG_EDURABLE         -42     /* durable: the file writer failed (disk full, I/O error) */
#define ENG_ERRNO_MIN        -42     /* the lowest code: every code in [it, -1] has words */

/* ---- metrics operations -------------------------------------------------- */
#define ENG_OP_TRANSITION    0       /* fast path */
#define ENG_OP_TRANSITION_CTX 1      /* slow path: context update or guard */
#define ENG_OP_OPEN          2
#define ENG_OP_PRICE         3       /* update_price */
#define ENG_OP_PRICE_BATCH   4       /* update_prices / update_token_price, per call */
#define ENG_OP_READ          5       /* price / context read */
#define ENG_OP_WAIT          6
#define ENG_OP_RECOVER       7
#define ENG_OP_KEY           8       /* bind_key (open's key counts under OPEN) */
#define ENG_OP_LOOKUP        9
#define ENG_OP_ACCOUNT       10      /* account books: open/deposit/withdraw/halt/update */
#define ENG_OP_EXIT          11      /* exits fired by price writes (each a transition) */
#define ENG_OP_COUNT         12

/* ---- registry entry states ----------------------------------------------- */
#define ENG_PROC_FREE        0
#define ENG_PROC_CLAIMED     1       /* pid written, incarnation and start time not yet */
#define ENG_PROC_ACTIVE      2

/* ---- test-only fault switches (eng_set_faults) -----------------------------
 * Honoured only by a process whose own switch is on (eng_test_faults,
 * ENGINE_TEST_FAULTS=1); with it off, attach refuses a segment that has any
 * set (ENG_ECORRUPT). */
#define ENG_TEST_PAUSE_MAX_NS 60000000000ULL   /* test_pause_ns: at most 60 s */
#define ENG_FAULT_SKIP_GEN   1       /* commit without generation + 1 */
#define ENG_FAULT_BLIND_STORE 2      /* fast path stores instead of CAS */
/* a committer SIGKILLs itself between its state CAS and its counter bump */
#define ENG_FAULT_DIE_AFTER_CAS 4
/* a slow path or an open SIGKILLs itself right after its lock CAS */
#define ENG_FAULT_DIE_AFTER_LOCK 8
/* a key insert SIGKILLs itself with its index cell placed, before publishing (a
 * keyed open_account: holding the key lock and the latch, its open sealed) */
#define ENG_FAULT_DIE_IN_KEY 16
/* a booked transition SIGKILLs itself between its slot commit and its account publish */
#define ENG_FAULT_DIE_IN_BOOKING 32
/* a token index link SIGKILLs itself holding the bucket lock, tnext written, head not */
#define ENG_FAULT_DIE_IN_TINDEX_ADD 64
/* a token index unlink SIGKILLs itself holding the bucket lock, unlinked, tbucket not cleared */
#define ENG_FAULT_DIE_IN_TINDEX_DEL 128
/* update_prices / update_token_price skip the seqlock: they write the copy readers
 * read, price half, then PnL half, the word unmoved (torn reads for the stress
 * verifier to catch); update_price does not (its machine code stays as it is) */
#define ENG_FAULT_TEAR_PRICE 256
/* a committer SIGKILLs itself holding the journal latch, nothing filled (J1) */
#define ENG_FAULT_DIE_AFTER_JLATCH 512
/* a committer SIGKILLs itself in J2: the record's seq cleared, its fields not written */
#define ENG_FAULT_DIE_IN_JFILL 1024
/* a committer SIGKILLs itself with its record whole (J2), before its commit CAS (J3) */
#define ENG_FAULT_DIE_AFTER_JFILL 2048
/* a committer SIGKILLs itself after its commit CAS (J3), before publishing the record (J4) */
#define ENG_FAULT_DIE_BEFORE_JPUBLISH 4096
/* a price writer SIGKILLs itself between its exit's commit and its price publish */
#define ENG_FAULT_DIE_IN_EXIT 8192
/* a committer SIGKILLs itself in J2 of a rider (a record at n + 2 or later: an
 * open's key, a booked change's books): the rider's seq cleared, its fields not
 * written (the slot's own record whole before it) */
#define ENG_FAULT_DIE_IN_RIDER 32768
/* a committer SIGKILLs itself right after a rider's J2 (the next rider, if any,
 * not filled; the commit CAS J3 not made) */
#define ENG_FAULT_DIE_AFTER_RIDER 65536
/* with any ENG_FAULT_DIE_*: the process SIGSTOPs itself there instead (a stopped,
 * live holder; the test clears the switches, then sends SIGCONT) */
#define ENG_FAULT_STOP_NOT_KILL 16384

/*
 * ---- bounded back-off ----------------------------------------------------------
 * Every wait is a loop of back-off steps with a hard limit: ENG_SPIN_STEPS
 * steps of spinning (1, 2, 4, ... pauses), then sched_yield up to step
 * ENG_YIELD_STEPS, then sleeps of ENG_BACKOFF_SLEEP_NS; every
 * ENG_LIVENESS_EVERY sleeping steps the waiter checks the holder's liveness.
 * A wait for a slot lock, price latch, stripe or bucket lock gives up after
 * ENG_MAX_WAIT_STEPS steps (about 7 ms), one for an account latch after
 * ENG_ACCT_WAIT_STEPS (about 63 ms: every worker may share one account).
 */
#define ENG_SPIN_STEPS       6
#define ENG_YIELD_STEPS      24
#define ENG_MAX_WAIT_STEPS   160
#define ENG_ACCT_WAIT_STEPS  1280
#define ENG_LIVENESS_EVERY   8
#define ENG_BACKOFF_SLEEP_NS 50000
#define ENG_CAS_RETRIES      64      /* fast-path CAS failures before CONFLICT */
#define ENG_READ_RETRIES     4096    /* seqlock reads that saw the sequence move, before EBUSY */
#define ENG_DEFAULT_SAMPLE_MASK 63   /* a new segment times one operation in 64 */

/*
 * ---- the Redis backend (engine/store/redis/) -------------------------------------
 * A guarded transition on Redis holds a lock key with this expiry while its
 * guard runs in the client: a client that dies or stalls past it can never
 * commit (the commit checks the lock is still its own).  A transition that
 * meets another client's guard lock retries ENG_REDIS_BUSY_TRIES times with
 * back-off (about 55 ms in all), then says CONFLICT.
 *
 * A call the server refuses with "Function not found" (FUNCTION FLUSH, a
 * restart) never ran: the client loads the library again and resends it, up
 * to ENG_REDIS_RELOAD_TRIES times.  snapshot() reads each shard in pages of
 * about ENG_REDIS_SNAPSHOT_PAGE open positions (one SSCAN step per call), so
 * no call holds the server for long: a page took 2.8 ms on average (SLOWLOG) on
 * this 2-core host under load, 10 ms at the 1,000 of a first try.
 */
#define ENG_REDIS_GUARD_TTL_MS   2000
#define ENG_REDIS_BUSY_TRIES     32
#define ENG_REDIS_RELOAD_TRIES   4
#define ENG_REDIS_SNAPSHOT_PAGE  250
/* The journal on Redis: each shard's stream keeps this many records by
 * default (XADD MAXLEN; about 110 bytes each on the server) */
#define ENG_REDIS_JOURNAL_RECORDS 65536
#define ENG_REDIS_JOURNAL_MAX     (1LL << 32)   /* journal_records at most */

/*
 * Creating an engine on Redis: the name is claimed in one function (its
 * meta, not ready, with a lease key of ENG_REDIS_CREATE_LEASE_MS that the
 * creator renews between steps); the free lists are then filled on the
 * server ENG_REDIS_CREATE_CHUNK entries per call, and each shard is sealed
 * (ready) last.  A create that finds a not-ready name whose lease expired
 * (its creator died) clears it and builds it again.
 */
#define ENG_REDIS_CREATE_LEASE_MS 10000
#define ENG_REDIS_CREATE_CHUNK    8192

/*
 * Exactly-once calls on Redis.  Every call that writes carries a request id:
 * the Engine's random client token and a sequence number.  Each shard keeps,
 * per client, the last request it applied and its reply (key r:<token>),
 * for ENG_REDIS_REQUEST_WINDOW_MS after that client's last call there; a
 * resend of that request (after a lost connection or a timeout) gets the
 * first reply back and applies nothing.  The client resends by itself within
 * the url's timeout, which must be shorter than the window; a call that
 * raised ServerError may be called again (the same call, before any other
 * call on that Engine) within the window and is then applied at most once.
 * While a Redis Cluster slot migrates, a call the server refuses as a whole
 * (ASK, TRYAGAIN, MOVED) is sent again after a back-off of
 * ENG_REDIS_RESEND_BACKOFF_US, doubling up to 64 times that, until the url's
 * timeout.  An open picks its slot among the first ENG_REDIS_FREE_SCAN free
 * slots of its shard (it declares the slot's keys before the call).
 */
#define ENG_REDIS_REQUEST_WINDOW_MS 60000
#define ENG_REDIS_RESEND_BACKOFF_US 1000
#define ENG_REDIS_FREE_SCAN         64

/*
 * ---- price timestamps ---------------------------------------------------------
 * A price's ts_ns is CLOCK_REALTIME.  Read through the vDSO it costs about as
 * much as the rest of update_price, so on x86-64, where the kernel itself keeps
 * time with the TSC (clocksource "tsc": invariant, synchronized across CPUs),
 * each thread reads the TSC and converts it with a rate it measured itself.
 * An anchor is a CLOCK_REALTIME read between two TSC reads.  The offset is
 * re-anchored once ENG_CLOCK_ANCHOR_NS have passed; the rate is the slope
 * between two anchors at least ENG_CLOCK_RATE_NS apart (a separate, longer
 * baseline, so the short offset anchor does not make the rate noisy).  An
 * anchor read wider than ENG_CLOCK_PAIR_NS at the rate in use (the thread
 * lost its CPU inside it; ENG_CLOCK_PAIR_TICKS before a rate is known) is
 * read again, at most ENG_CLOCK_PAIR_TRIES times, and the call after it tries
 * again.  A slope outside [ENG_CLOCK_MIN_MULT, ENG_CLOCK_MAX_MULT] (ns per tick
 * in 32.32 fixed point), or one that differs from the rate in use by more
 * than 2^-ENG_CLOCK_RATE_TOL_SHIFT of it (a step of CLOCK_REALTIME inside the
 * baseline), is not taken as the rate unless the next slope agrees with it;
 * the offset anchor is renewed all the same.  Until a thread has a rate (its
 * first two baselines, about 2 ms) its timestamps are CLOCK_REALTIME read on
 * the spot.  ENGINE_PRICE_CLOCK=realtime in the environment, or
 * eng_price_clock(0), reads CLOCK_REALTIME on every price write instead.
 *
 * The numbers.  Between renewals a timestamp is the anchor plus the TSC ticks
 * times the rate, so it drifts from CLOCK_REALTIME by the difference between
 * the rate in use and the clock's rate now, over at most one anchor life.
 * The rate in use is a slope the clock really had over a past baseline (or
 * one within 2^-ENG_CLOCK_RATE_TOL_SHIFT of it); the kernel slews the clock
 * by at most ENG_CLOCK_SLEW_PPM either way (adjtimex ADJ_TICK: +-10%, plus
 * +-500 ppm of frequency; chronyd's default maxslewrate is 83,333 ppm), so
 * the two differ by at most 2 x 100,500 ppm plus 244 ppm (a jump from the
 * fastest slew to the slowest); the anchor's life, counted in ticks at the
 * rate in use, is at most (1 + 0.1005) / (1 - 0.1005) = 1.224 x
 * ENG_CLOCK_ANCHOR_NS of real time.  The drift is then at most
 *     0.2012 x 1.224 x 6,000 ns = 1,478 ns,
 * and each anchor's CLOCK_REALTIME sits at most ENG_CLOCK_PAIR_NS / 2 from
 * the middle of its pair it is taken at: 125 ns from the old anchor, 125 ns
 * from the new one.  So at a renewal the new anchor falls at most
 *     1,478 + 250 = 1,728 ns (plus an unfenced RDTSC, tens of ns)
 * below the thread's last timestamp, under ENG_CLOCK_BACK_NS = 2,000 ns:
 * the floor holds it, and only a step back of CLOCK_REALTIME itself by more
 * than ENG_CLOCK_BACK_NS takes the timestamps back.  (internal.h checks this
 * sum at compile time.)  The rate's own noise, ENG_CLOCK_PAIR_NS over a
 * baseline of ENG_CLOCK_RATE_NS (250 ppm), costs 1.5 ns over an anchor life;
 * a step under 2^-ENG_CLOCK_RATE_TOL_SHIFT of its baseline (1 ms over an idle
 * 10 s) passes as a rate off by 244 ppm at most: 1.5 ns over an anchor life.
 * The cost: a renewal (one clock_gettime and two fenced RDTSCs: measured
 * about 60 ns, against 30 for clock_gettime alone) once per
 * ENG_CLOCK_ANCHOR_NS, about 1% of a thread writing prices back to back; a
 * thread that writes less often than that pays a renewal on every write,
 * about 30 ns more than the realtime mode.
 *
 * What holds, through the TSC, for any slew the kernel permits:
 * - a timestamp is within ENG_CLOCK_BACK_NS (2 us; measured: a few hundred ns
 *   at most without slews) of CLOCK_REALTIME read around its write, except
 *   after a step of CLOCK_REALTIME (NTP step, settimeofday, VM resume): until
 *   the thread's next renewal (at most 1.224 x ENG_CLOCK_ANCHOR_NS later)
 *   its timestamps are off by the step, and from that renewal on they are
 *   within the bound again (after a step back of at most ENG_CLOCK_BACK_NS
 *   they are held at the last one until the clock catches up with it);
 * - within a thread, timestamps never go back: one that would fall at most
 *   ENG_CLOCK_BACK_NS below the thread's last is held at the last; the only
 *   way they go back is CLOCK_REALTIME itself stepped back by more than that,
 *   and then they follow it, at the renewal, by about the step (at most the
 *   step plus the bound).  Across threads there is no order within the bound.
 * Through CLOCK_REALTIME (the realtime mode) a timestamp is the clock itself
 * and goes back exactly when the clock does.
 */
#define ENG_CLOCK_ANCHOR_NS   6000           /* the offset anchor's life */
#define ENG_CLOCK_RATE_NS     1000000        /* the rate's shortest baseline */
#define ENG_CLOCK_SLEW_PPM    100500         /* the fastest slew the kernel permits, either way */
#define ENG_CLOCK_PAIR_NS     250            /* the widest anchor pair, once a rate is known */
#define ENG_CLOCK_PAIR_TICKS  2000           /* ... before: the first rate's anchors */
#define ENG_CLOCK_PAIR_TRIES  3
#define ENG_CLOCK_MIN_MULT    (1ULL << 28)   /* 1/16 ns per tick: a 16 GHz TSC */
#define ENG_CLOCK_MAX_MULT    (1ULL << 36)   /* 16 ns per tick: a 62.5 MHz TSC */
#define ENG_CLOCK_RATE_TOL_SHIFT 12          /* slopes agree within 1/4096 (244 ppm) */
#define ENG_CLOCK_BACK_NS     2000           /* the most a thread's timestamp is held at its last */
#define ENG_CLOCK_REALTIME    0              /* eng_price_clock modes */
#define ENG_CLOCK_TSC         1

/* ---- waits ------------------------------------------------------------------ */
#define ENG_WAIT_SLICE_NS    20000000    /* a futex sleep re-checks the state word this often */
#define ENG_MAX_TIMEOUT_NS   0x3FFFFFFFFFFFFFFFLL
#define ENG_CLOSE_WAIT_NS    5000000000LL   /* close waits this long for calls in flight */
#define ENG_CLOSE_POLL_NS    1000000     /* ... looking at least this often */

/* ---- misc ---------------------------------------------------------------- */
#define ENG_SLOT_HEAD        128     /* sizeof(eng_slot): the record copies follow */
#define ENG_SLOT_PEAKS       16      /* the trailing peak pair after the record copies */
#define ENG_BATCH_PREFETCH   8       /* update_prices prefetches the slot this many ids ahead */
#define ENG_BATCH_CHECK      256     /* update_prices checks its arrays in blocks of this many */
#define ENG_HEADER_SIZE      4544

/*
 * One price record (32 bytes).  Two copies per slot; the sequence in
 * eng_slot.pword says which one readers use (seq & 1) and is the version.
 */
typedef struct eng_price_rec {
    double   price;
    int64_t  ts_ns;          /* CLOCK_REALTIME at the update (see "price timestamps") */
    double   pnl_pct;
    double   pnl_usd;
} eng_price_rec;

/*
 * One record copy, at its largest (in the segment a copy is truncated to
 * hdr.rec_size).  Two per slot; the state word's C bit says which one is
 * published.  A lock holder fills the other one and writes commit last: the
 * exact locked word it was written under.  A takeover rolls forward only
 * when commit equals the locked word it finds.
 */
typedef struct eng_ctx_rec {
    uint64_t commit;         /* the locked word this copy was written under */
    uint64_t version;        /* record version: +1 per published copy */
    uint64_t cause;          /* the trigger that wrote it (the journal's takeover reads it) */
    uint64_t w[ENG_MAX_FIELD_WORDS];   /* the fields, as the spec lays them out */
} eng_ctx_rec;

/*
 * The head of one position slot (2 cache lines); the two record copies
 * follow it (hdr.rec_size bytes each) and the slot is padded to a line:
 *
 *   line 0    | word | transitions | pword | opening | waiting | token |
 *             | tnext | tbucket | pnl_entry | pnl_size |
 *   line 1    | price[0]                  | price[1]                  |
 *   then      | record copy 0 | record copy 1 | pad to a line          |
 *
 * Everything written by a transition or a price update for one position sits
 * on that position's own lines, so writers of different slots never share a
 * cache line.  A price write touches lines 0 and 1 only: line 1 is full (two
 * 32-byte price copies), so the PnL inputs sit beside the price word.
 */
typedef struct eng_slot {
    uint64_t word;           /* state word, see above */
    uint64_t transitions;    /* committed transitions; its low 32 bits are the
                                futex word that eng_wait_change sleeps on */
    uint64_t pword;          /* price word: sequence | writer token */
    uint32_t opening;        /* openings of this slot (the id's high part) */
    uint32_t waiting;        /* 1: some process may sleep on the futex word */
    int64_t  token;          /* hint for token scans: the context's token */
    uint32_t tnext;          /* token index: next slot + 1 on the chain (0: end) */
    uint32_t tbucket;        /* token index: bucket + 1 this slot was linked into (0: none) */
    uint64_t pnl_entry;      /* PnL inputs of the opening (bits of doubles), written by */
    uint64_t pnl_size;       /* open under the price latch: entry price, amount x side */
    eng_price_rec price[2];
} eng_slot;

/* One key record (64 bytes), see "keys". */
typedef struct eng_keyrec {
    uint64_t tag;            /* 0, or token / id << 8 | ENG_KR_* */
    uint16_t len;            /* bytes used in key */
    uint16_t order;          /* the opening's keys in the order they were bound */
    uint16_t gen;            /* +1 per claim of this record: its cells carry it */
    uint16_t pad;
    uint8_t  key[ENG_KEY_MAX];
} eng_keyrec;

/* A key read out (eng_keys), and the form C compares keys in. */
typedef struct eng_key {
    uint16_t len;
    uint16_t order;          /* out: 0 for the first key of the opening, ... */
    uint16_t gen;            /* out: the key record's claim count */
    uint16_t pad;
    uint8_t  key[ENG_KEY_MAX];
} eng_key;

/* The compiled record layout of a spec (an argument of eng_format). */
typedef struct eng_rec_layout {
    uint32_t n_words;                        /* field words in use */
    uint32_t keys_per_position;              /* 0 .. ENG_MAX_KEYS_PER_POSITION */
    uint8_t  word_type[ENG_MAX_FIELD_WORDS]; /* ENG_FT_* of each word */
    uint8_t  roles[ENG_ROLE_COUNT];          /* word index of each role, or ENG_ROLE_NONE */
    uint8_t  exit_state;                     /* exits: the armed state's index, or ENG_EXITS_NONE */
    uint8_t  exit_trigger;                   /* ... and the trigger a fire commits */
    uint8_t  pad[6];
} eng_rec_layout;

/*
 * One copy of an account's books (128 bytes).  Money in units of
 * 1 / ENG_MONEY_SCALE.  seal is written last, with release: the latched
 * account word the copy was written under; seal_slot / seal_word name the
 * position transition (slot + 1, its locked word) whose commit decides the
 * copy, or 0 / 0 for a change of the account alone.
 */
typedef struct eng_books {
    uint64_t seal;
    uint64_t seal_slot;
    uint64_t seal_word;
    uint32_t opening;        /* openings of this record (the id's high part) */
    uint32_t open;           /* 1: open; 0: free (never opened, or closed) */
    int64_t  cash;
    int64_t  reserved;       /* sum of the notionals of open positions */
    int64_t  realized;       /* realized PnL of closed positions */
    int64_t  opening_cash;
    int64_t  deposits;
    int64_t  withdrawals;
    int64_t  max_exposure;
    int64_t  max_loss;
    uint32_t max_positions;
    uint32_t open_positions;
    uint32_t halted;
    uint32_t pad0;
    /* the most the open positions' closes can add to (take from) cash and
     * realized, each at a price in (0, ENG_BOOK_PRICE_MULT x entry]: the
     * opening keeps cash and realized + worst_gain <= INT64_MAX and
     * - worst_loss >= INT64_MIN, so every close within the band books */
    int64_t  worst_gain;
    int64_t  worst_loss;
} eng_books;

/*
 * One account record (5 lines):
 *
 *   line 0      | word | pad                                   |
 *   lines 1-2   | books[0]                                     |
 *   lines 3-4   | books[1]                                     |
 */
typedef struct eng_account {
    uint64_t word;           /* version << 24 | holder token */
    /* the opening's key (open_account(key=); 0 bytes: none): written only
     * while the record is free, by the opener holding the latch, before it
     * seals the open; stable while the record is open (see the accounts) */
    uint32_t key_len;
    uint32_t pad0;
    uint8_t  key[ENG_KEY_MAX];
    eng_books books[2];
} eng_account;

/* One row of Engine.accounts(): a consistent read of one open account. */
typedef struct eng_account_row {
    uint64_t id;
    uint64_t version;
    uint32_t index;
    uint32_t latched;        /* a holder had the latch when it was read */
    eng_books b;
    uint32_t key_len;        /* the opening's key (open_account(key=)); 0: none */
    uint8_t  key[ENG_KEY_MAX];
    uint32_t pad;
} eng_account_row;

/* One registry entry per attached Engine object (64 bytes). */
typedef struct eng_proc {
    uint32_t pid;            /* 0 = free; claimed by CAS 0 -> pid */
    uint32_t state;          /* ENG_PROC_* */
    uint64_t start_time;     /* /proc/<pid>/stat field 22 (0: unreadable); for tools */
    uint64_t attached_ns;
    uint32_t incarnation;    /* bumped on every claim; the token's high bits */
    uint32_t pad0;
    uint64_t pad[4];
} eng_proc;

/* Counters of one operation in one shard (512 bytes). */
typedef struct eng_op_metrics {
    uint64_t attempts;
    uint64_t applied;
    uint64_t invalid;
    uint64_t conflicts;
    uint64_t rejected;
    uint64_t halted;
    uint64_t errors;
    uint64_t retries;        /* failed CAS attempts and latch waits */
    uint64_t takeovers;      /* locks and latches taken from dead owners */
    uint64_t rolled_forward; /* of those, transitions a takeover completed */
    uint64_t rolled_back;    /* of those, transitions a takeover undid */
    uint64_t samples;        /* latencies recorded in hist */
    uint64_t max_ns;
    uint64_t pad[3];
    uint64_t hist[ENG_HIST_BUCKETS];
} eng_op_metrics;

typedef struct eng_shard {
    eng_op_metrics op[ENG_OP_COUNT];
} eng_shard;

/*
 * The segment header.  ready is written last, with release; attach reads it
 * with acquire before trusting anything else.
 */
/*
 * ---- the journal (native/journal.c) -------------------------------------------
 *
 * The latch word (eng_journal.latch, 64 bits):
 *
 *   63                                   24 23                 0
 *  +---------------------------------------+--------------------+
 *  | seq of the last published record      | holder token (0: free)
 *  +---------------------------------------+--------------------+
 *
 * One record (eng_jrec, 256 bytes: four lines), the record for seq k at
 * ring[k & (records - 1)]:
 *
 *   | seq | latch | ts_ns | id | word | kind trigger |  w[0 .. 23] | version | pad |
 *
 *  seq      k once the record is whole (written last, release); 0 while filled
 *  latch    the latch word it was filled under (a takeover's evidence)
 *  word     the state word the commit published (a takeover compares its
 *           generation with the slot's)
 *  kind     ENG_JK_*; trigger: the trigger of a transition
 *  w        the record words after the change; version its context version
 */
#define ENG_JOURNAL_DEFAULT_RECORDS 16384
#define ENG_JOURNAL_MIN_RECORDS 4
/* records one commit fills under one latch: the slot's, an open's key (an
 * open takes one), a booked change's account books (see journal_fill_riders) */
#define ENG_JOURNAL_MAX_FILL 3
#define ENG_JOURNAL_MAX_RECORDS 4194304
#define ENG_JOURNAL_PRICES   1       /* hdr.journal_flags: price writes are journaled */
#define ENG_JK_OPEN          0       /* the kinds, in engine.journal.KINDS order */
#define ENG_JK_TRANSITION    1
#define ENG_JK_RELEASE       2
#define ENG_JK_KEY           3
#define ENG_JK_ACCOUNT       4
#define ENG_JK_HALT          5
#define ENG_JK_PRICE         6
#define ENG_JREC_SIZE        256
/* The journal on disk (durability: native/durable.c writes, native/restore.c
 * reads; docs/durability.md).  A journal directory DIR (0700) holds, each file
 * 0600:
 *  meta.json      the engine's identity (format, name, capacity, spec, create
 *                 options), written once at create (tmp, fsync, rename).
 *  journal-<seq, 20 digits>.log  preallocated to its size at creation (a full
 *                 disk is an error then, never later); a file header of
 *                 ENG_DJ_FILE_HDR bytes (u32 magic ENG_DJ_FILE_MAGIC, u32
 *                 ENG_DJ_FORMAT, u32 ENG_DJ_FRAME_BYTES, u32 0, u64 the seq of
 *                 its first record, zeros), then frames back to back; the
 *                 first frame whose magic is 0 ends the file's records.
 *  checkpoint-<seq, 20 digits>.ckpt  written to a .tmp, fsynced, renamed:
 *                 a file header (u32 ENG_DJ_CKPT_MAGIC, u32 ENG_DJ_FORMAT,
 *                 u32 ENG_DJ_FRAME_BYTES, u32 0, u64 start seq = the journal
 *                 seq read before the scan began, u64 frames), then one frame
 *                 per object as the journal would record it (seq 0).
 * A frame (ENG_DJ_FRAME_BYTES): u32 ENG_DJ_FRAME_MAGIC, u32 the CRC-32C of
 * the ENG_JREC_SIZE bytes that follow, then the record as eng_journal_read
 * returns it. */
#define ENG_DJ_FORMAT        1
#define ENG_DJ_FILE_MAGIC    0x4C4A4E45u   /* "ENJL" little-endian */
#define ENG_DJ_CKPT_MAGIC    0x4B434E45u   /* "ENCK" */
#define ENG_DJ_FRAME_MAGIC   0x52464E45u   /* "ENFR" */
#define ENG_DJ_FILE_HDR      64
#define ENG_DJ_FRAME_BYTES   (8 + ENG_JREC_SIZE)
/* An account record's w (in the ring and on disk): the books (eng_books, 16
 * words), then the account's key (ENG_KEY_MAX bytes) and its length: a
 * restore gives the account its key back */
#define ENG_DJ_ACCT_KEY_WORD 16
#define ENG_DJ_ACCT_KEYLEN_WORD 22
/* back-off steps a committer waits for the journal latch (each past
 * ENG_YIELD_STEPS sleeps ENG_BACKOFF_SLEEP_NS: about 0.2 s): every commit
 * passes through it, so a holder preempted on a crowded host is waited for
 * longer than one slot's lock */
#define ENG_JOURNAL_WAIT_STEPS 4000

/* ---- the journal's file writer (native/durable.c; docs/durability.md) -------
 * hdr.journal_flags ENG_JOURNAL_DURABLE: the segment has a durable area
 * (eng_durable) and no record leaves the ring before the file writer wrote it. */
#define ENG_JOURNAL_DURABLE  2
#define ENG_DJ_PATH_MAX      1024          /* bytes of the directory's path, NUL included */
/* frames per journal file (a power of two): 65536 * 264 B = 16.5 MiB preallocated;
 * the file of seq k starts at seq 1 + ((k - 1) / this) * this */
#define ENG_DJ_FILE_RECORDS  65536
#define ENG_DJ_FILE_RECORDS_MIN 16
#define ENG_DJ_FILE_RECORDS_MAX 16777216
/* background fdatasync period (create's journal_sync_ms): what a power failure
 * can lose at most (plus one fdatasync); measured in bench/test_bench_durable.py */
#define ENG_DJ_SYNC_NS       5000000LL
#define ENG_DJ_SYNC_MIN_NS   100000LL
#define ENG_DJ_SYNC_MAX_NS   10000000000LL
/* checkpoints (create's checkpoint_records / checkpoint_s): every this many
 * records or this long after the last one with records since (0: never) */
#define ENG_DJ_CKPT_RECORDS  1000000ULL
#define ENG_DJ_CKPT_NS       60000000000LL
/* a committer waits this long for the writer to free a ring record, then
 * ENG_EJOURNALFULL; the writer watches its lease holder this often */
#define ENG_DJ_ROOM_WAIT_NS  2000000000LL
#define ENG_DJ_WATCH_NS      10000000LL
#define ENG_DJ_BATCH         512           /* frames per pwrite */
#define ENG_DJ_NAP_NS        50000         /* a writer that caught up naps this long before it sleeps */
#define ENG_DJ_CKPT_WRITE_EVERY 1024       /* a checkpoint by the writer writes the ring every this many objects */
#define ENG_DJ_RETRY_NS      100000000LL   /* a failed writer retries its reservation this often */
/* eng_durable.fault (tests only, eng_durable_fault; honoured where eng_test_faults is on) */
#define ENG_DJ_FAULT_NOSPACE 1             /* a reservation fails with ENOSPC */
#define ENG_DJ_FAULT_DIE_MIDWRITE 2        /* the writer writes half a batch, then SIGKILLs itself */
#define ENG_DJ_FAULT_DIE_IN_CKPT 4         /* a checkpoint SIGKILLs itself: its .tmp whole, not renamed */
#define ENG_DJ_FAULT_DIE_BEFORE_COMMIT_END 8  /* the writer SIGKILLs itself after written_seq, before written_commit_seq */
#define ENG_DJ_FAULT_DIE_IN_SYNC 16        /* an fdatasync SIGKILLs itself after reading written_seq, before the sync */

/*
 * The durable area (one per durable segment, after the journal ring):
 *
 *  line 0 (every commit reads it: journal_room)
 *   | written_seq | failure | room_waiting | reserved_seq | written_commit_seq |
 *   | durable_commit_seq | pad ...
 *  line 1 (the writer)
 *   | lease | writer_pid | durable_seq | sync_ns | file_records | ckpt_records |
 *   | ckpt_ns | ckpt_lock | fault | state |
 *  line 2 (checkpoints)
 *   | ckpt_start | ckpt_prev | ckpt_seq | ckpt_wall_ns | ckpt_mono_ns | checkpoints |
 *  then dir[ENG_DJ_PATH_MAX]: the journal directory, written once at setup
 */
typedef struct eng_durable {
    uint64_t written_seq;    /* every record <= it is in the files (pwrite done) */
    int32_t  failure;        /* 0, or the errno the writer failed with: commits refused
                                (> 0 a reservation, retried; < 0 -errno of a write or sync) */
    uint32_t room_waiting;   /* 1: a committer may sleep on written_seq's low half */
    uint64_t reserved_seq;   /* every seq <= it has its frame's place in a reserved file */
    uint64_t written_commit_seq;  /* a published seq <= written_seq (so it ends a commit) */
    uint64_t durable_commit_seq;  /* ... <= durable_seq: every commit <= it is whole on disk */
    uint64_t pad0[3];
    uint32_t lease;          /* token of the writer holding the lease (0: none) */
    uint32_t writer_pid;     /* its pid (for messages) */
    uint64_t durable_seq;    /* every record <= it is fdatasynced */
    int64_t  sync_ns;        /* background fdatasync period */
    uint64_t file_records;   /* frames per journal file */
    uint64_t ckpt_records;   /* a checkpoint every this many records (0: never) */
    int64_t  ckpt_ns;        /* ... or this long (0: never) */
    uint32_t ckpt_lock;      /* token of the process writing a checkpoint (0: none) */
    uint32_t fault;          /* ENG_DJ_FAULT_*: tests only */
    uint32_t state;          /* 0: directory not set yet, 1: set (setup done) */
    uint32_t pad1;
    uint64_t ckpt_start;     /* start seq of the newest checkpoint (0: none) */
    uint64_t ckpt_prev;      /* ... and of the one before */
    uint64_t ckpt_seq;       /* written_seq when the newest was written */
    int64_t  ckpt_mono_ns;   /* CLOCK_MONOTONIC then (this host) */
    uint64_t checkpoints;    /* checkpoints written */
    uint64_t pad2[3];
    char     dir[ENG_DJ_PATH_MAX];
} eng_durable;

/* What a refused commit saw (eng_durable_refusal): for its message. */
typedef struct eng_durable_info {
    uint64_t journal_seq;
    uint64_t written_seq;
    uint64_t durable_seq;    /* durable_commit_seq: every change <= it survives a power cut */
    uint64_t ckpt_start;
    uint64_t checkpoints;
    int32_t  failure;
    uint32_t writer_pid;
    uint32_t lease;
    uint32_t holder;         /* 1: this Engine holds the lease */
} eng_durable_info;

/* Process-local writer state (opaque: eng_dw_new / eng_dw_free). */
typedef struct eng_dw eng_dw;

typedef struct eng_journal {
    uint64_t latch;          /* seq << ENG_TOKEN_BITS | holder token, see above */
    uint32_t waiting;        /* 1: some reader may sleep on the latch word's low half */
    uint32_t pad0;
    uint64_t last_ts;        /* ts_ns of the last record filled (by the latch holder only) */
    uint64_t pad1[5];
} eng_journal;

typedef struct eng_jrec {
    uint64_t seq;
    uint64_t latch;
    int64_t  ts_ns;
    uint64_t id;
    uint64_t word;
    uint32_t kind;
    uint32_t trigger;
    uint64_t w[ENG_MAX_FIELD_WORDS];
    uint64_t version;
    uint32_t riders;         /* records after this one that ride on its commit (the
                                slot's record of a keyed open or a booked change;
                                0 for the others): a restore tells a whole commit
                                from one a power cut split */
    uint32_t pad;
} eng_jrec;

typedef struct eng_header {
    /* line 0: identity, written once by the creator */
    uint64_t magic;
    uint32_t layout_version;
    uint32_t ready;
    uint64_t segment_size;
    uint32_t capacity;
    uint32_t slot_size;
    uint64_t fingerprint;    /* of the machine spec */
    uint32_t n_states;
    uint32_t n_triggers;
    uint32_t initial_index;
    uint32_t closed_mask;    /* one-hot states that count as closed */
    uint32_t creator_pid;
    uint32_t pad0;
    /* line 1 */
    uint64_t created_ns;
    uint64_t registry_off;
    uint64_t shards_off;
    uint64_t slots_off;
    uint64_t journal_off;    /* 0: no journal */
    uint32_t journal_records;/* a power of two, or 0 */
    uint32_t journal_flags;  /* ENG_JOURNAL_PRICES, ENG_JOURNAL_DURABLE */
    uint64_t durable_off;    /* the durable area (0: no journal) */
    uint64_t pad1[1];
    /* line 2: controls, read on hot paths, written rarely (by C setters) */
    uint32_t halted;
    uint32_t metrics_on;
    uint32_t sample_mask;    /* latency sampled when (attempts & mask) == 0 */
    uint32_t fault_flags;    /* ENG_FAULT_*: tests only */
    uint64_t test_pause_ns;  /* slow path sleeps this long holding the lock (a keyed
                              * open_account: the key lock): tests only */
    uint64_t pad2[5];
    /* line 3: written by open and recover */
    uint32_t alloc_hint;
    uint32_t recovering;     /* 0 or the token of the Engine running eng_recover */
    uint64_t pad3[7];
    /* the transition table: table[state index * ENG_MAX_TRIGGERS + trigger]
     * = target index + 1, | ENG_RULE_GUARDED; 0 = no rule */
    uint8_t  table[ENG_MAX_STATES * ENG_MAX_TRIGGERS];
    /* after the table, line R: the record layout, written once */
    eng_rec_layout rec;      /* 56 bytes */
    uint32_t rec_size;       /* bytes of one record copy */
    uint32_t pad4;
    /* line K: keys, written once */
    uint64_t keyrecs_off;
    uint64_t keyidx_off;
    uint64_t stripes_off;
    uint32_t key_buckets;
    uint32_t tindex_buckets; /* token index buckets (a power of two) */
    uint64_t key_seed;       /* per-segment hash seed (keys and tokens) */
    uint64_t tindex_off;
    uint64_t pad7[2];
    /* line A: accounts, written once */
    uint64_t accounts_off;
    uint32_t max_accounts;
    uint32_t account_hint;   /* where open_account starts looking (relaxed RMW) */
    uint32_t acct_key_lock;  /* 0 or the token of the keyed open_account running */
    uint32_t pad9;
    uint64_t pad8[5];
} eng_header;

/* Process-local view of an attached segment (not shared). */
typedef struct eng_seg {
    uint8_t        *base;
    uint64_t        size;
    eng_header     *hdr;
    eng_proc       *registry;
    eng_shard      *shards;
    uint8_t        *slots;       /* slot i at slots + i * slot_size */
    eng_keyrec     *keyrecs;     /* slot i's records at keyrecs + i * kpp */
    uint64_t       *keyidx;
    uint32_t       *stripes;
    uint64_t       *tindex;      /* token index bucket words */
    eng_account    *accounts;
    eng_shard      *me;          /* this Engine's shard */
    uint32_t        slot_size;
    uint32_t        rec_size;
    uint32_t        n_words;
    uint32_t        kpp;         /* keys per position */
    uint32_t        key_buckets;
    uint32_t        tindex_buckets;
    uint32_t        pad1;
    uint32_t        pnl;         /* 1: the spec has entry_price, amount and side */
    uint64_t        key_seed;
    uint8_t         roles[ENG_ROLE_COUNT];
    uint32_t        capacity;
    uint32_t        n_triggers;
    uint32_t        pid;
    uint32_t        proc_index;
    uint32_t        token;       /* this Engine's fencing token */
    uint32_t        fork_epoch;  /* the process-wide fork count at attach */
    int32_t         fd;          /* the segment file, opened apart from the mapping:
                                    it holds the liveness lock */
    uint32_t        pad0;
    uint64_t        fd_dev;      /* fstat of fd at attach: a liveness answer is */
    uint64_t        fd_ino;      /* trusted only while fd still names this file */
    uint64_t        last_old_word;   /* state words around this Engine's last */
    uint64_t        last_new_word;   /* applied transition (for stress logs) */
    uint32_t        max_accounts;
    uint32_t        acct_role;   /* word of the account field, or ENG_ROLE_NONE */
    eng_books       last_books;  /* the books a refused booking was checked against */
    int64_t         last_amount; /* and the money it asked for (notional, withdrawal) */
    uint32_t        gate_calls;  /* the close gate (segment.c): calls in flight ... */
    uint32_t        gate_shut;   /* ... and 1 once close began: calls entering refuse */
    eng_journal    *journal;     /* NULL: the engine has no journal */
    eng_jrec       *jring;
    uint64_t        jrecords;
    uint32_t        jprices;     /* price writes are journaled */
    uint32_t        jtrigger;    /* the trigger of the transition being committed */
    int64_t         jts;         /* the time of the record being appended */
    uint32_t        exit_armed;  /* exits: the armed one-hot state (0: the spec has none) */
    uint32_t        exit_trigger;
    uint32_t        reopens;     /* 1: a rule leaves a closed state (booking refused) */
    uint32_t        pad2;
    eng_durable    *durable;     /* NULL: the journal is not written to files */
} eng_seg;

/* Record words a transition changes, atomically with the state. */
typedef struct eng_ctx_update {
    uint32_t mask;           /* bit i: set word i to w[i] */
    uint32_t pad;
    uint64_t w[ENG_MAX_FIELD_WORDS];
} eng_ctx_update;

/* A consistent price read (what Engine.price returns). */
typedef struct eng_price_out {
    double   price;
    int64_t  ts_ns;
    double   pnl_pct;
    double   pnl_usd;
    uint64_t version;
} eng_price_out;

/* A consistent record read (what Engine.context returns). */
typedef struct eng_ctx_out {
    uint64_t w[ENG_MAX_FIELD_WORDS];
    uint64_t version;
} eng_ctx_out;

/* One row of a snapshot: state, context and price of one opening, read
 * together (the state word did not move while they were read). */
typedef struct eng_row {
    uint64_t id;
    uint32_t slot;
    uint32_t state;          /* one-hot code */
    uint32_t generation;
    uint32_t locked;
    uint64_t transitions;
    double   price;
    int64_t  price_ts_ns;
    double   pnl_pct;
    double   pnl_usd;
    uint64_t price_version;
    uint64_t context_version;
    uint64_t w[ENG_MAX_FIELD_WORDS];   /* the record's fields */
} eng_row;

/* What eng_recover did. */
typedef struct eng_recover_report {
    uint32_t rolled_forward;     /* interrupted transitions completed */
    uint32_t rolled_back;        /* interrupted transitions undone */
    uint32_t price_latches;      /* price writer latches released */
    uint32_t procs_removed;      /* dead registry entries removed */
    uint32_t keys_cleared;       /* key records, index cells and stripe locks of
                                    dead inserters and released openings */
    uint32_t accounts_forward;   /* account changes of dead holders completed */
    uint32_t accounts_back;      /* account changes of dead holders undone */
    uint32_t tindex_repaired;    /* token index: dead bucket locks released and
                                    entries of free slots unlinked */
    uint32_t removed_pids[ENG_MAX_PROCS];
} eng_recover_report;

/* A guard: called by eng_guard_transition with the slot locked; returns 1 to
 * commit, 0 to reject, < 0 if it failed (nothing is changed). */
typedef int (*eng_guard_fn)(void *user, uint64_t id, uint32_t source_index,
                            uint32_t trigger);

/* ---- functions ----------------------------------------------------------- */
int      eng_noop(void);
const char *eng_strerror(int code);
uint64_t eng_segment_size(uint32_t capacity, uint32_t n_words, uint32_t keys_per_position,
                          uint32_t max_accounts);
int      eng_format(void *base, uint64_t size, uint32_t capacity,
                    const uint8_t *table, uint32_t n_states, uint32_t n_triggers,
                    uint32_t initial_index, uint32_t closed_mask,
                    uint64_t fingerprint, uint32_t creator_pid, const eng_rec_layout *rec,
                    uint32_t max_accounts, uint32_t journal_records, uint32_t journal_flags);
/* eng_segment_size for a ring of journal_records records (0: no journal;
 * Engine.create's default is ENG_JOURNAL_DEFAULT_RECORDS); eng_segment_size
 * is it with no journal (journal=None) */
uint64_t eng_segment_size_journal(uint32_t capacity, uint32_t n_words,
                                  uint32_t keys_per_position, uint32_t max_accounts,
                                  uint32_t journal_records);
int      eng_validate(const void *base, uint64_t size, uint64_t fingerprint);
/* eng_validate, also naming the first bad header word and its value */
int      eng_validate_detail(const void *base, uint64_t size, uint64_t fingerprint,
                             const char **out_field, uint64_t *out_value);
int      eng_attach(eng_seg *s, void *base, uint64_t size, uint64_t fingerprint, int fd);
/* eng_attach opening its own liveness descriptor on path (dev/ino: the mapped
 * file), known to the fork hook from birth; 0, < 0 a code, > 0 an errno. */
int      eng_attach_path(eng_seg *s, void *base, uint64_t size, uint64_t fingerprint,
                         const char *path, uint64_t dev, uint64_t ino);
void     eng_detach(eng_seg *s);
int      eng_check(eng_seg *s);
int      eng_gate_enter(eng_seg *s);
void     eng_gate_leave(eng_seg *s);
uint32_t eng_gate_shut(eng_seg *s);
void     eng_gate_open(eng_seg *s);

int      eng_open(eng_seg *s, const uint64_t *words, const char *key, uint32_t key_len,
                  uint64_t *out_id, uint64_t *out_word);
int      eng_abandon_open(eng_seg *s, uint64_t id, uint64_t word);
int      eng_release_position(eng_seg *s, uint64_t id);
int      eng_transition(eng_seg *s, uint64_t id, uint32_t trigger);
int      eng_transition_ctx(eng_seg *s, uint64_t id, uint32_t trigger,
                            const eng_ctx_update *update);
int      eng_guard_transition(eng_seg *s, uint64_t id, uint32_t trigger,
                              const eng_ctx_update *update, eng_guard_fn guard,
                              void *user);
int      eng_state(eng_seg *s, uint64_t id);
int      eng_state_word(eng_seg *s, uint32_t slot, uint64_t *out_word);
int      eng_id_of(eng_seg *s, uint32_t slot, uint64_t *out_id);

int      eng_update_price(eng_seg *s, uint64_t id, double price);
/* The clock of price timestamps (see "price timestamps" above): with mode
 * ENG_CLOCK_REALTIME or ENG_CLOCK_TSC sets it for the process (TSC only where
 * it is usable); returns the mode in effect.  A negative mode only asks. */
int      eng_price_clock(int mode);
/* CLOCK_REALTIME in ns, as a price write of this thread reads it now. */
int64_t  eng_price_clock_ns(void);
/* update_prices: only the arrays are checked up front (one id out of range or
 * with opening 0, or one bad price, refuses the call with its index in
 * *out_bad_index); an id whose opening is not open when its turn comes is
 * skipped; *out_written counts what was written (see "prices" in prices.c). */
int      eng_update_prices(eng_seg *s, const uint64_t *ids, const double *prices,
                           uint64_t n, uint64_t *out_bad_index, uint64_t *out_written);
int64_t  eng_update_token_price(eng_seg *s, int64_t token, double price);
int      eng_read_price(eng_seg *s, uint64_t id, eng_price_out *out);
int      eng_read_context(eng_seg *s, uint64_t id, eng_ctx_out *out);

/* Vector calls: one bad id refuses the whole call, with its index in
 * *out_bad_index (see "vector calls" in prices.c).  transition_many then
 * tries every element and leaves in *out_bad_index the first that failed
 * with an error (out[i] = ENG_MANY_ERROR | -code), or n. */
int      eng_states(eng_seg *s, const uint64_t *ids, uint64_t n, uint16_t *out,
                    uint64_t *out_bad_index);
int      eng_prices(eng_seg *s, const uint64_t *ids, uint64_t n, eng_price_out *out,
                    uint64_t *out_bad_index);
int      eng_transition_many(eng_seg *s, const uint64_t *ids, const uint32_t *triggers,
                             uint64_t n, uint8_t *out, uint64_t *out_bad_index);

/* Token index inspection (tests, tools; exact only at a quiescent point):
 * out[0] slots not free missing from their token's chain, out[1] chain
 * entries of free slots, out[2] chain entries whose tbucket or token hash
 * names another bucket, out[3] entries in all chains. */
int      eng_tindex_check(eng_seg *s, uint64_t *out);
/* The slots on token's chain whose token hint is token (free ones too). */
int      eng_tindex_slots(eng_seg *s, int64_t token, uint32_t *out, uint32_t max,
                          uint32_t *out_n);

int      eng_bind_key(eng_seg *s, uint64_t id, const char *key, uint32_t key_len);
/* the id of the open opening holding the key, 0 if none, or an error (< 0) */
int64_t  eng_lookup(eng_seg *s, const char *key, uint32_t key_len);
int      eng_keys(eng_seg *s, uint64_t id, eng_key *out, uint32_t max, uint32_t *out_n);

/* key: NULL for none; else unique among open accounts (ENG_EKEYEXISTS) */
int      eng_open_account(eng_seg *s, int64_t cash, int64_t max_exposure,
                          uint32_t max_positions, int64_t max_loss, const char *key,
                          uint32_t key_len, uint64_t *out_id);
/* the id of the open account holding the key, 0 if none, or an error (< 0) */
int64_t  eng_lookup_account(eng_seg *s, const char *key, uint32_t key_len);
int      eng_close_account(eng_seg *s, uint64_t id);
int      eng_read_account(eng_seg *s, uint64_t id, eng_account_row *out);
int      eng_deposit(eng_seg *s, uint64_t id, int64_t amount);
int      eng_withdraw(eng_seg *s, uint64_t id, int64_t amount);
int      eng_halt_account(eng_seg *s, uint64_t id, uint32_t on);
int      eng_update_account(eng_seg *s, uint64_t id, uint64_t version, int64_t max_exposure,
                            uint32_t max_positions, int64_t max_loss, uint32_t halted,
                            uint32_t attempt);
int      eng_accounts(eng_seg *s, eng_account_row *rows, uint32_t max_rows, uint32_t *out_n);
int64_t  eng_money_of(double price, double amount);

int      eng_wait_change(eng_seg *s, uint64_t id, int64_t since, int64_t timeout_ns,
                         int64_t *out_since);
int      eng_snapshot(eng_seg *s, eng_row *rows, uint32_t max_rows, uint32_t *out_n);
int      eng_recover(eng_seg *s, eng_recover_report *out);
/* the journal (native/journal.c): the last published seq (0: none, or no
 * journal); up to max records with seq > after (ENG_ELAPPED: one was
 * overwritten, *out_resume the oldest retained); a wait for a seq > after */
uint64_t eng_journal_seq(eng_seg *s);
int      eng_journal_read(eng_seg *s, uint64_t after, eng_jrec *out, uint32_t max,
                          uint32_t *out_n, uint64_t *out_resume);
int      eng_journal_wait(eng_seg *s, uint64_t after, int64_t timeout_ns, uint64_t *out_seq);
/* the journal's file writer (native/durable.c) */
uint32_t eng_crc32c(uint32_t crc, const void *p, uint64_t n);
int      eng_crc32c_hw(void);
eng_dw  *eng_dw_new(void);
void     eng_dw_free(eng_dw *w);
void     eng_dw_stop(eng_dw *w, uint32_t stop);
int      eng_durable_setup(eng_seg *s, const char *dir, int64_t sync_ns, uint64_t file_records,
                           uint64_t ckpt_records, int64_t ckpt_ns);
int      eng_durable_continue(eng_seg *s, uint64_t seq);
int      eng_durable_run(eng_seg *s, eng_dw *w);
int      eng_durable_flush(eng_seg *s, eng_dw *w, int64_t timeout_ns, uint64_t *out_seq);
int      eng_durable_release(eng_seg *s, eng_dw *w, int64_t timeout_ns, uint64_t *out_seq);
int      eng_durable_checkpoint(eng_seg *s, eng_dw *w, uint64_t *out_start);
int      eng_durable_info_of(eng_seg *s, eng_durable_info *out);
void     eng_durable_refusal(eng_durable_info *out);
int      eng_durable_fault(eng_seg *s, uint32_t flags);
int      eng_durable_dir(eng_seg *s, char *out, uint32_t max);
int      eng_proc_alive(uint32_t pid, uint64_t start_time);
int      eng_entry_held(int fd, uint64_t registry_off, uint32_t entry);
int      eng_owner_alive(eng_seg *s, uint32_t token);
uint64_t eng_proc_start_time(uint32_t pid);

int      eng_set_halt(eng_seg *s, uint32_t on);
int      eng_set_metrics(eng_seg *s, uint32_t on, uint32_t sample_mask);
int      eng_set_faults(eng_seg *s, uint32_t flags, uint64_t pause_ns);
/* This process's test fault switch (see "test faults" in segment.c): on >= 0
 * sets it; returns it (1 on).  Off until ENGINE_TEST_FAULTS=1 or a call. */
int      eng_test_faults(int on);
int      eng_test_hold(eng_seg *s, uint32_t what, uint64_t id);
/* Tests only, this process only (no segment word sets it): recover() calls fn
 * between its sweep and freeing the entries of gone owners; NULL: none. */
typedef void (*eng_test_hook_fn)(void);
void     eng_test_recover_hook(eng_test_hook_fn fn);

/* ---- journal readers (engine/journal.py) ------------------------------------
 * events(spin_us=): microseconds a follower with nothing to read keeps looking
 * (the GIL held, one core busy) before it sleeps in eng_journal_wait; a commit
 * inside the window is seen without a futex wake.  The default and why:
 * docs/journal.md, "Commit to subscriber". */
#define ENG_JOURNAL_SPIN_US      20
#define ENG_JOURNAL_SPIN_MAX_US  10000
/* restore (native/restore.c): a fresh segment, not ready, placed from the
 * journal on disk (see there); eng_dj_*: the on-disk format's checks */
int      eng_restore_format(eng_seg *s, void *base, uint64_t size, uint32_t capacity,
                            const uint8_t *table, uint32_t n_states, uint32_t n_triggers,
                            uint32_t initial_index, uint32_t closed_mask, uint64_t fingerprint,
                            uint32_t creator_pid, const eng_rec_layout *rec,
                            uint32_t max_accounts, uint32_t journal_records,
                            uint32_t journal_flags);
int      eng_restore_slots(eng_seg *s, const eng_jrec *recs, uint64_t n_recs,
                         const uint64_t *idx, uint64_t n, uint64_t *out_bad);
int      eng_restore_prices(eng_seg *s, const eng_jrec *recs, uint64_t n_recs,
                         const uint64_t *idx, uint64_t n, uint64_t *out_bad);
int      eng_restore_keys(eng_seg *s, const eng_jrec *recs, uint64_t n_recs,
                         const uint64_t *idx, uint64_t n, uint64_t *out_bad);
int      eng_restore_accounts(eng_seg *s, const eng_jrec *recs, uint64_t n_recs,
                         const uint64_t *idx, uint64_t n, uint64_t *out_bad);
int      eng_restore_ring(eng_seg *s, const eng_jrec *recs, uint64_t n);
int      eng_restore_finish(eng_seg *s, uint32_t halted, uint64_t next_seq, int64_t last_ts,
                            uint64_t *out_bad);
uint32_t eng_dj_crc32c(uint32_t crc, const void *data, uint64_t n);
int      eng_dj_check_frames(const uint8_t *buf, uint64_t n, uint8_t *out);

/* cdef-end */

/* ---- layout checks --------------------------------------------------------- */
#include <stddef.h>
_Static_assert(sizeof(eng_price_rec) == 32, "price record is 32 bytes");
_Static_assert(sizeof(eng_ctx_rec) == 8 * (ENG_REC_META_WORDS + ENG_MAX_FIELD_WORDS), "record words");
_Static_assert(sizeof(eng_slot) == ENG_SLOT_HEAD, "slot head is two lines");
_Static_assert(offsetof(eng_slot, price) == ENG_CACHE_LINE, "prices on line 1");
_Static_assert(sizeof(eng_keyrec) == ENG_CACHE_LINE, "key record is one line");
_Static_assert(offsetof(eng_keyrec, key) + ENG_KEY_MAX == sizeof(eng_keyrec), "key ends the record");
_Static_assert(ENG_KEY_BUCKET * 8 == ENG_CACHE_LINE, "a bucket is one line");
_Static_assert(ENG_MAX_KEYS_PER_POSITION <= 8, "r fits 3 bits");
_Static_assert(ENG_KC_SLOT_SHIFT == ENG_KC_R_SHIFT + 3 && ENG_KC_SLOT_SHIFT + ENG_ID_SLOT_BITS == 63, "cell fields");
_Static_assert(ENG_KC_R_SHIFT == ENG_KC_GEN_SHIFT + 16 && ENG_KC_FP_MASK + 1 == 1ULL << ENG_KC_GEN_SHIFT, "cell fields");
_Static_assert(sizeof(eng_key) + sizeof(uint64_t) == sizeof(eng_keyrec), "a key record is a tag and an eng_key");
_Static_assert(ENG_MAX_FIELD_WORDS <= 32, "update mask is 32 bits");
_Static_assert(sizeof(eng_rec_layout) == 56, "record layout");
_Static_assert(ENG_ROLE_EXIT_PRICE < ENG_ROLE_COUNT, "exit roles fit");
_Static_assert(ENG_MAX_STATES < ENG_EXITS_NONE && ENG_MAX_TRIGGERS - 1 <= 0xFF, "exit state and trigger fit a byte");
_Static_assert(offsetof(eng_slot, opening) < ENG_CACHE_LINE, "opening beside the word");
_Static_assert(offsetof(eng_slot, tbucket) < ENG_CACHE_LINE, "token links beside the word");
_Static_assert(offsetof(eng_slot, pnl_size) + sizeof(uint64_t) <= ENG_CACHE_LINE &&
               offsetof(eng_slot, pword) < ENG_CACHE_LINE, "PnL inputs on the price word's line");
_Static_assert(ENG_TB_HEAD_SHIFT >= ENG_TOKEN_BITS && ENG_MAX_CAPACITY < (1ULL << (64 - ENG_TB_HEAD_SHIFT)), "bucket word fields");
_Static_assert(offsetof(eng_slot, transitions) % 8 == 0, "futex word aligned");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "futex word is the low half of transitions");
_Static_assert(sizeof(eng_proc) == ENG_CACHE_LINE, "registry entry is one line");
_Static_assert(sizeof(eng_op_metrics) % ENG_CACHE_LINE == 0, "metrics padded to lines");
_Static_assert(offsetof(eng_header, created_ns) == ENG_CACHE_LINE, "header line 1");
_Static_assert(offsetof(eng_header, halted) == 2 * ENG_CACHE_LINE, "header line 2");
_Static_assert(offsetof(eng_header, alloc_hint) == 3 * ENG_CACHE_LINE, "header line 3");
_Static_assert(offsetof(eng_header, table) == 4 * ENG_CACHE_LINE, "table after line 3");
_Static_assert(offsetof(eng_header, rec) % ENG_CACHE_LINE == 0, "record layout on its own line");
_Static_assert(offsetof(eng_header, keyrecs_off) == offsetof(eng_header, rec) + ENG_CACHE_LINE, "keys line");
_Static_assert(offsetof(eng_header, accounts_off) == offsetof(eng_header, keyrecs_off) + ENG_CACHE_LINE, "accounts line");
_Static_assert(sizeof(eng_header) == ENG_HEADER_SIZE, "header size");
_Static_assert(sizeof(eng_journal) == ENG_CACHE_LINE, "journal latch line");
_Static_assert(sizeof(eng_jrec) == ENG_JREC_SIZE, "journal record");
_Static_assert(offsetof(eng_durable, lease) == ENG_CACHE_LINE &&
               offsetof(eng_durable, ckpt_start) == 2 * ENG_CACHE_LINE &&
               offsetof(eng_durable, dir) == 3 * ENG_CACHE_LINE, "durable area lines");
_Static_assert((ENG_DJ_FILE_RECORDS & (ENG_DJ_FILE_RECORDS - 1)) == 0, "file records: a power of two");
_Static_assert(ENG_DJ_FRAME_BYTES == 264 && ENG_DJ_FILE_HDR % 8 == 0, "frame size");
_Static_assert(ENG_DJ_ACCT_KEY_WORD * 8 == sizeof(eng_books) &&
               ENG_DJ_ACCT_KEYLEN_WORD == ENG_DJ_ACCT_KEY_WORD + ENG_KEY_MAX / 8 &&
               ENG_DJ_ACCT_KEYLEN_WORD < ENG_MAX_FIELD_WORDS, "an account record: books, key, length");
_Static_assert(ENG_JOURNAL_MAX_FILL < ENG_JOURNAL_MIN_RECORDS, "one commit's records fit the ring");
_Static_assert((ENG_JOURNAL_MIN_RECORDS & (ENG_JOURNAL_MIN_RECORDS - 1)) == 0 &&
               (ENG_JOURNAL_MAX_RECORDS & (ENG_JOURNAL_MAX_RECORDS - 1)) == 0, "powers of two");
_Static_assert(sizeof(eng_books) == 2 * ENG_CACHE_LINE, "books are two lines");
_Static_assert(offsetof(eng_account, books) == ENG_CACHE_LINE, "books after the word's line");
_Static_assert(sizeof(eng_account) % ENG_CACHE_LINE == 0, "account padded to lines");
_Static_assert(ENG_AW_VERSION_SHIFT == ENG_TOKEN_BITS, "account word: token below version");
_Static_assert(ENG_MAX_ACCOUNTS <= (1u << ENG_ID_SLOT_BITS), "account index fits the id");
_Static_assert(ENG_ROLE_ACCOUNT < ENG_ROLE_COUNT, "account role fits");
_Static_assert(ENG_HEADER_SIZE % ENG_CACHE_LINE == 0, "header padded to lines");
_Static_assert(ENG_MAX_STATES <= ENG_SW_TARGET_MASK + 1, "target index fits the word");
_Static_assert(ENG_MAX_STATES <= 16, "one-hot state fits 16 bits");
_Static_assert(ENG_MAX_STATES < ENG_RULE_TARGET_MASK, "rule target fits its mask");
_Static_assert(ENG_SW_GEN_SHIFT == ENG_SW_TARGET_SHIFT + 4, "generation above target");
_Static_assert(ENG_SW_OWNER_SHIFT == ENG_SW_GEN_SHIFT + 16, "owner above generation");
_Static_assert(ENG_SW_OWNER_SHIFT + ENG_TOKEN_BITS <= 64, "owner token fits the word");
_Static_assert(ENG_PW_SEQ_SHIFT == ENG_TOKEN_BITS, "price word: token below sequence");
_Static_assert((1u << ENG_TOKEN_ENTRY_BITS) == ENG_MAX_PROCS, "token entry bits cover the registry");
_Static_assert(ENG_TOKEN_ENTRY_BITS + 17 == ENG_TOKEN_BITS, "token = incarnation | entry");
_Static_assert((1ULL << ENG_ID_SLOT_BITS) == ENG_MAX_CAPACITY, "id slot bits cover the capacity");
_Static_assert(ENG_ID_MAX >> ENG_ID_SLOT_BITS == 0xFFFFFFFFULL, "id opening is 32 bits");

#endif /* ENGINE_H */
