/*
 * records.h - the record helpers the hot calls use (most static inline): the
 * latch-seqlock, the price word (the price latch), contexts, id checks and
 * the preambles of the exported calls.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== the latch-seqlock: two copies and a word ================================== */
/*
 * Every versioned record in the segment -- a slot's price, a slot's context,
 * an account's books -- is two copies and one 64-bit word that names the
 * published copy and moves with every publish.  A writer first owns the word
 * (the price latch, the slot's transition lock, the account latch: each puts
 * the owner's token in it; their own sections say how they are taken), then:
 *
 *   writer (owns the word: L):                  reader (never waits):
 *     W0 fence (release)                          w1 = word (acquire)      [pairs with W3]
 *     W1 fill the copy L does NOT name            R1 copy the copy w1 names (relaxed words)
 *        (relaxed words)                          R2 fence (acquire)       [pairs with W0]
 *     W2 seal = L (release), if it has a seal     w2 = word (relaxed)
 *     W3 CAS L -> next, which names W1's copy     retry unless w1 and w2 agree on
 *                                                 the bits every publish moves
 *
 * If w1 and w2 agree, nobody published while the read ran, so nobody wrote
 * the copy read: the owner of the word writes the other copy, and a later
 * owner starts only after a publish, which moves the word.  W0/R2 make this
 * hold on weakly ordered CPUs too: a reader that saw any word of a later
 * writer's W1 also sees the word that writer advanced from, so its w2
 * differs.  W3 is one CAS from exactly L: it publishes and gives the word up
 * in one step, so a writer whose word was taken over (its owner proven dead)
 * never makes its copy visible.  The seal (W2, written last) is what a
 * takeover decides by: a copy sealed with the exact owned word was whole
 * before its owner stopped.
 *
 *   seq_read_acquire(s, &word, watch, copy_fn, obj, out, &w1)   the reader
 *   seq_fill_release(dst, src, nwords, seal, L)                  W0-W2
 *   seq_publish_acq_rel(&word, L, next)                          W3
 *
 * Guarantees: a reader never waits for a writer, not even one killed
 * mid-write, and never returns a torn copy; versions never go backwards;
 * nothing a taken-over writer wrote becomes visible.
 * Does not guarantee: progress for a reader while writers publish back to
 * back forever (ENG_EBUSY after READ_RETRIES tries); telling apart two
 * words that agree on every watched bit (a 16-bit generation that wrapped
 * during one read).
 */

/* R1 of a reader: copy into out what obj publishes under word value w. */
typedef void (*seq_copy_fn)(eng_seg *s, const void *obj, uint64_t w, void *out);

/* The reader (R0-R2): 0 with *out_w = the word the copy belongs to, or
 * ENG_EBUSY.  watch: the bits of the word every publish moves. */
static inline int seq_read_acquire(eng_seg *s, const uint64_t *word, uint64_t watch,
                                   seq_copy_fn copy, const void *obj, void *out,
                                   uint64_t *out_w)
{
    for (uint32_t i = 0; i < READ_RETRIES; i++) {
        uint64_t w1 = load_acquire_u64(word);                      /* pairs with W3 */
        copy(s, obj, w1, out);                                     /* R1 */
        fence_acquire();                                           /* R2: pairs with W0 */
        if (__builtin_expect(((load_relaxed_u64(word) ^ w1) & watch) == 0, 1)) {
            *out_w = w1;
            return 0;
        }
        if (i > SPIN_STEPS)
            sched_yield();
    }
    return ENG_EBUSY;
}

/* W0-W2: the owner of L fills the unpublished copy dst from src (nwords
 * words of its own, private memory: read plainly) and, if the record has a
 * seal, seals it with L, last. */
