/*
 * JADV (tests/test_journal_model_adversary.py): native/journal_append.pml (commit b3571ba: the per-object append) with
 * resolve() split the way C must run it -- it cannot read a record's header, prove its
 * writer dead, read the object's generation and CAS the header in one atomic step -- and
 * the reader's call of resolve no longer wrapped in an atomic block.
 *   MUTANT 0   resolve as the model has it (atomic), called non-atomically: holds
 *   MUTANT 10  the evidence (the object's generation) read BEFORE the liveness proof:
 *              fails -- a writer that commits (C3) and dies between the two reads has
 *              its committed change's record voided (a commit without its record)
 *   MUTANT 11  snapshot header + fields; prove the header's writer dead; THEN read the
 *              evidence; CAS the exact header read: holds
 * The order of MUTANT 11 is what native/journal.c's resolve must do; the model as
 * written (resolve atomic) cannot tell 10 from 11.
 * Folded into native/journal_append.pml (`make verify`): its resolve runs MUTANT 11's
 * steps everywhere (MUTANT 6 there is 10 here) and its claim at the wrap is MUTANT 12's
 * (MUTANT 7 there is 14 here).  This copy stays as the finding's record.
 *   MUTANT 14  the model's claim at the wrap, asserting it never refuses a record its
 *              evidence proves committed: fails -- a writer stopped between C3 and C4
 *              (committed, unlocked) makes every claimer at the wrap refuse
 *   MUTANT 12  the claim resolves such a record by its evidence instead (whatever its
 *              writer's liveness) and refuses only an unproven one: holds
 */
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
 *        is dead, else refuse (CONFLICT): only the wrap waits for a stopped
 *        writer.  Then jpend[o] = t + 1.
 *     C2 fill the record (object, the generation the commit publishes),
 *        hdr CLAIMED -> FILLED
 *     C3 the object's commit (generation + 1) and unlock: one CAS
 *     C4 hdr FILLED -> DONE by CAS (a resolver may have done it); jpend[o]
 *        (t + 1) -> 0 by CAS
 *     or give up after C1/C2 (its commit refused): hdr -> VOID, unlock
 *
 *   resolve record k (a reader, a claimer wrapping onto it, recover(), the
 *   next holder of its object): CLAIMED, writer dead -> VOID (C3 follows C2);
 *   FILLED: the object's generation reached the record's -> DONE; not reached
 *   and writer dead -> VOID; not reached, writer alive -> leave it (wait).
 *   Exact because the object cannot commit again before its next holder has
 *   resolved jpend (R).
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
 * silent gap, no duplicate) and skips only VOID records.
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

/* resolve record k (atomic: one header CAS after reading the evidence) */
byte evg[8];
bool evdead[8];
byte evobj[8];
byte evhdr[8];
byte evrgen[8];
#if MUTANT == 11
#define SAMEHDR (hlap[R(k)] * 64 + hst[R(k)] * 8 + htok[R(k)] == evhdr[_pid])
#else
#define SAMEHDR true
#endif
inline resolve(k) {
#if MUTANT == 10
    evg[_pid] = gen[robj[R(k)]];   /* JADV: the evidence read before the liveness proof */
#endif
#if MUTANT == 11
    atomic { evhdr[_pid] = hlap[R(k)] * 64 + hst[R(k)] * 8 + htok[R(k)];   /* JADV: hdr ... */
             evobj[_pid] = robj[R(k)]; evrgen[_pid] = rgen[R(k)] }         /* ... and fields */
    evdead[_pid] = !alive[evhdr[_pid] % 8];   /* the liveness proof of hdr's writer first ... */
    evg[_pid] = gen[evobj[_pid]];        /* ... then the evidence, then the CAS */
#endif
    atomic {
#if MUTANT != 10 && MUTANT != 11
        evg[_pid] = gen[robj[R(k)]];
#endif
#if MUTANT != 11
        evdead[_pid] = !alive[htok[R(k)]];
#endif
        if
        :: SAMEHDR && hlap[R(k)] == LAP(k) && hst[R(k)] == CLAIMED && evdead[_pid] ->
            mark_void(k); hst[R(k)] = VOID
#if MUTANT == 11
        :: SAMEHDR && hlap[R(k)] == LAP(k) && hst[R(k)] == FILLED && evg[_pid] == evrgen[_pid] &&
           evobj[_pid] == robj[R(k)] && evrgen[_pid] == rgen[R(k)] ->
#else
        :: SAMEHDR && hlap[R(k)] == LAP(k) && hst[R(k)] == FILLED && evg[_pid] == rgen[R(k)] ->
#endif
            mark_done(k); hst[R(k)] = DONE
        :: SAMEHDR && hlap[R(k)] == LAP(k) && hst[R(k)] == FILLED && evg[_pid] != rgen[R(k)] &&
           evdead[_pid] ->
            mark_void(k); hst[R(k)] = VOID
        :: else -> skip
        fi;
        evg[_pid] = 0; evdead[_pid] = false; evobj[_pid] = 0; evrgen[_pid] = 0; evhdr[_pid] = 0
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
#if MUTANT == 12 || MUTANT == 13
            /* JADV: a live writer's record that its evidence proves committed (stopped
             * between C3 and C4) is completed, not waited for */
            :: alive[htok[R(t)]] && hst[R(t)] == FILLED && gen[robj[R(t)]] == rgen[R(t)] ->
                resolve(t - N)
            :: alive[htok[R(t)]] && !(hst[R(t)] == FILLED && gen[robj[R(t)]] == rgen[R(t)]) ->
                ok = 0
#else
            :: alive[htok[R(t)]] ->
#if MUTANT == 14
                /* JADV: the model's claim refuses even when the evidence says committed */
                assert(!(hst[R(t)] == FILLED && gen[robj[R(t)]] == rgen[R(t)]));
#endif
                ok = 0                                    /* its writer lives: refuse */
#endif
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
    atomic { k = jpend[o]; if :: k != 0 -> resolve(k) :: else -> skip fi; k = 0 }   /* R */
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
       atomic { k = jpend[o]; if :: k != 0 -> resolve(k) :: else -> skip fi; k = 0 }   /* R */
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
