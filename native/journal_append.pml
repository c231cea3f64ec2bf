/*
 * The journal's append protocol, per object (`make verify`; the C code is
 * native/journal.c, whose protocol comment carries the same step names).
 *
 * No global latch: a change journals while ITS OBJECT's lock is held (a
 * slot's lock bit, an account's latch, a key stripe, the halt lock), so the
 * records of one object are in its lock order.  The ring's records carry a
 * header word hdr = (lap, state, writer); lap(k) = (k - 1) / N + 1 for seq k
 *
 *   writer of object o (holds o's lock: lock[o] = me)
 *     R  resolve o's pending record jpend[o] (a dead or finished previous
 *        holder's, see resolve) before anything else
 *     C1 journal_claim: t = tail; ring[t % N].hdr (lap(t)-1, DONE|VOID, *) ->
 *        (lap(t), CLAIMED, me) by CAS, then tail t -> t+1 by CAS (a claimer
 *        that finds ring[t] already claimed at lap(t) moves tail on for it);
 *        a previous-lap record still CLAIMED/FILLED: resolve it if its writer
 *        is dead, or if it is FILLED and its evidence proves it committed
 *        (a live writer stopped between C3 and C4: completed, not waited
 *        for), else refuse (CONFLICT): only the wrap waits, and only for a
 *        stopped writer whose change has not committed.  Then jpend[o] = t + 1.
 *     C2 fill the record (object, the generation the commit publishes),
 *        hdr CLAIMED -> FILLED
 *     C3 the object's commit (generation + 1) and unlock: one CAS
 *     C4 hdr FILLED -> DONE by CAS (a resolver may have done it); jpend[o]
 *        (t + 1) -> 0 by CAS
 *     or give up after C1/C2 (its commit refused): hdr -> VOID, unlock
 *
 *   resolve record k (a reader, a claimer wrapping onto it, recover(), the
 *   next holder of its object), in four steps, none atomic with another:
 *     H  read the header and the fields (object, generation)
 *     P  prove the header's writer dead (token_dead) or not
 *     G  read the object's generation (the evidence)
 *     X  CAS the header from exactly what H read: CLAIMED, writer dead ->
 *        VOID (C3 follows C2); FILLED, the generation reached the record's
 *        -> DONE (writer dead or alive); FILLED, not reached, writer dead ->
 *        VOID; else leave it (wait).
 *   P before G: read the other way, a writer that commits (C3) and dies
 *   between the two reads is proven dead with evidence of no commit, and its
 *   committed change's record is voided.  P then G is exact: once the writer
 *   is dead its commit cannot happen after G, and the object cannot commit
 *   again before its next holder has resolved jpend (R).  The CAS from H's
 *   header fails if the record moved meanwhile (ABA: the header holds the
 *   lap).
 *
 *   takeover of object o locked by a dead T: take the lock over, R, then
 *   forward iff T sealed its change (the sealed copy): C1..C4 with ITS OWN
 *   record (never T's, which R voided); else back: unlock, no record.
 *
 *   reader (follows the ring from seq 1 across wraps): record k with hdr
 *   (lap(k), DONE): copy, re-read hdr, deliver iff unchanged; (lap(k), VOID):
 *   skip (an abandoned claim is not a change: a gap in seq that is not a
 *   lost record); (lap(k), CLAIMED/FILLED): resolve, or wait; lap > lap(k):
 *   JournalLappedError, resume at the oldest retained seq.
 *
 * Writers: two on object 0, one on object 1 (three claims through a ring of
 * two: the wrap); each may die at any step (up to MAXDEATHS), one may stop
 * for good at any step (SIGSTOP; its end state is valid).  A writer of the
 * other object that waits forever on it is an invalid end state: Spin
 * reports it.  Asserted: a record is DONE only for a commit and VOID only
 * for a claim that never committed; every committed change has exactly one
 * DONE record (after the recover() sweep at the end); the reader delivers
 * each object's generations one by one (per-object order = seq order, no
 * silent gap, no duplicate) and skips only VOID records; a claim at the wrap
 * refuses only a record whose change has not committed.  Every resolve
 * (R, the claim's, the reader's) runs its steps H, P, G, X interleaved with
 * everything else; only the recover() sweep at the end, with every writer
 * dead, stopped or done, is one step.
 *
 * STATUS: modelled, NOT implemented.  native/journal.c still runs the global
 * latch (native/journal.pml).  What the C code needs, per kind (worked out
 * against the code of this commit; each line names a decision the model
 * leaves to the implementation):
 *  - ring: eng_jrec.latch becomes hdr (lap << 32 | state << 24 | writer
 *    token); eng_journal.latch becomes tail (the next seq), plus a done-seq
 *    hint for eng_journal_seq and a wake word for readers' futex (C4 bumps
 *    it only when `waiting` is set, seq_cst pair as today).
 *  - resolve: its four steps in this order, each its own access: H the
 *    header (acquire) and the fields (relaxed, then an acquire fence), P
 *    token_dead of the header's writer, G the object's evidence (acquire;
 *    per kind as journal_committed), X CAS of the header word exactly as H
 *    read it (acq_rel).  Never the evidence before the proof (MUTANT 6).
 *  - the claim at the wrap (C1) completes a previous-lap FILLED record its
 *    evidence proves committed, whatever its writer's liveness (X: FILLED ->
 *    DONE; the writer's own C4 CAS then fails, which it ignores), and waits
 *    (bounded, then CONFLICT) only for a CLAIMED record or a FILLED one not
 *    proven committed, of a live writer (MUTANT 7).
 *  - riders (today's latch: journal_fill_riders, an open's key and a booked
 *    change's books filled at n+2, n+3 and published with the slot's): no
 *    latch holds them next to the slot's record here.  Each needs a claim of
 *    its own, filled before the slot's C3, whose evidence is the SLOT's
 *    generation (it committed iff the slot did), or one claim of 1 + r
 *    consecutive records; not modelled yet.  The "one record" of a booked
 *    change below predates the riders.
 *  - jpend needs a word per object written under its lock: the slot head is
 *    full (two lines), so either a third head line (layout version + 1,
 *    slot_size + 64) or a per-slot array padded to a line in the journal
 *    region (never one line for 8 slots: disjoint-slot writers would share
 *    it).  Accounts: a u64 in eng_account (pad0 is 32 bits: too small for
 *    a seq).  Key stripes: an array beside s->stripes.  Halt: a lock word
 *    and a jpend in the header.
 *  - open / slow transition / booked open and close (ctx_publish): the slot
 *    lock is held: R, C1, C2, C3 = the CAS L -> new word, C4.  A booked
 *    change has one record (the slot's); the account's B6 publish is not a
 *    change of its own.
 *  - fast transition with the journal: CAS w -> L (lock), R, C1..C4; the
 *    journal-off path stays one CAS (make same-code).  A holder dead before
 *    C3 is rolled BACK by takeover (nothing sealed), which sets the error
 *    flag today (sw_unlocked(L) | E): a fast transition killed mid-append
 *    would leave E set, unlike today; needs a decision (back without E when
 *    the copy was never sealed under L).
 *  - release / abandon_open (journal_commit): today one CAS from an
 *    unlocked word; under the per-object rule they must lock first, and the
 *    locked word needs a target (state 0 is no one-hot index): a "to free"
 *    target code, and takeover's back path for it.
 *  - takeover (slot): re-own the lock (CAS L -> L with our token), R (T's
 *    record: CLAIMED -> VOID; FILLED -> VOID, the generation did not move),
 *    decide forward by the seal == L read BEFORE re-owning, then C1..C4 with
 *    our own record filled from the sealed copy.  A takeover that dies after
 *    re-owning leaves L' whose seal check fails: the next takeover rolls
 *    back (nothing had committed: allowed).
 *  - account alone (acct_commit, acct_resolve forward): the account latch
 *    is the lock; C3 = acct_publish; evidence = version, as journal_committed.
 *  - key (bind_key): the stripe lock is the lock; C3 = I6; evidence = tag ==
 *    HELD(id).  That evidence is NOT stable: keys_drop (release, abandon)
 *    clears the tag without the stripe lock, so a dead inserter's FILLED
 *    record resolved after a release reads as not committed.  Fix first:
 *    C4 before I7 (stripe unlock) and keys_drop resolving the stripe's
 *    jpend, or a key record generation in the evidence.
 *  - halt: a halt lock word; C3 = the flag CAS.
 *  - price (journal_prices): the price latch is the lock; C3 =
 *    price_publish; the open's own price publish needs no journal at all.
 *  - recover(): sweep the ring from the done hint to tail resolving every
 *    record of a dead writer; journal_sweep's latch takeover goes away.
 *  - fork: a child holds no lock and no claim (its token is not the
 *    parent's); nothing to do beyond today's close-in-child.
 *  - readers: eng_journal_read skips VOID records; a read whose records are
 *    all VOID returns n = 0, so a follower calling wait/read in a loop would
 *    spin on them: *out_resume (today 0 unless ENG_ELAPPED) should carry the
 *    last seq examined, and engine/journal.py (the `follow` branch) use it.
 *    Tests that assert seqs 1, 2, 3 ... with no gap (tests/test_journal.py
 *    assert_record_iff_commit) must allow VOID gaps after a kill.
 *
 * MUTANT (spin -DMUTANT=n) breaks one step; `make verify` checks each fails:
 *   1  the record filled after the commit (C3 before C2) with no completion:
 *      a writer dead between C3 and C2 leaves a CLAIMED record, voided
 *   2  resolve voids a FILLED record of a dead writer without the evidence
 *   3  the next holder does not resolve the pending record (no R): a commit
 *      after a dead writer's FILLED record makes the evidence lie
 *   4  a takeover rolling forward adopts the dead writer's record (marks it
 *      DONE) instead of claiming its own: a reader may have voided it
 *   5  one global latch around C1..C4 (main's design): a stopped writer on
 *      object 0 stalls the commit on object 1
 *   6  resolve reads the evidence (G) before the liveness proof (P): a writer
 *      that commits and dies between the two has its record voided
 *      (tests/models/journal_resolve_order.pml, MUTANT 10, found it)
 *   7  the claim at the wrap refuses every record of a live writer (as this
 *      model did first), even one its evidence proves committed: a writer
 *      stopped between C3 and C4 makes every claimer at the wrap refuse
 *      (tests/models/journal_resolve_order.pml, MUTANT 14)
 */

