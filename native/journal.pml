/*
 * The journal's append protocol, as native/journal.c runs it (`make verify`).
 *
 * Every commit of a slot word (a transition's CAS, fast or slow path) is
 * made by the holder of the journal latch, between writing the record and
 * publishing it.  Step names are the C code's:
 *
 *   writer, fast path                      writer, slow path
 *                                            lock_slot: CAS w -> L (owner = me)
 *                                            seal: fill the spare context copy, seal = L
 *     J1 journal_latch: CAS (n,0) -> (n,me)  J1 journal_latch
 *     w = slot word, read under the latch
 *        (locked: journal_abort, wait)
 *     J2 journal_fill_release: seq = 0,    J2 journal_fill_release
 *        fields, seq = n+1 (release)
 *     J3 commit: CAS w -> w' (gen + 1)       J3 commit: CAS L -> w' (gen + 1)
 *        failed (slot locked meanwhile):
 *        journal_abort: CAS (n,me) -> (n,0), retry
 *     J4 journal_publish: CAS (n,me) -> (n+1,0)
 *
 *   journal_takeover (latch (n,T), T proven dead):
 *     forward, CAS (n,T) -> (n+1,0), iff ring[n+1] is whole (seq == n+1) and
 *     its slot's generation reached the record's (J3 happened: no one else can
 *     commit that slot while T holds the latch; a lock does not move the
 *     generation); else back, CAS (n,T) -> (n,0).
 *   takeover (slot locked by L, owner proven dead), as latch holder:
 *     forward iff the spare copy is sealed with L: J2, J3 (CAS L -> w'), J4
 *     on the dead writer's behalf; else back: CAS L -> unlocked, no record.
 *   reader (follows the ring from seq 1, across wraps):
 *     wait for published seq >= next; s1 = ring seq; copy; s2 = ring seq;
 *     deliver iff s1 == s2 == next; else JournalLappedError (and resume).
 *
 * Asserted: a record exists iff its change committed (every quiescent point
 * and the end), no record twice, records of one slot in commit order, the
 * reader delivers exactly the published record for each seq, and it reports
 * a lap only when the ring really was overwritten under it (no silent gap).
 *
 * MUTANT (spin -DMUTANT=n) breaks one step; `make verify` checks each fails:
 *   1  the record written after the commit CAS (J3 before J2), no takeover
 *      completing it: a writer killed between J3 and J2 commits with no record
 *   2  journal_takeover compares the whole slot word, not its generation:
 *      a slot locked again after the commit reads as "not committed"
 *   3  the reader skips its re-check of the record's seq (s2): a copy torn
 *      by a writer refilling the slot is delivered
 *   4  the fast path reads the slot word before it takes the latch (as the
 *      latch-free fast path did): a record names a generation the slot had
 *      already reached by another commit, and journal_takeover rolls it
 *      forward though its CAS never ran
 */

#ifndef MUTANT
#define MUTANT 0
#endif

#define NW 2              /* writer processes */
#define CH 2              /* changes per writer: 4 records through a ring of 2 wrap it */
#define NC (NW * CH)      /* change ids 1..NC */
#define N 2               /* ring records */
#define NS 1              /* slots (one: every change contends) */
#define REC (NW + 1)      /* the takeover process's token */
#define MAXSEQ (NC + 1)

bool alive[NW + 2];
byte deaths = 0;
#ifndef MAXDEATHS
#define MAXDEATHS 2
#endif

/* the slot: its generation, the lock (0, or the change id whose writer holds
 * it: the lock word L names its owner), the spare copy's seal */
byte slot_gen[NS];
byte slot_lock[NS];
byte sealed[NS];

/* the journal: the latch word (published seq, owner token) and the ring */
byte jseq = 0;
byte jown = 0;
byte ring_seq[N];
byte ring_cid[N];
byte ring_slot[N];
byte ring_gen[N];

/* ghosts: what happened, for the assertions */
bool committed[NC + 1];
byte recorded[NC + 1];
byte pubcid[MAXSEQ + 1];
byte lastgen[NS];
byte done = 0;

#define owner_of(c) (((c) - 1) / CH + 1)

inline publish_check(n, r) {
    /* J4 / journal_takeover forward: record n+1 becomes visible */
    assert(ring_seq[r] == n + 1);
    assert(committed[ring_cid[r]]);
    recorded[ring_cid[r]]++;
    assert(recorded[ring_cid[r]] == 1);                 /* no duplicate */
    assert(ring_gen[r] == lastgen[ring_slot[r]] + 1);   /* per-slot commit order */
    lastgen[ring_slot[r]] = ring_gen[r];
    pubcid[n + 1] = ring_cid[r]
}

/* a writer may die at any step: its locks stay where they are */
#define DIE if :: skip :: (deaths < MAXDEATHS) -> deaths++; alive[me] = false; goto dead fi

