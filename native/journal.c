/* ==== the journal: every committed change, once, in one order ==================== */
/*
 * Protocol (model: native/journal.pml, checked by `make verify`; the steps
 * below carry the model's names).  The journal is one latch word and a ring
 * of hdr.journal_records records (a power of two).  The latch word holds the
 * seq of the last published record above the holder's token (0: free).
 * Every commit of a slot word -- every CAS that moves its generation: a fast
 * or slow transition, an open, a release, a takeover's roll forward -- is
 * made by the latch holder, between filling the commit's record and
 * publishing it:
 *
 *   committer                                    journal_takeover (holder T proven dead):
 *     J1 journal_latch: CAS (n,0) -> (n,me)        r = the record for seq n + 1
 *        fast path: read the slot word now         forward iff r.seq == n + 1, r.latch ==
 *        (locked, or moved: journal_abort)           (n,T), and r's slot's generation
 *     J2 journal_fill_release: r.seq = 0;            reached r.word's: J3 ran (nobody else
 *        fence; fields (relaxed);                    commits while T holds the latch, and
 *        r.seq = n + 1 (release, last)               a lock does not move the generation)
 *     J3 commit: CAS slot word -> new word         forward: CAS (n,T) -> (n+1,0); wake
 *        failed: journal_abort: CAS (n,me)->(n,0)  back:    CAS (n,T) -> (n,0)
 *     J4 journal_publish: CAS (n,me) -> (n+1,0); wake readers
 *
 * The fast path reads the slot word under the latch (J1 first): a word read
 * before it could be committed past by another holder, and a record naming a
 * generation the slot already reached would read as committed (the model's
 * MUTANT 4).  A slot takeover that rolls a dead holder's transition forward
 * commits on its behalf: it takes the latch and fills the record from the
 * sealed copy, whose `cause` word carries the trigger, so the record exists
 * iff the commit does.  A slow path that cannot get the latch within the
 * bound gives its lock up unchanged (nothing committed, nothing recorded).
 *
 *   reader of seq k (never waits for a writer):
 *     k <= published seq (acquire, pairs with J4); s1 = r.seq (acquire, pairs
 *     with J2's release); copy (relaxed); fence (acquire, pairs with J2's
 *     fence); s2 = r.seq; whole iff s1 == s2 == k, else the ring moved past k:
 *     ENG_ELAPPED with the oldest seq still retained (published + 1 +
 *     ENG_JOURNAL_MAX_FILL - records, journal_resume), or ENG_ECORRUPT if
 *     k + records > published + ENG_JOURNAL_MAX_FILL (no holder can have
 *     refilled record k yet: never, the model asserts it).
 *
 *   journal_latch(s, t, &JL)                          J1 (takes a dead holder's latch over)
 *   journal_fill_release(s, JL, kind, trig, id, w, c) J2
 *   journal_publish(s, JL) / journal_abort(s, JL)     J4 / give the latch back
 *
 * Riders (keys.c, journal_fill_riders): a slot commit that also publishes an
 * open's key or a booked change's account books fills their records at
 * n + 2, n + 3 (J2, before J3, under the same latch) and J4 publishes them
 * with the slot's (journal_publish_n); a takeover that rolls forward
 * publishes every record filled under JL (each filled before J3, so all of
 * them), one that rolls back none.  At most ENG_JOURNAL_MAX_FILL records.
 * The slot's record counts them (eng_jrec.riders, stored before J3), so a
 * reader of the files tells a whole commit from one a power cut split.
 * The model has them (journal.pml: a commit of 1 + r records, r <= 2, and
 * the reader's retention of records - ENG_JOURNAL_MAX_FILL across the wrap);
 * its mutations 5-7 are a takeover that publishes only the slot's record, a
 * J4 that publishes n + 1 only, and a takeover that publishes a rider
 * without comparing its latch word with JL (a rider left at n + 2 by an
 * earlier holder of (n, T') rolled back).  The latch word is what makes the
 * takeover exact: a live holder never abandons a fill with riders (their J3
 * is a CAS from its own lock L, which only a takeover of a proven-dead owner
 * moves), so a record after n + 1 whose latch word is JL is one T filled
 * for the commit whose evidence the takeover read.
 *
 * Guarantees: a record exists iff its change committed, wherever a process
 * dies; seq is one total order that is the commit order of every slot; a
 * reader never gets a record twice, nor a torn one, nor skips one silently.
 * Does not guarantee: progress while a live latch holder is stopped (SIGSTOP):
 * commits wait their bound and report CONFLICT, as for a stopped lock owner;
 * retention of more than records - ENG_JOURNAL_MAX_FILL records (a holder
 * refilling the records after the last one may die mid-fill).
 *
 * The per-object append that replaces this latch (a change journals under its
 * own object's lock, so a stopped writer stalls only its object and the ring's
 * wrap) is specified and modelled in native/journal_append.pml (`make verify`),
 * not implemented yet; tests/test_journal_append.py holds the test it must
 * pass (xfail until then).
 */

