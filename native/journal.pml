/*
 * The journal's append protocol, as native/journal.c runs it (`make verify`).
 *
 * Every commit of a slot word (a transition's CAS, fast or slow path, an
 * open) is made by the holder of the journal latch, between writing its
 * records and publishing them.  A commit fills 1 + r records: the slot's own
 * (seq n+1) and r RIDERS (keys.c journal_fill_riders: an open's key at n+2,
 * a booked change's account books after it; r <= MAX_FILL - 1), each
 * committed iff the slot's commit is.  Step names are the C code's:
 *
 *   writer, fast path (r = 0)              writer, slow path (r riders)
 *                                            lock_slot: CAS w -> L (owner = me)
 *                                            seal: fill the spare context copy, seal = L
 *     J1 journal_latch: CAS (n,0) -> (n,me)  J1 journal_latch
 *     w = slot word, read under the latch
 *        (locked: journal_abort, wait)
 *     J2 journal_fill_release: seq = 0,    J2 journal_fill_release (n+1), then
 *        fields + latch word, seq = n+1       journal_fill_riders: journal_fill_at
 *        (release)                            n+2 .. n+1+r, each as n+1
 *     J3 commit: CAS w -> w' (gen + 1)       J3 commit: CAS L -> w' (gen + 1)
 *        failed (slot locked meanwhile):
 *        journal_abort: CAS (n,me) -> (n,0), retry
 *     J4 journal_publish_n: CAS (n,me) -> (n+1+r,0)
 *
 *   journal_takeover (latch JL = (n,T), T proven dead):
 *     forward iff ring[n+1] is whole (seq == n+1), its latch word is JL and
 *     its slot's generation reached the record's (J3 happened: no one else
 *     can commit that slot while T holds the latch; a lock does not move the
 *     generation); then it publishes n+1 and every record n+2.. whose seq
 *     and latch word match JL (all T's riders: each was filled before J3),
 *     at most MAX_FILL records: CAS (n,T) -> (last,0).  Else back, CAS
 *     (n,T) -> (n,0), publishing none.  It is one step here: the C code
 *     proves T dead before it reads the records (journal_latch, journal_sweep
 *     and eng_journal_wait call token_dead first), and while the latch word is
 *     (n,T) with T dead nothing it reads can move (only the latch holder
 *     fills a record or commits a slot); its CAS from (n,T) fails if the word
 *     moved.  (journal_append.pml's resolve has no such latch: it runs in
 *     steps.)
 *   takeover (slot locked by L, owner proven dead), as latch holder:
 *     forward iff the spare copy is sealed with L: J2 (with the riders), J3
 *     (CAS L -> w'), J4 on the dead writer's behalf; else back: CAS L ->
 *     unlocked, no record.
 *   reader (eng_journal_read; follows the ring from seq 1, across wraps):
 *     wait for published seq >= k; s1 = ring seq; copy; s2 = ring seq;
 *     deliver iff s1 == s2 == k; else, the latch read again (pub): corrupt
 *     iff k + N > pub + MAX_FILL (never, asserted), else JournalLappedError
 *     with resume = pub + 1 + MAX_FILL - N (journal_resume), and resume there.
 *
 * Writers: writer 1 changes slot 0, then opens slot 1 (slow path, two
 * riders: a key and books); writer 2 changes slot 0, then makes a booked
 * change of slot 1 (slow path, one rider).  The changes of slot 0 go by the
 * fast or the slow path, with no rider.  7 records through a ring of 4 wrap
 * it (the open's last rider, at n+3, overwrites seq n+3-4 when it follows
 * two commits).  Any writer may die at any step (up to MAXDEATHS in all).
 *
 * Asserted: a record (slot's or rider) exists iff its change committed (at
 * every publish and, quiescent, at the end); no record twice; the records
 * of one commit are published together, the slot's first and its riders
 * right after it in order; records of one slot in commit order; the reader
 * delivers exactly the published record for each seq and a commit's records
 * contiguously, in order; it reports a lap only when the ring really was
 * overwritten under it (never "corrupt"), resumes past the seq it lost (no
 * record twice), and every record from its resume seq to the published one
 * is still in the ring (retention of N - MAX_FILL records across the wrap).
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
 *   5  journal_takeover rolling forward publishes only the slot's record: a
 *      holder dead between J3 and J4 loses its riders' records
 *   6  J4 publishes n+1 only (journal_publish, not journal_publish_n): the
 *      riders are never published, and the next holder fills over them
 *   7  journal_takeover publishes the records after n+1 without comparing
 *      their latch word: a rider left by an earlier holder rolled back at the
 *      same n (its slot not committed) is published after another commit
 *   8  the reader's lapped-vs-corrupt rule and resume seq ignore the riders
 *      (MAX_FILL taken as 1): a reader overtaken by a rider's fill at n+3
 *      reports a sound ring as corrupt
 */