#ifndef MUTANT
#define MUTANT 0
#endif
#ifndef MAXDEATHS
#define MAXDEATHS 1
#endif

#define N 2               /* ring records */
#define NW 3              /* writers: 1 and 2 on object 0, 3 on object 1 */
#define NO 2              /* objects */
#define REC (NW + 1)      /* the takeover's token */
#define MAXSEQ 6

#define VOID 0            /* lap 0 + VOID: the all-zero ring */
#define CLAIMED 1
#define FILLED 2
#define DONE 3

bool alive[REC + 1];
byte deaths = 0;
bool stopped = false;

byte gen[NO];             /* the object's generation: moved by a commit (C3) */
byte lock[NO + 1];        /* 0, or the holder's token (lock[NO]: MUTANT 5's latch) */
byte jpend[NO];           /* seq of the holder's record, 0: none */
bool sealed[NO];          /* the holder sealed its change (a takeover rolls it forward) */
byte sealer[NO + 1];      /* who sealed it; sealer[NO]: the stopped writer */

byte tail = 1;            /* the next seq to claim */
byte hlap[N];             /* hdr = (hlap, hst, htok) */
byte hst[N];
byte htok[N];
byte robj[N];             /* the record's fields (C2) */
byte rgen[N];

/* ghosts */
byte claim_cid[MAXSEQ + 1];     /* the change a claim records */
bool claim_commit[MAXSEQ + 1];  /* the claim's C3 happened */
bool committed[REC + 1];        /* change c (= its writer's token) committed */
byte donec[REC + 1];            /* DONE records of change c */
byte wdone = 0;