proctype writer(byte me) {
    byte k = 0, c, s, g, n, r;
    bool ok;
    do
    :: k == CH -> break
    :: k < CH ->
        c = (me - 1) * CH + k + 1;
        s = c % NS;
        if
        :: goto fast
        :: goto slow
        fi;
fast:
#if MUTANT == 4
        atomic { slot_lock[s] == 0 -> g = slot_gen[s] }         /* w read before the latch */
        DIE;
#endif
        atomic { jown == 0 -> jown = me; n = jseq }             /* J1 journal_latch */
        DIE;
#if MUTANT != 4
        if                                                      /* w = slot word, under the latch */
        :: slot_lock[s] == 0 -> g = slot_gen[s]
        :: else -> atomic { jown = 0 }; (slot_lock[s] == 0); goto fast   /* journal_abort, wait */
        fi;
        DIE;
#endif
        r = (n + 1) % N;
#if MUTANT == 1
        atomic {                                                /* J3 commit (too early) */
            if
            :: slot_lock[s] == 0 && slot_gen[s] == g -> slot_gen[s] = g + 1; committed[c] = true; ok = true
            :: else -> ok = false
            fi
        }
        DIE;
#endif
        ring_seq[r] = 0;                                        /* J2 journal_fill_release */
        DIE;
        ring_cid[r] = c; ring_slot[r] = s; ring_gen[r] = g + 1;
        DIE;
        ring_seq[r] = n + 1;
        DIE;
#if MUTANT != 1
        atomic {                                                /* J3 commit */
            if
            :: slot_lock[s] == 0 && slot_gen[s] == g -> slot_gen[s] = g + 1; committed[c] = true; ok = true
            :: else -> ok = false
            fi
        }
        DIE;
#endif
        if
        :: ok -> atomic { assert(jown == me && jseq == n); publish_check(n, r); jseq = n + 1; jown = 0 }  /* J4 journal_publish */
        :: !ok -> atomic { assert(jown == me); jown = 0 }; goto fast   /* journal_abort, retry */
        fi;
        goto next;
slow:
        atomic { slot_lock[s] == 0 -> slot_lock[s] = c; g = slot_gen[s] }   /* lock_slot */
        DIE;
        sealed[s] = c;                                          /* seal (W0-W2) */
        DIE;
        atomic { jown == 0 -> jown = me; n = jseq }             /* J1 journal_latch */
        DIE;
        r = (n + 1) % N;
        ring_seq[r] = 0;                                        /* J2 journal_fill_release */
        DIE;
        ring_cid[r] = c; ring_slot[r] = s; ring_gen[r] = g + 1;
        DIE;
        ring_seq[r] = n + 1;
        DIE;
        atomic {                                                /* J3 commit: CAS L -> w' */
            assert(slot_lock[s] == c);      /* a live owner is never taken over */
            slot_lock[s] = 0; slot_gen[s] = g + 1; committed[c] = true
        }
        DIE;
        atomic { assert(jown == me && jseq == n); publish_check(n, r); jseq = n + 1; jown = 0 }   /* J4 */
next:
        k++
    od;
dead:
    atomic { done++ }
}

/* whichever process finds a dead owner; here one that does not die */
proctype takeovers() {
    byte s, n, r, c;
end_loop:
    do
    :: atomic {                                                 /* journal_takeover */
        jown != 0 && !alive[jown] ->
        n = jseq; r = (n + 1) % N;
#if MUTANT == 2
        if
        :: ring_seq[r] == n + 1 && slot_gen[ring_slot[r]] == ring_gen[r] && slot_lock[ring_slot[r]] == 0 ->
#else
        if
        :: ring_seq[r] == n + 1 && slot_gen[ring_slot[r]] == ring_gen[r] ->
#endif
            publish_check(n, r); jseq = n + 1; jown = 0          /* forward */
        :: else -> jown = 0                                     /* back */
        fi
       }
    :: atomic {                                                 /* takeover (slot), latch first */
        jown == 0 && slot_lock[0] != 0 && !alive[owner_of(slot_lock[0])] ->
        s = 0; jown = REC; n = jseq; c = slot_lock[s]
       };
       r = (n + 1) % N;
       if
       :: sealed[s] == c ->                                     /* forward, on its behalf */
           ring_seq[r] = 0;                                     /* J2 */
           ring_cid[r] = c; ring_slot[r] = s; ring_gen[r] = slot_gen[s] + 1;
           ring_seq[r] = n + 1;
           atomic { slot_lock[s] = 0; slot_gen[s]++; committed[c] = true }   /* J3 */
           atomic { publish_check(n, r); jseq = n + 1; jown = 0 }            /* J4 */
       :: else ->
           atomic { slot_lock[s] = 0; jown = 0 }                /* back: no record */
       fi
    od
}

/* follows the ring from seq 1; a lap is reported, then it resumes */
proctype reader() {
    byte next = 1, r, s1, s2, cid, laps = 0;
    byte x;
end_read:
    do
    :: atomic { jseq >= next -> r = next % N; s1 = ring_seq[r] }
       cid = ring_cid[r];
#if MUTANT == 3
       s2 = s1;
#else
       s2 = ring_seq[r];
#endif
       if
       :: s1 == next && s2 == next ->
           assert(cid == pubcid[next]);                         /* the published record */
           next++
       :: else ->                                               /* JournalLappedError */
           atomic {
               /* only if a writer got to refill this record: n + 1 >= next + N */
               assert(jseq + 1 >= next + N);
               laps++;
               next = jseq + 2 - N                              /* resume_seq: oldest retained */
           }
       fi
    :: atomic {
        done == NW && jown == 0 && slot_lock[0] == 0 && next > jseq ->
        /* quiescent and drained: a record exists iff its change committed */
        x = 1;
        do
        :: x <= NC -> assert(committed[x] == (recorded[x] == 1)); x++
        :: x > NC -> break
        od;
        break
       }
    od
}

init {
    byte i;
    atomic {
        i = 1;
        do
        :: i <= NW + 1 -> alive[i] = true; i++
        :: i > NW + 1 -> break
        od;
        i = 1;
        do
        :: i <= NW -> run writer(i); i++
        :: i > NW -> break
        od;
        run takeovers();
        run reader()
    }
}