static inline void seq_fill_release(void *dst, const void *src, size_t nwords, uint64_t *seal,
                                    uint64_t L)
{
    uint64_t *d = dst;
    const uint64_t *from = src;
    fence_release();                                               /* W0 */
#pragma GCC unroll 4   /* a price copy (4 words) stays in registers */
    for (size_t i = 0; i < nwords; i++)
        store_relaxed_u64(&d[i], from[i]);                         /* W1 */
    if (seal)
        store_release_u64(seal, L);                                /* W2 */
}

/* W3: publish and give the word up, by one CAS from exactly L.  0, or
 * ENG_EBUSY if L was taken over (nothing became visible). */
static inline int seq_publish_acq_rel(uint64_t *word, uint64_t L, uint64_t next)
{
    return cas_acq_rel_u64(word, &L, next) ? 0 : ENG_EBUSY;
}

/* ==== the price word: the price latch ============================================ */
/*
 * A slot's price is a latch-seqlock (above) whose word is eng_slot.pword:
 * sequence (the version) above the writer's token; copy seq & 1 is the
 * published one.  The latch is CAS (q, 0) -> (q, token); a holder that keeps
 * it past the bound is checked, and if it is proven dead the latch is taken
 * over (its half-written copy was never published, so nothing needs repair).
 * Publishing is CAS (q, token) -> (q + 1, 0).  A price copy has no seal.
 */

#define PW_SEQ_BITS (~ENG_TOKEN_MASK)   /* what every publish moves */

static inline uint64_t pw_seq(uint64_t pw) { return pw >> ENG_PW_SEQ_SHIFT; }
static inline uint32_t pw_token(uint64_t pw) { return (uint32_t)(pw & ENG_TOKEN_MASK); }

static void copy_price(eng_seg *s, const void *obj, uint64_t pw, void *out)
{
    (void)s;
    const eng_slot *sl = obj;
    copy_words_relaxed(out, &sl->price[pw_seq(pw) & 1], REC_WORDS(eng_price_rec));
}

static int read_price_rec(const eng_slot *sl, eng_price_rec *out, uint64_t *version)
{
    uint64_t pw;
    int rc = seq_read_acquire(NULL, &sl->pword, PW_SEQ_BITS, copy_price, sl, out, &pw);
    if (rc == 0)
        *version = pw_seq(pw);
    return rc;
}

/* Take the latch; *latched receives the latched word.  Step 0 of the loop
 * inline (a free latch: one CAS), the rest out of line (token_lock_u64). */
static inline int price_latch(eng_seg *s, eng_slot *sl, op_timer t, uint64_t *latched)
{
    uint64_t cur = load_relaxed_u64(&sl->pword);
    uint64_t mine = (cur & ~ENG_TOKEN_MASK) | s->token;
    if (pw_token(cur) == 0 && cas_acq_rel_u64(&sl->pword, &cur, mine)) {
        *latched = mine;
        return 0;
    }
    OP_RETRIES(t, 1);
    backoff_step(0);
    return token_lock_u64(s, &sl->pword, ~ENG_TOKEN_MASK, t, latched, 1);
}

/* Publish rec and unlatch (W0-W3).  ENG_EBUSY if the latch was taken over
 * meanwhile (nothing became visible). */
static inline int price_publish(eng_slot *sl, uint64_t latched, const eng_price_rec *rec)
{
    uint64_t q = pw_seq(latched);
    seq_fill_release(&sl->price[(q + 1) & 1], rec, REC_WORDS(eng_price_rec), NULL, 0);
    return seq_publish_acq_rel(&sl->pword, latched, (q + 1) << ENG_PW_SEQ_SHIFT);
}

/* Unlatch without publishing: 0, or ENG_EBUSY if it was not latched so. */
static int price_unlatch(eng_slot *sl, uint64_t latched)
{
    return seq_publish_acq_rel(&sl->pword, latched, latched & ~ENG_TOKEN_MASK);
}

static inline int price_ok(double p) { return isfinite(p) && p > 0.0; }

/* Open, holding the price latch: the opening's PnL inputs, beside the price
 * word (ordered before any later latch holder by our publish, W3). */