#define LAP(k) (((k) - 1) / N + 1)   /* seq 1 .. N: lap 1 */
#define R(k) ((k) % N)

#define DIE if :: skip \
             :: (deaths < MAXDEATHS && me != 3) -> deaths++; alive[me] = false; goto dead \
             :: (!stopped && me == 1) -> stopped = true; sealer[NO] = me; goto end_stop fi

inline mark_done(k) {
    assert(claim_commit[k]);                       /* DONE only for a commit */
    donec[claim_cid[k]]++;
    assert(donec[claim_cid[k]] == 1)               /* no duplicate */
}

inline mark_void(k) {
    assert(!claim_commit[k])                       /* VOID only for a claim that never committed */
}

/* resolve record k, in the steps C must run (a record's header and fields, its
 * writer's liveness and its object's generation cannot be read in one step):
 *   H read the header and the fields; P prove the header's writer dead;
 *   G read the object's generation (the evidence); X CAS the exact header
 *   read.  P before G: a writer that commits (C3) and dies between the two
 *   reads would read as dead and not committed (MUTANT 6).  The ev* words
 *   are the resolver's registers, by _pid. */
byte evhdr[8];
byte evobj[8];
byte evrgen[8];
bool evdead[8];
byte evg[8];
#define HDR(r) (hlap[r] * 64 + hst[r] * 8 + htok[r])
#define EVHDR(k) (evhdr[_pid] == HDR(R(k)))
inline resolve(k) {
    atomic { evhdr[_pid] = HDR(R(k)); evobj[_pid] = robj[R(k)]; evrgen[_pid] = rgen[R(k)] }   /* H */
#if MUTANT == 6
    evg[_pid] = gen[evobj[_pid]];                                  /* G before P */
    evdead[_pid] = !alive[evhdr[_pid] % 8];                        /* P */
#else
    evdead[_pid] = !alive[evhdr[_pid] % 8];                        /* P: token_dead */
    evg[_pid] = gen[evobj[_pid]];                                  /* G */
#endif
    atomic {                                                       /* X: CAS hdr as read */
        if
        :: EVHDR(k) && hlap[R(k)] == LAP(k) && hst[R(k)] == CLAIMED && evdead[_pid] ->
            mark_void(k); hst[R(k)] = VOID
        :: EVHDR(k) && hlap[R(k)] == LAP(k) && hst[R(k)] == FILLED && evg[_pid] == evrgen[_pid] ->
            mark_done(k); hst[R(k)] = DONE
#if MUTANT == 2
        :: EVHDR(k) && hlap[R(k)] == LAP(k) && hst[R(k)] == FILLED && evdead[_pid] ->
#else
        :: EVHDR(k) && hlap[R(k)] == LAP(k) && hst[R(k)] == FILLED && evg[_pid] != evrgen[_pid] &&
           evdead[_pid] ->
#endif
            mark_void(k); hst[R(k)] = VOID
        :: else -> skip
        fi;
        evhdr[_pid] = 0; evobj[_pid] = 0; evrgen[_pid] = 0; evdead[_pid] = false; evg[_pid] = 0
    }
}