#ifndef MUTANT
#define MUTANT 0
#endif

#define NW 2              /* writer processes */
#define NC 4              /* change ids 1..NC: writer 1 has 1 and 2, writer 2 has 3 and 4 */
#define N 4               /* ring records (ENG_JOURNAL_MIN_RECORDS) */
#define MAX_FILL 3        /* ENG_JOURNAL_MAX_FILL: the slot's record and two riders */
#define NS 2              /* slots */
#define REC (NW + 1)      /* the takeover process's token */
#define MAXSEQ 7          /* the records of changes 1..4: 1, 1 + 2 riders, 1, 1 + 1 rider */
#define ROLES 3           /* a change's records: role 0 the slot's, 1.. its riders */

#define CHANGES(me) 2                           /* changes per writer */
#define CID(me, k) (((me) - 1) * 2 + (k) + 1)
#define SLOT(c) (((c) == 2 || (c) == 4) -> 1 : 0)
/* change 2: an open with a key and books; change 4: a booked change of slot 1 */
#define RIDERS(c) ((c) == 2 -> 2 : ((c) == 4 -> 1 : 0))
#define OWNER(c) (((c) - 1) / 2 + 1)

#if MUTANT == 8
#define READER_FILL 1     /* the reader's rule before the riders */
#else
#define READER_FILL MAX_FILL
#endif

bool alive[NW + 2];
byte deaths = 0;
#ifndef MAXDEATHS
#define MAXDEATHS 2
#endif

/* the slots: generation, the lock (0, or the change id whose writer holds
 * it: the lock word L names its owner), the spare copy's seal */
byte slot_gen[NS];
byte slot_lock[NS];
byte sealed[NS];

/* the journal: the latch word (published seq, holder token) and the ring;
 * a record's latch word is (ring_lseq, ring_lown) */
byte jseq = 0;
byte jown = 0;
byte ring_seq[N];
byte ring_lseq[N];
byte ring_lown[N];
byte ring_cid[N];
byte ring_role[N];
byte ring_slot[N];
byte ring_gen[N];

/* ghosts: what happened, for the assertions */
bool committed[NC + 1];
byte recorded[(NC + 1) * ROLES];      /* by change * ROLES + role */
byte pubcid[MAXSEQ + 1];
byte pubrole[MAXSEQ + 1];
byte lastgen[NS];
byte done = 0;
byte px, pq;                          /* scratch of the atomic blocks below, reset after */

/* J4 / journal_takeover forward: record q, of the group published from n */
inline publish_rec(n, q) {
    px = (q) % N;
    assert(ring_seq[px] == q);
    assert(committed[ring_cid[px]]);                    /* iff: only a committed change's */
    recorded[ring_cid[px] * ROLES + ring_role[px]]++;
    assert(recorded[ring_cid[px] * ROLES + ring_role[px]] == 1);   /* no duplicate */
    /* the slot's record first, then its riders in order */
    assert(ring_role[px] == q - n - 1);
    assert(q == n + 1 || ring_cid[px] == pubcid[n + 1]);
    if
    :: ring_role[px] == 0 ->
        assert(ring_gen[px] == lastgen[ring_slot[px]] + 1);   /* per-slot commit order */
        lastgen[ring_slot[px]] = ring_gen[px]
    :: else -> skip
    fi;
    pubcid[q] = ring_cid[px];
    pubrole[q] = ring_role[px];
    px = 0
}