static inline void price_set_pnl(eng_slot *sl, double entry, double size)
{
    store_relaxed_u64(&sl->pnl_entry, f8_bits(entry));
    store_relaxed_u64(&sl->pnl_size, f8_bits(size));
}

/* Holder of the price latch: the record of price at ts, with PnL from the
 * inputs open left beside the price word (0 when the spec has no PnL
 * roles).  size = amount x side, and side is its sign: this is pnl_pct =
 * (price - entry) / entry * 100 * side and pnl_usd = (price - entry) *
 * amount * side, bit for bit (a product with +-1 is exact). */
static inline void price_rec_at(const eng_seg *s, const eng_slot *sl, eng_price_rec *r,
                                double price, int64_t ts)
{
    r->price = price;
    r->ts_ns = ts;
    r->pnl_pct = r->pnl_usd = 0.0;
    if (s->pnl) {
        double entry = as_f8(load_relaxed_u64(&sl->pnl_entry));
        double size = as_f8(load_relaxed_u64(&sl->pnl_size));
        double diff = price - entry;
        r->pnl_pct = diff / entry * 100.0 * copysign(1.0, size);
        r->pnl_usd = diff * size;
    }
}

/* The trailing peak pair of exits (see "exits fired by the price"): after
 * the slot's record copies; peaks[q & 1] belongs to price sequence q. */
static inline uint64_t *slot_peaks(const eng_seg *s, const eng_slot *sl)
{
    return (uint64_t *)((uint8_t *)sl + ENG_SLOT_HEAD + 2ULL * s->rec_size);
}

/* Holder of the price latch `latched`: the peak that its publish makes the
 * slot's (ordered before the publish by W3, read only by latch holders). */
static inline void exit_peak_set(const eng_seg *s, const eng_slot *sl, uint64_t latched, double peak)
{
    store_relaxed_u64(&slot_peaks(s, sl)[(pw_seq(latched) + 1) & 1], f8_bits(peak));
}

/* ==== contexts: published by the state word ===================================== */
/*
 * A slot's context is a latch-seqlock (above) whose word is the state word:
 * its C bit names the published copy, and the transition lock (see
 * transitions) is what owns it.  The copy's `commit` field is its seal: the
 * exact locked word it was written under, so a takeover rolls forward only
 * when it equals the locked word it finds.  The commit CAS flips C, so the
 * context and the state become visible in one step.  Readers watch state,
 * generation and C: a lock taken meanwhile does not move them.
 *
 * The copy a reader reads is written only by a holder that locked after the
 * commit that made it unpublished again, which moved the generation; W0/R2
 * make a reader that saw any of its words also see that generation.
 */

static inline eng_slot *slot_at(const eng_seg *s, uint32_t i)
{
    return (eng_slot *)(s->slots + (uint64_t)i * s->slot_size);
}

/* Record copy c (0 or 1) of a slot; only its first rec_size bytes exist. */
static inline eng_ctx_rec *copy_of(const eng_seg *s, const eng_slot *sl, uint32_t c)
{
    return (eng_ctx_rec *)((uint8_t *)sl + sizeof(eng_slot) + c * s->rec_size);
}

static inline uint32_t rec_words(const eng_seg *s) { return ENG_REC_META_WORDS + s->n_words; }

typedef struct ctx_view {
    eng_ctx_rec *rec;
    uint32_t opening;        /* changes only while the slot is free: inside the window */
} ctx_view;

static void copy_ctx(eng_seg *s, const void *obj, uint64_t w, void *out)
{
    const eng_slot *sl = obj;
    ctx_view *v = out;
    v->opening = load_relaxed_u32(&sl->opening);
    copy_words_relaxed(v->rec, copy_of(s, sl, sw_ctx(w)), rec_words(s));
}