/* C1: claim seq t for change c by token tok; ok = 0 refused (the wrap) */
inline claim(tok, c, t, ok) {
    ok = 2;
    do
    :: ok != 2 -> break
    :: ok == 2 ->
        t = tail;
        if
        :: atomic { hlap[R(t)] + 1 == LAP(t) && (hst[R(t)] == DONE || hst[R(t)] == VOID) ->
                    hlap[R(t)] = LAP(t); hst[R(t)] = CLAIMED; htok[R(t)] = tok;
                    claim_cid[t] = c; ok = 1 };
           atomic { if :: tail == t -> tail = t + 1 :: else -> skip fi }
        :: atomic { hlap[R(t)] == LAP(t) && tail == t -> tail = t + 1 }   /* help it on */
        :: atomic { hlap[R(t)] + 1 == LAP(t) && (hst[R(t)] == CLAIMED || hst[R(t)] == FILLED) } ->
            if
            :: !alive[htok[R(t)]] -> resolve(t - N)
#if MUTANT == 7
            :: atomic { hlap[R(t)] + 1 == LAP(t) && alive[htok[R(t)]] &&
                        (hst[R(t)] == CLAIMED || hst[R(t)] == FILLED) ->
#else
            /* a live writer's record its evidence proves committed (a writer
             * stopped between C3 and C4): completed, not waited for */
            :: alive[htok[R(t)]] && hst[R(t)] == FILLED && gen[robj[R(t)]] == rgen[R(t)] ->
                resolve(t - N)
            :: atomic { hlap[R(t)] + 1 == LAP(t) && alive[htok[R(t)]] &&
                        (hst[R(t)] == CLAIMED || (hst[R(t)] == FILLED && gen[robj[R(t)]] != rgen[R(t)])) ->
#endif
                /* refuse (CONFLICT) only a record whose change has not committed */
                assert(!claim_commit[t - N]);
                ok = 0 }
            :: else -> skip                               /* moved: look again */
            fi
        :: tail != t -> skip                              /* moved: read it again */
        fi
    od
}

proctype writer(byte me; byte o; bool seal) {
    byte t, ok, k;
    if
    :: atomic { lock[o] == 0 -> lock[o] = me }           /* lock */
    :: atomic { lock[o] != 0 && stopped && lock[o] == sealer[NO] } -> goto refused   /* bound */
    fi;
#if MUTANT == 5
    atomic { lock[NO] == 0 -> lock[NO] = me }            /* the global latch */
    DIE;
#endif
#if MUTANT != 3
    k = jpend[o];                                        /* R */
    if :: k != 0 -> resolve(k) :: else -> skip fi;
    k = 0;
#endif
    if
    :: seal -> atomic { sealed[o] = true; sealer[o] = me }   /* seal (the slow path) */
    :: else -> skip
    fi;
    claim(me, me, t, ok);                                /* C1 */
    if
    :: ok == 0 -> sealed[o] = false; lock[o] = 0; goto refused   /* unlock unchanged */
    :: else -> skip
    fi;
    DIE;
    jpend[o] = t;
    DIE;
#if MUTANT == 1
    atomic { gen[o]++; lock[o] = 0; sealed[o] = false; claim_commit[t] = true; committed[me] = true }  /* C3 */
    DIE;
    atomic { robj[R(t)] = o; rgen[R(t)] = gen[o]; hst[R(t)] = FILLED }
#else
    atomic { robj[R(t)] = o; rgen[R(t)] = gen[o] + 1; hst[R(t)] = FILLED }   /* C2 */
#endif
    DIE;
    if
    :: me != 2 -> skip
    :: me == 2 -> atomic { mark_void(t); hst[R(t)] = VOID };   /* C3 refused: void our record */
       atomic { sealed[o] = false; lock[o] = 0 }; goto refused
    :: me == 2 -> skip
    fi;
#if MUTANT != 1
    atomic { gen[o]++; lock[o] = 0; sealed[o] = false; claim_commit[t] = true; committed[me] = true }  /* C3 */
    DIE;
#endif
#if MUTANT == 5
    lock[NO] = 0;
#endif
    atomic {                                             /* C4 */
        if
        :: hlap[R(t)] == LAP(t) && hst[R(t)] == FILLED -> mark_done(t); hst[R(t)] = DONE
        :: else -> skip
        fi
    }
    atomic { if :: jpend[o] == t -> jpend[o] = 0 :: else -> skip fi }
refused:
#if MUTANT == 5
    atomic { if :: lock[NO] == me -> lock[NO] = 0 :: else -> skip fi }
#endif
    skip;
dead:
    atomic { wdone++ };
end_stop:
    skip
}

/* takeover of an object whose holder is proven dead (never dies itself) */
proctype takeovers() {
    byte o, T, t, ok, k;
    bool fwd;
end_loop:
    do
    :: atomic {
        ((lock[0] != 0 && !alive[lock[0]]) || (lock[1] != 0 && !alive[lock[1]])) ->
        if
        :: lock[0] != 0 && !alive[lock[0]] -> o = 0
        :: lock[1] != 0 && !alive[lock[1]] -> o = 1
        fi;
        T = lock[o]; lock[o] = REC;
        fwd = sealed[o] && sealer[o] == T
       };
#if MUTANT == 5
       atomic { if :: lock[NO] == T -> lock[NO] = 0 :: else -> skip fi };
#endif
#if MUTANT == 4
       k = jpend[o];
       if
       :: fwd && k != 0 && hlap[R(k)] == LAP(k) && hst[R(k)] == FILLED && htok[R(k)] == T ->
           /* adopt T's record: commit, then mark it DONE */
           atomic { gen[o]++; claim_commit[k] = true; committed[T] = true; sealed[o] = false; lock[o] = 0 };
           atomic { if :: hst[R(k)] == FILLED -> mark_done(k); hst[R(k)] = DONE :: else -> skip fi };
           goto next
       :: else -> skip
       fi;
#endif
#if MUTANT != 3
       k = jpend[o];                                     /* R */
       if :: k != 0 -> resolve(k) :: else -> skip fi;
       k = 0;
#endif
       if
       :: fwd ->
          claim(REC, T, t, ok);                          /* C1, its own record for T's change */
          if
          :: ok == 0 -> sealed[o] = false; lock[o] = 0; goto next   /* back, refused by the wrap */
          :: else -> skip
          fi;
          jpend[o] = t;
          atomic { robj[R(t)] = o; rgen[R(t)] = gen[o] + 1; hst[R(t)] = FILLED }   /* C2 */
          atomic { gen[o]++; lock[o] = 0; sealed[o] = false; claim_commit[t] = true; committed[T] = true }  /* C3 */
          atomic {                                       /* C4 */
              if
              :: hlap[R(t)] == LAP(t) && hst[R(t)] == FILLED -> mark_done(t); hst[R(t)] = DONE
              :: else -> skip
              fi
          };
          atomic { if :: jpend[o] == t -> jpend[o] = 0 :: else -> skip fi }
       :: else -> atomic { sealed[o] = false; lock[o] = 0 }    /* back: no record */
       fi;
next:
       atomic { o = 0; T = 0; t = 0; ok = 0; k = 0; fwd = false }   /* no stale locals */
    od
}

/* follows the ring from seq 1; resolves what it finds unresolved */
proctype reader() {
    byte next = 1, r, l, st, ob, g, k;
    byte lastgen[NO];
    bool lapped = false;
end_read:
    do
    :: atomic { tail > next -> r = R(next); l = hlap[r]; st = hst[r] }
       if
       :: l == LAP(next) && st == DONE ->
           atomic { ob = robj[r]; g = rgen[r] }          /* copy */
           atomic {
               if
               :: hlap[r] == l && hst[r] == DONE ->      /* re-read hdr: whole */
                   /* per-object order = seq order; no silent gap; no duplicate */
                   assert(claim_commit[next]);
                   assert(g > lastgen[ob]);
                   assert(lapped || g == lastgen[ob] + 1);
                   lastgen[ob] = g;
                   next++
               :: else -> skip                           /* moved: look again */
               fi;
               r = 0; l = 0; st = 0; ob = 0; g = 0
           }
       :: l == LAP(next) && st == VOID ->
           atomic {
               assert(!claim_commit[next]);              /* a void is not a lost record */
               next++; r = 0; l = 0; st = 0
           }
       :: l == LAP(next) && (st == CLAIMED || st == FILLED) ->
           resolve(next); atomic { r = 0; l = 0; st = 0 }
       :: l > LAP(next) ->                               /* JournalLappedError */
           atomic { lapped = true; next = tail - N; r = 0; l = 0; st = 0 }
       :: l < LAP(next) -> atomic { r = 0; l = 0; st = 0 }   /* look again */
       fi
    :: atomic { wdone + stopped == NW && lock[0] != REC && lock[1] != REC &&
                (lock[0] == 0 || alive[lock[0]]) && (lock[1] == 0 || alive[lock[1]]) } ->
       /* quiescent: recover()'s sweep resolves every record, then record iff committed */
       k = 1;
       do
       :: k < tail -> if :: tail - k <= N -> resolve(k) :: else -> skip fi; k++
       :: else -> break
       od;
       k = 1;
       do
       :: k <= NW ->
           assert(committed[k] == (donec[k] == 1));   /* record iff committed */
           k++
       :: else -> break
       od;
       break
    od
}

init {
    byte i;
    atomic {
        i = 1;
        do
        :: i <= REC -> alive[i] = true; i++
        :: else -> break
        od;
        run writer(1, 0, true);    /* slow path: sealed, may stop */
        run writer(2, 0, false);   /* fast path under the lock; its C3 may be refused */
        run writer(3, 1, false);   /* the other object: never waits for writer 1 */
        run takeovers();
        run reader()
    }
}