/* publish records n+1 .. n+cnt and free the latch: (n,holder) -> (n+cnt,0) */
inline publish(n, cnt) {
    pq = 1;
    do
    :: pq <= cnt -> publish_rec(n, n + pq); pq++
    :: else -> break
    od;
    jseq = n + cnt; jown = 0; pq = 0
}

#if MUTANT == 6
#define J4_COUNT(c) 1
#else
#define J4_COUNT(c) (1 + RIDERS(c))
#endif

/* a writer may die at any step: its locks stay where they are */
#define DIE if :: skip :: (deaths < MAXDEATHS) -> deaths++; alive[me] = false; goto dead fi

/* J2 journal_fill_at(seq q) under latch (n, me), dying at any step */
inline fill(q, c, role, s, g) {
    r = (q) % N;
    ring_seq[r] = 0;                                    /* seq = 0; fence */
    DIE;
    atomic {                                            /* fields (relaxed) */
        ring_lseq[r] = n; ring_lown[r] = me;
        ring_cid[r] = c; ring_role[r] = role; ring_slot[r] = s; ring_gen[r] = g
    };
    DIE;
    ring_seq[r] = q;                                    /* seq = q (release, last) */
    DIE
}

proctype writer(byte me) {
    byte k = 0, c, s, g, n, r, i;
    bool ok;
    do
    :: k == CHANGES(me) -> break
    :: k < CHANGES(me) ->
        c = CID(me, k);
        s = SLOT(c);
        if
        :: RIDERS(c) == 0 -> goto fast
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
#if MUTANT == 1
        atomic {                                                /* J3 commit (too early) */
            if
            :: slot_lock[s] == 0 && slot_gen[s] == g -> slot_gen[s] = g + 1; committed[c] = true; ok = true
            :: else -> ok = false
            fi
        }
        DIE;
#endif
        fill(n + 1, c, 0, s, g + 1);                            /* J2 journal_fill_release */
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
        :: ok -> atomic { assert(jown == me && jseq == n); publish(n, 1); ok = false }   /* J4 */
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
        fill(n + 1, c, 0, s, g + 1);                            /* J2 journal_fill_release */
        i = 1;
        do                                                      /* journal_fill_riders */
        :: i <= RIDERS(c) -> fill(n + 1 + i, c, i, s, g + 1); i++
        :: else -> break
        od;
        atomic {                                                /* J3 commit: CAS L -> w' */
            assert(slot_lock[s] == c);      /* a live owner is never taken over */
            slot_lock[s] = 0; slot_gen[s] = g + 1; committed[c] = true; i = 0
        }
        DIE;
        atomic { assert(jown == me && jseq == n); publish(n, J4_COUNT(c)) }   /* J4 journal_publish_n */
next:
        k++
    od;
dead:
    atomic { done++ }
}

