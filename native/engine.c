/*
 * engine.c - atomics, transitions, latch-seqlock records, futex waits,
 * liveness and recovery for the shared-memory state engine.
 *
 * These files are the only place in the project with atomics.  Every atomic
 * access names its memory order; every ordered access says what it pairs with.
 *
 * One translation unit, as SQLite's amalgamation is: the build compiles this
 * file only, and it includes every part below, in this order (each part may
 * use what the parts before it define), so the compiler still sees the whole
 * engine and inlines the helpers into the hot calls.  No part is compiled on
 * its own.  Where each protocol block lives:
 */
#define _GNU_SOURCE

/* atomics, back-off, clocks, state word, ids, metrics timers, liveness, futex */
#include "internal.h"
/* fork, layout, test faults, format/validate/attach, the close gate */
#include "segment.c"
/* the latch-seqlock, the price word (price latch), contexts, id checks, call preambles */
#include "records.h"
/* the journal: every commit's record, in one order (its model: journal.pml) */
#include "journal.c"
/* the journal on disk: the file writer, flush, checkpoints (journal_room) */
#include "durable.c"
/* transitions: the fast and slow paths, commit, takeover */
#include "transitions.c"
/* accounts: books that move with the positions booked on them */
#include "accounts.c"
/* keys: unique, lock-free to look up (invariants I1-I7) */
#include "keys.c"
/* the token index: positions by token */
#include "token_index.c"
/* open and release */
#include "positions.c"
/* prices, the vector calls, waiting for a change, snapshot */
#include "prices.c"
/* recovery and the controls */
#include "recovery.c"
/* restore: a fresh segment placed from the journal on disk, ready last */
#include "restore.c"