#define JL_SEQ_SHIFT ENG_TOKEN_BITS

static void die_if(eng_seg *s, uint32_t fault);   /* transitions.c: the fault switches */
/* durable.c: 0 when record seq may be filled (the files hold the record it
 * overwrites), else ENG_EJOURNALFULL / ENG_EDURABLE; called before J1 */
static inline int journal_room(eng_seg *s, uint64_t seq);

/* A refused J1's code as a caller reports it: the durable refusals as they
 * are, anything else (a live holder past the bound) as `otherwise`. */
static inline int journal_refusal(int rc, int otherwise)
{
    return rc == ENG_EJOURNALFULL || rc == ENG_EDURABLE ? rc : otherwise;
}

static inline uint64_t jl_seq(uint64_t jl) { return jl >> JL_SEQ_SHIFT; }
static inline uint32_t jl_token(uint64_t jl) { return (uint32_t)(jl & ENG_TOKEN_MASK); }
static inline uint64_t jl_make(uint64_t seq) { return seq << JL_SEQ_SHIFT; }

static inline int cas_seq_cst_u64(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

static inline eng_jrec *jrec_at(const eng_seg *s, uint64_t seq)
{
    return &s->jring[seq & (s->jrecords - 1)];
}

/* The futex word readers sleep on: the latch word's low half (little-endian,
 * asserted in the header); every latch and publish moves it. */
static inline uint32_t *journal_futex(eng_journal *j) { return (uint32_t *)&j->latch; }

static inline int slot_kind(uint32_t kind)
{
    return kind == ENG_JK_OPEN || kind == ENG_JK_TRANSITION || kind == ENG_JK_RELEASE;
}

/* journal_takeover's evidence: did the commit of record (kind, id, word)
 * happen?  While its holder holds the latch nobody else commits the word
 * it names, and a lock or a latch does not move the part compared. */
static int journal_committed(eng_seg *s, uint32_t kind, uint64_t id, uint64_t word)
{
    uint64_t slot = id & ENG_ID_SLOT_MASK;
    if (kind == ENG_JK_HALT)
        return load_acquire_u32(&s->hdr->halted) == (uint32_t)word;
    if (kind == ENG_JK_KEY)   /* word: its key record; HELD(id) only by that insert's I6 */
        return slot < s->capacity && word < s->kpp &&
               load_acquire_u64(&s->keyrecs[slot * s->kpp + word].tag) ==
                   ((id << 8) | ENG_KR_HELD);
    if (kind == ENG_JK_ACCOUNT)   /* the version: moved only by a publish, never by a latch */
        return slot < s->max_accounts &&
               load_acquire_u64(&s->accounts[slot].word) >> ENG_AW_VERSION_SHIFT ==
                   word >> ENG_AW_VERSION_SHIFT;
    if (slot >= s->capacity)
        return 0;
    eng_slot *sl = slot_at(s, (uint32_t)slot);
    if (slot_kind(kind))
        return sw_gen(load_acquire_u64(&sl->word)) == sw_gen(word);
    if (kind == ENG_JK_PRICE)
        return pw_seq(load_acquire_u64(&sl->pword)) == pw_seq(word);
    return 0;
}

/* Resolve latch JL whose holder is proven dead (see the protocol).  1
 * forward, 2 back, 0 if the latch moved first. */
static int journal_takeover(eng_seg *s, uint64_t JL)
{
    eng_journal *j = s->journal;
    uint64_t n = jl_seq(JL);
    eng_jrec *r = jrec_at(s, n + 1);
    int forward = 0;
    if (load_acquire_u64(&r->seq) == n + 1 && load_relaxed_u64(&r->latch) == JL) {
        /* the holder is dead: the record stays as it is */
        forward = journal_committed(s, load_relaxed_u32(&r->kind), load_relaxed_u64(&r->id),
                                    load_relaxed_u64(&r->word));
    }
    /* forward: with the riders its holder filled under JL (all of them:
     * every fill comes before the commit, J3) */
    uint64_t last = n + forward;
    while (forward && last < n + ENG_JOURNAL_MAX_FILL &&
           load_acquire_u64(&jrec_at(s, last + 1)->seq) == last + 1 &&
           load_relaxed_u64(&jrec_at(s, last + 1)->latch) == JL)
        last++;
    uint64_t expected = JL;
    if (!cas_seq_cst_u64(&j->latch, &expected, jl_make(last)))
        return 0;
    if (forward && load_seq_cst_u32(&j->waiting) && exchange_seq_cst_u32(&j->waiting, 0))
        futex(journal_futex(j), FUTEX_WAKE, INT_MAX, NULL);
    return forward ? 1 : 2;
}

/* J1: take the journal latch.  0 with *out = the latched word, or
 * ENG_CONFLICT when a live holder kept it past the bound, or journal_room's
 * refusal (nothing taken). */
static int journal_latch(eng_seg *s, op_timer t, uint64_t *out)
{
    eng_journal *j = s->journal;
    s->jts = price_clock();   /* the record's time, read before the latch: not under it */
    uint64_t w = load_relaxed_u64(&j->latch);
    for (uint32_t step = 0; step < ENG_JOURNAL_WAIT_STEPS; step++) {
        if (!jl_token(w)) {
            /* room for every record this holder may fill (n + 1 and its riders,
             * up to n + ENG_JOURNAL_MAX_FILL), not only the first: a keyed,
             * booked open let in at the ring's last free record filled its
             * riders over two records the files still lacked, and the writer
             * failed (EOVERFLOW) with them lost */
            int room = journal_room(s, jl_seq(w) + ENG_JOURNAL_MAX_FILL);   /* waits unlatched */
            if (room)
                return room;
            uint64_t JL = w | s->token;
            if (cas_acq_rel_u64(&j->latch, &w, JL)) {   /* on failure w is reloaded */
                die_if(s, ENG_FAULT_DIE_AFTER_JLATCH);
                *out = JL;
                return 0;
            }
            cpu_relax();
            continue;
        }
        OP_RETRIES(t, 1);
        if (time_to_check_owner(step) && token_dead(s, jl_token(w)))
            journal_takeover(s, w);
        else
            backoff_step(step);
        w = load_acquire_u64(&j->latch);
    }
    return ENG_CONFLICT;
}

/* J2: fill the record for seq n + 1 under latch JL: kind, trigger, id, the
 * word the commit publishes, and the record after it (nwords words and its
 * version; words not given read as 0). */
static void journal_fill_at(eng_seg *s, uint64_t JL, uint64_t seq, uint32_t kind,
                            uint32_t trigger, uint64_t id, uint64_t word, const uint64_t *words,
                            uint32_t nwords, uint64_t version)
{
    eng_jrec *r = jrec_at(s, seq);
    store_relaxed_u64(&r->seq, 0);
    fence_release();   /* pairs with a reader's fence: one that copied a word below sees seq 0 */
    die_if(s, ENG_FAULT_DIE_IN_JFILL);
    if (seq != jl_seq(JL) + 1)
        die_if(s, ENG_FAULT_DIE_IN_RIDER);
    store_relaxed_u64(&r->latch, JL);
    /* the clock was read before the latch (J1): a holder that waited for it
     * must not record a time before the record published ahead of it */
    uint64_t ts = (uint64_t)s->jts, last = load_relaxed_u64(&s->journal->last_ts);
    if ((int64_t)ts < (int64_t)last)
        ts = last;
    store_relaxed_u64(&s->journal->last_ts, ts);   /* the latch's line: held by us */
    store_relaxed_u64((uint64_t *)&r->ts_ns, ts);
    store_relaxed_u64(&r->id, id);
    store_relaxed_u64(&r->word, word);
    store_relaxed_u32(&r->kind, kind);
    store_relaxed_u32(&r->trigger, trigger);
    for (uint32_t i = 0; i < nwords; i++)
        store_relaxed_u64(&r->w[i], load_relaxed_u64(&words[i]));
    store_relaxed_u64(&r->version, version);
    store_relaxed_u32(&r->riders, 0);   /* journal_fill_riders counts the slot record's */
    store_release_u64(&r->seq, seq);   /* last: the record is whole */
    die_if(s, ENG_FAULT_DIE_AFTER_JFILL);
    if (seq != jl_seq(JL) + 1)
        die_if(s, ENG_FAULT_DIE_AFTER_RIDER);
}

static inline void journal_fill_release(eng_seg *s, uint64_t JL, uint32_t kind,
                                        uint32_t trigger, uint64_t id, uint64_t word,
                                        const uint64_t *words, uint32_t nwords, uint64_t version)
{
    journal_fill_at(s, JL, jl_seq(JL) + 1, kind, trigger, id, word, words, nwords, version);
}

/* J2 of the records that ride on a slot commit of kind (see "riders"):
 * filled after the slot's own record (seq n + 1), at n + 2, ...; returns
 * how many.  Defined in keys.c, after the key records and the accounts. */
static uint32_t journal_fill_riders(eng_seg *s, uint64_t JL, uint32_t kind, uint64_t id,
                                    uint64_t L, const eng_ctx_rec *c);

/* J2 with the record words of context copy c. */
static inline void journal_fill_ctx(eng_seg *s, uint64_t JL, uint32_t kind, uint32_t trigger,
                                    uint64_t id, uint64_t word, const eng_ctx_rec *c)
{
    journal_fill_release(s, JL, kind, trigger, id, word, c->w, s->n_words,
                         load_relaxed_u64(&c->version));
}

/* J4: publish the record and give the latch up; wake sleeping readers.  The
 * CAS (seq_cst) pairs with a reader's seq_cst store of `waiting`. */
static void journal_publish_n(eng_seg *s, uint64_t JL, uint32_t count)
{
    eng_journal *j = s->journal;
    die_if(s, ENG_FAULT_DIE_BEFORE_JPUBLISH);
    uint64_t expected = JL;
    cas_seq_cst_u64(&j->latch, &expected, jl_make(jl_seq(JL) + count));   /* fails only if taken over */
    if (load_seq_cst_u32(&j->waiting) && exchange_seq_cst_u32(&j->waiting, 0))
        futex(journal_futex(j), FUTEX_WAKE, INT_MAX, NULL);
}

static inline void journal_publish(eng_seg *s, uint64_t JL) { journal_publish_n(s, JL, 1); }

/* Give the latch back, nothing published (the commit did not happen). */
static void journal_abort(eng_seg *s, uint64_t JL)
{
    uint64_t expected = JL;
    cas_acq_rel_u64(&s->journal->latch, &expected, jl_make(jl_seq(JL)));
}

/* J1-J4 around a commit by one CAS of a slot word from exactly w to nw (a
 * release, an abandoned open), recorded as kind with the published copy.
 * 0: committed and recorded; ENG_CONFLICT: the word moved, or a live latch
 * holder kept the latch past the bound (nothing changed). */
static int journal_commit(eng_seg *s, eng_slot *sl, uint64_t id, uint64_t w, uint64_t nw,
                          uint32_t kind)
{
    if (!s->journal)
        return cas_acq_rel_u64(&sl->word, &w, nw) ? 0 : ENG_CONFLICT;
    uint64_t JL;
    op_timer none = {NULL, 0};
    int rc = journal_latch(s, none, &JL);                                      /* J1 */
    if (rc)
        return journal_refusal(rc, ENG_CONFLICT);
    if (load_acquire_u64(&sl->word) != w) {
        journal_abort(s, JL);
        return ENG_CONFLICT;
    }
    journal_fill_ctx(s, JL, kind, 0, id, nw, copy_of(s, sl, sw_ctx(w)));      /* J2 */
    if (!cas_acq_rel_u64(&sl->word, &w, nw)) {                                 /* J3 */
        journal_abort(s, JL);
        return ENG_CONFLICT;
    }
    journal_publish(s, JL);                                                    /* J4 */
    return 0;
}

/* A price write, journaled (journal_prices): the holder of price latch
 * `latched` publishes rec as the commit (J3) of a record of kind price.
 * Every publish of a price word is then made by the journal latch holder
 * (the opening price of an open too, recorded by the open's own record). */
static int journal_price(eng_seg *s, eng_slot *sl, uint64_t latched, const eng_price_rec *rec,
                         uint64_t id)
{
    uint64_t JL;
    op_timer none = {NULL, 0};
    int rc = journal_latch(s, none, &JL);                                       /* J1 */
    if (rc) {
        price_unlatch(sl, latched);
        return journal_refusal(rc, ENG_EBUSY);
    }
    uint64_t q = pw_seq(latched) + 1;
    uint64_t words[REC_WORDS(eng_price_rec)];
    memcpy(words, rec, sizeof words);
    journal_fill_release(s, JL, ENG_JK_PRICE, 0, id, q << ENG_PW_SEQ_SHIFT, words,
                         REC_WORDS(eng_price_rec), q);                           /* J2 */
    if (price_publish(sl, latched, rec) != 0) {                                 /* J3 */
        journal_abort(s, JL);
        return ENG_EBUSY;
    }
    journal_publish(s, JL);                                                     /* J4 */
    return 0;
}

/* The emergency stop, journaled: a change of the flag is a record of kind
 * halt (word: the new flag); setting it to what it is records nothing. */
static int journal_halt(eng_seg *s, uint32_t on)
{
    uint64_t JL;
    op_timer none = {NULL, 0};
    int rc = journal_latch(s, none, &JL);                                       /* J1 */
    if (rc)
        return journal_refusal(rc, ENG_EBUSY);
    uint32_t old = on ^ 1;
    if (load_acquire_u32(&s->hdr->halted) == on) {
        journal_abort(s, JL);
        return 0;
    }
    journal_fill_release(s, JL, ENG_JK_HALT, 0, 0, on, NULL, 0, 0);             /* J2 */
    if (!cas_acq_rel_u32(&s->hdr->halted, &old, on)) {                          /* J3 */
        journal_abort(s, JL);   /* not reached: every change of the flag holds the latch */
        return ENG_EBUSY;
    }
    journal_publish(s, JL);                                                     /* J4 */
    return 0;
}

/* recover(): resolve the latch of a holder proven dead. */
static void journal_sweep(eng_seg *s)
{
    if (!s->journal)
        return;
    uint64_t w = load_acquire_u64(&s->journal->latch);
    uint32_t holder = jl_token(w);
    if (holder && holder != s->token && token_dead(s, holder))
        journal_takeover(s, w);
}

/* ---- the readers' calls --------------------------------------------------------- */

/* The words a record of kind holds (a torn kind read here is caught by the
 * seq re-check; the bound keeps the copy inside the record either way). */
static inline uint32_t journal_words(const eng_seg *s, uint32_t kind)
{
    _Static_assert(REC_WORDS(eng_books) <= ENG_MAX_FIELD_WORDS, "books fit a record");
    if (kind == ENG_JK_ACCOUNT)
        return ENG_DJ_ACCT_KEYLEN_WORD + 1;   /* books, key, key length */
    if (kind == ENG_JK_PRICE)
        return REC_WORDS(eng_price_rec);
    if (kind == ENG_JK_KEY)
        return ENG_KEY_MAX / 8;
    return kind == ENG_JK_HALT ? 0 : s->n_words;
}

uint64_t eng_journal_seq(eng_seg *s)
{
    if (seg_error(s) || !s->journal)
        return 0;
    return jl_seq(load_acquire_u64(&s->journal->latch));
}

static inline uint64_t journal_resume(const eng_seg *s)
{
    uint64_t pub = jl_seq(load_acquire_u64(&s->journal->latch));
    /* a holder filling after pub overwrites up to ENG_JOURNAL_MAX_FILL records */
    return pub + 1 + ENG_JOURNAL_MAX_FILL > s->jrecords ? pub + 1 + ENG_JOURNAL_MAX_FILL - s->jrecords : 1;
}

/* Copy up to max records with seq > after into out, in seq order.  0 with
 * *out_n (0 when there is nothing new), or ENG_ELAPPED with *out_resume =
 * the oldest seq still retained when the record after `after` is gone. */
int eng_journal_read(eng_seg *s, uint64_t after, eng_jrec *out, uint32_t max, uint32_t *out_n,
                     uint64_t *out_resume)
{
    CHECK_SEG(s);
    if (!out || !out_n || !out_resume)
        return ENG_EBADARG;
    *out_n = 0;
    *out_resume = 0;
    if (!s->journal)
        return ENG_ENOJOURNAL;
    uint64_t pub = jl_seq(load_acquire_u64(&s->journal->latch));   /* pairs with J4 */
    uint32_t n = 0;
    for (uint64_t k = after + 1; k <= pub && n < max; k++) {
        const eng_jrec *r = jrec_at(s, k);
        eng_jrec *o = &out[n];
        uint64_t s1 = load_acquire_u64(&r->seq);                  /* pairs with J2's release */
        if (s1 == k) {
            o->latch = load_relaxed_u64(&r->latch);
            o->ts_ns = (int64_t)load_relaxed_u64((const uint64_t *)&r->ts_ns);
            o->id = load_relaxed_u64(&r->id);
            o->word = load_relaxed_u64(&r->word);
            o->kind = load_relaxed_u32(&r->kind);
            o->trigger = load_relaxed_u32(&r->trigger);
            uint32_t nw = journal_words(s, o->kind);
            for (uint32_t i = 0; i < nw; i++)
                o->w[i] = load_relaxed_u64(&r->w[i]);
            for (uint32_t i = nw; i < ENG_MAX_FIELD_WORDS; i++)
                o->w[i] = 0;
            o->version = load_relaxed_u64(&r->version);
            o->riders = load_relaxed_u32(&r->riders);
            o->pad = 0;
            fence_acquire();                                       /* pairs with J2's fence */
        }
        if (s1 != k || load_relaxed_u64(&r->seq) != k) {
            if (n)
                break;   /* hand over what was whole; the next call reports the lap */
            /* a writer refills record k only once it fills seq k + records, at
             * most ENG_JOURNAL_MAX_FILL past the published seq: read before
             * that, a record that is not k's is corrupt, not lapped (a lap's
             * resume seq is then always past k) */
            if (k + s->jrecords > jl_seq(load_acquire_u64(&s->journal->latch)) +
                                      ENG_JOURNAL_MAX_FILL)
                return ENG_ECORRUPT;
            *out_resume = journal_resume(s);
            return ENG_ELAPPED;
        }
        o->seq = k;
        n++;
    }
    *out_n = n;
    return 0;
}

/* Block until the journal holds a seq > after, or timeout_ns pass.
 * ENG_APPLIED with *out_seq, ENG_ETIMEDOUT, ENG_EINTR (a signal: the caller
 * runs its handlers and calls again), ENG_ECLOSED (close() began). */
int eng_journal_wait(eng_seg *s, uint64_t after, int64_t timeout_ns, uint64_t *out_seq)
{
    CHECK_SEG(s);
    if (timeout_ns < 0 || !out_seq)
        return ENG_EBADARG;
    if (!s->journal)
        return ENG_ENOJOURNAL;
    if (timeout_ns > ENG_MAX_TIMEOUT_NS)
        timeout_ns = ENG_MAX_TIMEOUT_NS;
    eng_journal *j = s->journal;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + timeout_ns;
    for (;;) {
        if (load_acquire_u32(&s->gate_shut))   /* close() is waiting: see the close gate */
            return ENG_ECLOSED;
        uint64_t seq = jl_seq(load_acquire_u64(&j->latch));
        uint32_t seen = 0;
        if (seq <= after) {
            /* about to sleep: announce it, then read the word (see journal_publish) */
            store_seq_cst_u32(&j->waiting, 1);
            seen = load_seq_cst_u32(journal_futex(j));
            seq = jl_seq(load_acquire_u64(&j->latch));
        }
        if (seq > after) {
            *out_seq = seq;
            return ENG_APPLIED;
        }
        int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0)
            return ENG_ETIMEDOUT;
        if (left > ENG_WAIT_SLICE_NS)
            left = ENG_WAIT_SLICE_NS;
        struct timespec ts = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
        if (futex(journal_futex(j), FUTEX_WAIT, seen, &ts) != 0 && errno == EINTR)
            return ENG_EINTR;
        /* a holder that died after its commit leaves it unpublished until
         * someone resolves the latch: a waiter does, once per slice */
        uint64_t jw = load_acquire_u64(&j->latch);
        if (jl_token(jw) && jl_token(jw) != s->token && token_dead(s, jl_token(jw)))
            journal_takeover(s, jw);
    }
}