/* whichever process finds a dead owner; here one that does not die */
proctype takeovers() {
    byte s, n, r, c, i, last;
end_loop:
    do
    :: atomic {                                                 /* journal_takeover */
        jown != 0 && !alive[jown] ->
        n = jseq; r = (n + 1) % N;
#if MUTANT == 2
        if
        :: ring_seq[r] == n + 1 && ring_lseq[r] == n && ring_lown[r] == jown &&
           slot_gen[ring_slot[r]] == ring_gen[r] && slot_lock[ring_slot[r]] == 0 ->
#else
        if
        :: ring_seq[r] == n + 1 && ring_lseq[r] == n && ring_lown[r] == jown &&
           slot_gen[ring_slot[r]] == ring_gen[r] ->
#endif
            last = n + 1;                                       /* forward, with its riders */
            do
#if MUTANT == 5
            :: false -> skip
#elif MUTANT == 7
            :: last < n + MAX_FILL && ring_seq[(last + 1) % N] == last + 1 -> last++
#else
            :: last < n + MAX_FILL && ring_seq[(last + 1) % N] == last + 1 &&
               ring_lseq[(last + 1) % N] == n && ring_lown[(last + 1) % N] == jown -> last++
#endif
            :: else -> break
            od;
            publish(n, last - n)
        :: else -> jown = 0                                     /* back: none */
        fi;
        n = 0; r = 0; last = 0
       }
    :: atomic {                                                 /* takeover (slot), latch first */
        jown == 0 && ((slot_lock[0] != 0 && !alive[OWNER(slot_lock[0])]) ||
                      (slot_lock[1] != 0 && !alive[OWNER(slot_lock[1])])) ->
        if
        :: slot_lock[0] != 0 && !alive[OWNER(slot_lock[0])] -> s = 0
        :: slot_lock[1] != 0 && !alive[OWNER(slot_lock[1])] -> s = 1
        fi;
        jown = REC; n = jseq; c = slot_lock[s]
       };
       if
       :: sealed[s] == c ->                                     /* forward, on its behalf */
           i = 0;
           do                                                   /* J2, journal_fill_riders */
           :: i <= RIDERS(c) ->
               r = (n + 1 + i) % N;
               ring_seq[r] = 0;
               atomic {
                   ring_lseq[r] = n; ring_lown[r] = REC;
                   ring_cid[r] = c; ring_role[r] = i; ring_slot[r] = s; ring_gen[r] = slot_gen[s] + 1
               };
               ring_seq[r] = n + 1 + i;
               i++
           :: else -> break
           od;
           atomic { slot_lock[s] = 0; slot_gen[s]++; committed[c] = true }   /* J3 */
           atomic { publish(n, J4_COUNT(c)) }                                /* J4 */
       :: else ->
           atomic { slot_lock[s] = 0; jown = 0 }                /* back: no record */
       fi;
       atomic { s = 0; n = 0; r = 0; c = 0; i = 0 }
    od
}

/* follows the ring from seq 1; a lap is reported, then it resumes */
proctype reader() {
    byte next = 1, r, s1, s2, cid, role, expect, x;
end_read:
    do
    :: atomic { jseq >= next -> r = next % N; s1 = ring_seq[r] }
       atomic { cid = ring_cid[r]; role = ring_role[r] }        /* copy */
#if MUTANT == 3
       s2 = s1;
#else
       s2 = ring_seq[r];
#endif
       atomic {
           if
           :: s1 == next && s2 == next ->
               assert(cid == pubcid[next] && role == pubrole[next]);   /* the published record */
               /* a commit's records contiguously, in order */
               assert(expect == 0 || cid * ROLES + role == expect);
               if
               :: role < RIDERS(cid) -> expect = cid * ROLES + role + 1
               :: else -> expect = 0
               fi;
               next++
           :: else ->
               /* eng_journal_read: corrupt iff next + N > pub + MAX_FILL (never) */
               assert(next + N <= jseq + READER_FILL);
               /* JournalLappedError; resume_seq = journal_resume */
               if
               :: jseq + 1 + READER_FILL > N -> x = jseq + 1 + READER_FILL - N
               :: else -> x = 1
               fi;
               assert(x > next);                    /* past the lost seq: none twice */
               s1 = x;
               do                                   /* retention: resume .. pub still there */
               :: s1 <= jseq -> assert(ring_seq[s1 % N] == s1); s1++
               :: else -> break
               od;
               next = x; expect = 0
           fi;
           r = 0; s1 = 0; s2 = 0; cid = 0; role = 0; x = 0
       }
    :: atomic {
        done == NW && jown == 0 && slot_lock[0] == 0 && slot_lock[1] == 0 && next > jseq ->
        /* quiescent and drained: a record exists iff its change committed */
        x = 1;
        do
        :: x <= NC ->
            r = 0;
            do
            :: r <= RIDERS(x) -> assert(committed[x] == (recorded[x * ROLES + r] == 1)); r++
            :: else -> break
            od;
            x++
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