/* Read the published context with the word it belongs to. */
static int read_ctx(eng_seg *s, const eng_slot *sl, eng_ctx_rec *out, uint64_t *word,
                    uint32_t *opening)
{
    ctx_view v = {out, 0};
    int rc = seq_read_acquire(s, &sl->word, SW_COMMITTED, copy_ctx, sl, &v, word);
    if (rc == 0 && opening)
        *opening = v.opening;
    return rc;
}

/* ==== id checks ================================================================== */

static inline int slot_of_id(eng_seg *s, uint64_t id, eng_slot **out)
{
    if (id > ENG_ID_MAX || (id & ENG_ID_SLOT_MASK) >= s->capacity)
        return ENG_EBADSLOT;
    *out = slot_at(s, (uint32_t)(id & ENG_ID_SLOT_MASK));
    return 0;
}

/* 0 if the slot's word w (loaded with acquire) and its opening count
 * (loaded after it) belong to the opening named by id. */
static inline int opening_check(uint64_t w, uint32_t cur, uint64_t id)
{
    uint32_t want = id_opening(id);
    if (want == cur && sw_state(w))
        return 0;
    if (want == 0 || want > cur)
        return ENG_ENOTOPEN;
    return ENG_ESTALE;
}

static inline int id_live(const eng_slot *sl, uint64_t w, uint64_t id)
{
    return opening_check(w, load_relaxed_u32(&sl->opening), id);
}

/* The id's slot and state word (acquire), and 0 if the id names the slot's
 * open opening. */
static inline int id_word(eng_seg *s, uint64_t id, eng_slot **sl, uint64_t *w)
{
    int rc = slot_of_id(s, id, sl);
    if (rc)
        return rc;
    *w = load_acquire_u64(&(*sl)->word);
    return id_live(*sl, *w, id);
}

/* A key argument (len bytes at key) as an eng_key, or ENG_EBADKEY: a
 * position's key (keys.c) and an account's (accounts.c) alike. */
static int key_from(const char *key, uint32_t len, eng_key *k)
{
    if (!key || len < 1 || len > ENG_KEY_MAX)
        return ENG_EBADKEY;
    memset(k, 0, sizeof *k);
    k->len = (uint16_t)len;
    memcpy(k->key, key, len);
    return 0;
}

/* ---- preambles of the exported calls ----------------------------------------
 * The view first (closed, forked), then the caller's own argument check
 * (arg_rc: 0, or the error it found), then the id, in that order: a call
 * given several bad arguments always names the same one. */

/* A call by id that needs the opening open now: its slot and state word. */
static inline int enter_id(eng_seg *s, uint64_t id, int arg_rc, eng_slot **sl, uint64_t *w)
{
    int rc = seg_error(s);
    if (rc == 0)
        rc = arg_rc;
    return rc ? rc : id_word(s, id, sl, w);
}

/* A call by id that checks the opening itself, where it reads: the slot. */
static inline int enter_slot(eng_seg *s, uint64_t id, eng_slot **sl)
{
    int rc = seg_error(s);
    return rc ? rc : slot_of_id(s, id, sl);
}

/* A transition: the slot, then the trigger. */
static inline int enter_transition(eng_seg *s, uint64_t id, uint32_t trigger, eng_slot **sl)
{
    int rc = enter_slot(s, id, sl);
    return rc == 0 && trigger >= s->n_triggers ? ENG_EBADTRIGGER : rc;
}

/* A call by slot index (tools): the index, then its output pointer. */
static inline int enter_index(eng_seg *s, uint32_t slot, int out_ok)
{
    int rc = seg_error(s);
    if (rc == 0 && slot >= s->capacity)
        rc = ENG_EBADSLOT;
    return rc == 0 && !out_ok ? ENG_EBADARG : rc;
}

/* A vector call: its output pointers (outs_ok), then its arrays (arrays_ok)
 * unless it has no element. */
static inline int enter_vector(eng_seg *s, int outs_ok, uint64_t n, int arrays_ok)
{
    int rc = seg_error(s);
    return rc == 0 && (!outs_ok || (n && !arrays_ok)) ? ENG_EBADARG : rc;
}
