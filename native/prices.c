/*
 * prices.c - prices, the vector calls, waiting for a change, and the snapshot.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== prices ======================================================================= */
/*
 * Every price write -- update_price, update_prices, update_token_price -- is
 * write_price_checked: latch the slot's price, check under the latch that
 * the slot still holds what the caller names (the opening an id names, or an
 * open position on a token: state word, opening and token hint in one read
 * of the state word), and publish the price with PnL from the inputs open
 * left beside the price word.  An opener takes the latch before anything of
 * its new opening is visible and writes those inputs under it, so inputs
 * read under a latch whose check passed are the checked opening's: a price
 * writer touches the slot's first two lines and never reads its context.
 *
 * update_prices checks the caller's arrays first, touching no slot: one id
 * out of range or naming opening 0 (never issued), or one price not finite
 * and > 0, refuses the whole call with its index (blocks of ENG_BATCH_CHECK
 * elements are checked without a branch per element).  Then one pass writes
 * each slot as update_price would, prefetching the slot ENG_BATCH_PREFETCH
 * ids ahead; an id whose opening is not the slot's open one when its turn
 * comes (released, or not issued yet) is skipped, and only what was written
 * is counted.  A live latch holder past the bound stops the pass (ENG_EBUSY,
 * with its index; what came before it was written).
 */

/* What the check under the latch reads, inside one read of the state word
 * (opening and token hint change only while the slot is free). */
typedef struct slot_view {
    uint32_t opening;
    int64_t  token;
    double   stop, take, trail;   /* exits: the levels of an armed position (else 0) */
} slot_view;

static void copy_slot_view(eng_seg *s, const void *obj, uint64_t w, void *out)
{
    (void)s; (void)w;
    const eng_slot *sl = obj;
    slot_view *v = out;
    v->opening = load_relaxed_u32(&sl->opening);
    v->token = (int64_t)load_relaxed_u64((const uint64_t *)&sl->token);
}

/* The same for a check by id: the opening alone. */
static void copy_slot_opening(eng_seg *s, const void *obj, uint64_t w, void *out)
{
    (void)s; (void)w;
    ((slot_view *)out)->opening = load_relaxed_u32(&((const eng_slot *)obj)->opening);
}

static inline int is_open_state(eng_seg *s, uint32_t st)
{
    return st != 0 && !(st & s->hdr->closed_mask);
}

enum { BY_ID, BY_TOKEN };

/* ==== exits fired by the price ===================================================
 *
 * A spec with exits names an armed state and a trigger (exit_armed,
 * exit_trigger).  Every price write (update_price, update_prices,
 * update_token_price: all through write_price_checked) to a position in the
 * armed state checks its levels, in side space (x = price x side, side the
 * sign of the opening's pnl_size):
 *
 *   STOP_LOSS      stop  > 0 and x <= stop x side
 *   TRAILING_STOP  trail > 0 and x <= peak - trail
 *   TAKE_PROFIT    take  > 0 and x >= take x side       (first that holds wins)
 *
 * peak is the highest x written while armed, the entry's at first.  It is
 * part of the price record: peaks[q & 1] (after the slot's record copies)
 * belongs to price sequence q, is written by the latch holder with its copy
 * and made the slot's by the same publish (W3), so a writer killed before
 * its publish leaves the peak as it was, with the price.
 *
 * A crossing fires BEFORE the price is published, holding the price latch:
 * the armed trigger's slow-path commit (lock_slot, commit_with_update) with
 * exit_reason and exit_price in the same commit, from exactly the state word
 * the levels were read under (if it moved, the check is made again), so
 * waiters wake, metrics count it (ENG_OP_EXIT) and a rolled-forward or -back
 * takeover treats it as any transition.  Guarantees:
 *   - a write killed anywhere has done a prefix of (fire, publish): nothing;
 *     the fire alone (its price unpublished, exit_price = that price); or
 *     both.  A crossing price is never published on an armed position
 *     without its fire, except while the engine is halted (then nothing
 *     fires, and the price is written);
 *   - exactly once per arming: the fire is a commit out of the armed state,
 *     and a slot's writers hold its latch in turn;
 *   - a position that is not in the armed state (paused, exiting) never fires.
 * Does not guarantee: a fire for a crossing written before the position was
 * armed (RESUME, EXIT_CANCELLED): the next write decides; a price write that
 * fires waits for the slot's transition lock (bounded: a live holder past the
 * bound makes the write ENG_EBUSY, nothing published).
 */

/* A level of record copy c (0: the spec has no such field, or it is off). */
static inline double level_of(const eng_seg *s, const eng_ctx_rec *c, uint32_t role)
{
    uint8_t wi = s->roles[role];
    return wi == ENG_ROLE_NONE ? 0.0 : as_f8(load_relaxed_u64(&c->w[wi]));
}

/* Copy for a writer's check: the opening, the token and, if w is in the
 * armed state, the levels of the copy w publishes. */
static void copy_slot_exits(eng_seg *s, const void *obj, uint64_t w, void *out)
{
    const eng_slot *sl = obj;
    slot_view *v = out;
    v->opening = load_relaxed_u32(&sl->opening);
    v->token = (int64_t)load_relaxed_u64((const uint64_t *)&sl->token);
    v->stop = v->take = v->trail = 0.0;
    if (sw_state(w) == s->exit_armed) {
        const eng_ctx_rec *c = copy_of(s, sl, sw_ctx(w));
        v->stop = level_of(s, c, ENG_ROLE_STOP_LOSS);
        v->take = level_of(s, c, ENG_ROLE_TAKE_PROFIT);
        v->trail = level_of(s, c, ENG_ROLE_TRAILING);
    }
}

static inline uint32_t exit_reason_at(const slot_view *v, double side, double x, double peak)
{
    if (v->stop > 0.0 && x <= v->stop * side)
        return ENG_EXIT_STOP_LOSS;
    if (v->trail > 0.0 && x <= peak - v->trail)
        return ENG_EXIT_TRAILING_STOP;
    if (v->take > 0.0 && x >= v->take * side)
        return ENG_EXIT_TAKE_PROFIT;
    return ENG_EXIT_NONE;
}

/* Holder of the price latch, which checked the position under state word w:
 * fire the armed trigger with (reason, price).  Returns 0 to publish the
 * price (fired; or no longer armed nor crossing; or halted), or an error
 * that leaves the price unpublished: ENG_ESTALE (the opening is gone),
 * ENG_EBUSY (a live holder kept the slot locked past the bound). */
static __attribute__((noinline, cold)) int exit_fire(eng_seg *s, eng_slot *sl, uint64_t w,
                                                    slot_view v, uint64_t id, double price,
                                                    double side, double peak, uint32_t reason)
{
    op_timer t = op_begin(s, ENG_OP_EXIT);
    if (id == 0)   /* by token: the opening the check saw */
        id = make_id(v.opening, (uint32_t)(((uint8_t *)sl - s->slots) / s->slot_size));
    int rc;
    for (uint32_t tries = 0;; tries++) {
        uint64_t L;
        rc = lock_slot(s, sl, id, s->exit_trigger, 0, t, &L);
        if (rc != ENG_APPLIED)
            break;
        if (((L ^ w) & SW_COMMITTED) == 0) {   /* locked from the word the levels came from */
            eng_ctx_update u = {.mask = 0};
            uint8_t r = s->roles[ENG_ROLE_EXIT_REASON], p = s->roles[ENG_ROLE_EXIT_PRICE];
            if (r != ENG_ROLE_NONE) {
                u.mask |= 1u << r;
                u.w[r] = reason;
            }
            u.mask |= 1u << p;
            u.w[p] = f8_bits(price);
            rc = commit_with_update(s, sl, L, &u, t);
            if (rc == ENG_APPLIED)
                die_if(s, ENG_FAULT_DIE_IN_EXIT);   /* tests: fired, price not yet published */
            break;
        }
        unlock_unchanged(sl, L);   /* it moved since the check: check again */
        if (tries >= CAS_RETRIES) {
            rc = ENG_CONFLICT;
            break;
        }
        rc = seq_read_acquire(s, &sl->word, SW_COMMITTED, copy_slot_exits, sl, &v, &w);
        if (rc == 0 && opening_check(w, v.opening, id) != 0)
            rc = ENG_ESTALE;
        if (rc)
            break;
        reason = sw_state(w) == s->exit_armed ? exit_reason_at(&v, side, price * side, peak) : 0;
        if (!reason) {
            rc = ENG_INVALID;
            break;
        }
    }
    op_end(t, rc);
    if (rc == ENG_APPLIED || rc == ENG_INVALID || rc == ENG_HALTED)
        return 0;
    return rc == ENG_ESTALE || rc == ENG_ENOTOPEN ? ENG_ESTALE : ENG_EBUSY;
}

/* Holder of the price latch `latched`, which checked the position under
 * state word w (view v): carry the peak into the copy about to be
 * published, and fire if armed and crossing.  0, or exit_fire's error. */
ALWAYS_INLINE int exit_check(eng_seg *s, eng_slot *sl, uint64_t latched, uint64_t w,
                             const slot_view *v, double price, uint64_t id)
{
    uint64_t *pk = slot_peaks(s, sl);
    uint64_t q = pw_seq(latched);
    double peak = as_f8(load_relaxed_u64(&pk[q & 1])), next = peak;
    uint32_t reason = ENG_EXIT_NONE;
    double side = 1.0;
    if (sw_state(w) == s->exit_armed) {
        side = copysign(1.0, as_f8(load_relaxed_u64(&sl->pnl_size)));
        double x = price * side;
        reason = exit_reason_at(v, side, x, peak);
        next = x > peak ? x : peak;
    }
    store_relaxed_u64(&pk[(q + 1) & 1], f8_bits(next));   /* published by our W3 */
    if (__builtin_expect(reason != ENG_EXIT_NONE, 0))
        return exit_fire(s, sl, w, *v, id, price, side, peak, reason);
    return 0;
}

/* Test fault ENG_FAULT_TEAR_PRICE: a price write without the seqlock
 * discipline.  The latch holder writes rec into the copy the word names (the
 * one readers copy) -- price and timestamp, a yield, then the PnL -- and the
 * word does not move, so a reader in between returns the new price with the
 * PnL of the one before and its recheck passes.  The ordinary publish
 * follows.  The vector writes honour it (their callers read the fault word
 * once per call); update_price passes tear = 0, a constant, so its machine
 * code is the hot path's with or without the fault. */
static __attribute__((noinline, cold)) void price_write_torn(eng_slot *sl, uint64_t latched,
                                                             const eng_price_rec *rec)
{
    eng_price_rec *live = &sl->price[pw_seq(latched) & 1];
    store_relaxed_u64((uint64_t *)&live->price, f8_bits(rec->price));
    store_relaxed_u64((uint64_t *)&live->ts_ns, (uint64_t)rec->ts_ns);
    sched_yield();
    store_relaxed_u64((uint64_t *)&live->pnl_pct, f8_bits(rec->pnl_pct));
    store_relaxed_u64((uint64_t *)&live->pnl_usd, f8_bits(rec->pnl_usd));
}

static inline int tear_fault(eng_seg *s)
{
    return __builtin_expect(load_relaxed_u32(&s->hdr->fault_flags) & ENG_FAULT_TEAR_PRICE, 0) &&
           faults_allowed();
}

/* Write price at ts into sl if, under its latch, it holds the open opening
 * the id `key` names (BY_ID) or an open position on token `key` (BY_TOKEN).
 * tear: the test fault ENG_FAULT_TEAR_PRICE is on (see price_write_torn).
 * Returns 0, ENG_ESTALE (nothing written), or ENG_EBUSY. */
ALWAYS_INLINE int write_price_checked(eng_seg *s, eng_slot *sl, double price, int64_t ts,
                                      op_timer t, int by, uint64_t key, int tear)
{
    uint64_t latched, w;
    slot_view v;
    eng_price_rec r;
    int rc = price_latch(s, sl, t, &latched);
    if (__builtin_expect(rc, 0))
        return rc;
    if (s->exit_armed)   /* the levels too (two inlined reads: no indirect call) */
        rc = seq_read_acquire(s, &sl->word, SW_COMMITTED, copy_slot_exits, sl, &v, &w);
    else
        rc = seq_read_acquire(s, &sl->word, SW_COMMITTED,
                              by == BY_ID ? copy_slot_opening : copy_slot_view, sl, &v, &w);
    if (rc == 0 && !(by == BY_ID ? opening_check(w, v.opening, key) == 0
                                 : is_open_state(s, sw_state(w)) && v.token == (int64_t)key))
        rc = ENG_ESTALE;
    if (rc == 0 && s->exit_armed)   /* a spec with exits: see "exits fired by the price" */
        rc = exit_check(s, sl, latched, w, &v, price, by == BY_ID ? key : 0);
    if (__builtin_expect(rc, 0)) {
        price_unlatch(sl, latched);
        return rc;
    }
    price_rec_at(s, sl, &r, price, ts);
    if (__builtin_expect(tear, 0))
        price_write_torn(sl, latched, &r);
    if (s->jprices)
        return journal_price(s, sl, latched, &r,
                             make_id(v.opening, (uint32_t)(((uint8_t *)sl - s->slots) / s->slot_size)));
    return price_publish(sl, latched, &r);
}

int eng_update_price(eng_seg *s, uint64_t id, double price)
{
    eng_slot *sl;
    uint64_t w;
    int rc = enter_id(s, id, price_ok(price) ? 0 : ENG_EBADPRICE, &sl, &w);
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_PRICE);
    rc = write_price_checked(s, sl, price, price_clock(), t, BY_ID, id, 0);
    if (rc == ENG_ESTALE)
        rc = id_live(sl, load_acquire_u64(&sl->word), id);   /* say which: never issued or released */
    op_end(t, rc);
    return rc ? rc : 0;
}

/* update_prices: is one element of the caller's arrays bad?  Branch-free:
 * an id is good when it is in [1 << 24, ENG_ID_MAX] (opening not 0) with its
 * slot below the capacity, a price when its bits are in [1, the bits of
 * DBL_MAX] (finite and > 0). */
static inline uint64_t batch_arg_bad(uint64_t capacity, uint64_t id, double price)
{
    const uint64_t first = 1ULL << ENG_ID_SLOT_BITS;
    return (uint64_t)(id - first > ENG_ID_MAX - first) |
           (uint64_t)((id & ENG_ID_SLOT_MASK) >= capacity) |
           (uint64_t)(f8_bits(price) - 1 >= f8_bits(DBL_MAX));
}

/* Its error code, in the order every call by id reports them. */
static int batch_arg_error(const eng_seg *s, uint64_t id, double price)
{
    if (id > ENG_ID_MAX || (id & ENG_ID_SLOT_MASK) >= s->capacity)
        return ENG_EBADSLOT;
    if (!price_ok(price))
        return ENG_EBADPRICE;
    return id_opening(id) == 0 ? ENG_ENOTOPEN : 0;
}

static inline int batch_arg_check(const eng_seg *s, uint64_t id, double price)
{
    if (__builtin_expect(batch_arg_bad(s->capacity, id, price) != 0, 0))
        return batch_arg_error(s, id, price);
    return 0;
}

/* 1 if an element of the block of ENG_BATCH_CHECK at ids, prices is bad.
 * No branch per element, so the compiler vectorizes it; on x86-64 it is
 * built twice and the loader picks the AVX2 build where the CPU has it. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static int batch_block_bad(uint64_t capacity, const uint64_t *ids, const double *prices)
{
    uint64_t bad = 0;
    for (uint32_t j = 0; j < ENG_BATCH_CHECK; j++)
        bad |= batch_arg_bad(capacity, ids[j], prices[j]);
    return bad != 0;
}

/* The lines a price write of id's slot touches (ids out of range: none). */
ALWAYS_INLINE void prefetch_slot(const eng_seg *s, uint64_t id)
{
    uint32_t i = (uint32_t)(id & ENG_ID_SLOT_MASK);
    if (i < s->capacity) {
        const uint8_t *p = (const uint8_t *)slot_at(s, i);
        prefetch_write(p);                     /* the price word and the PnL inputs */
        prefetch_write(p + ENG_CACHE_LINE);    /* the price copies */
    }
}

int eng_update_prices(eng_seg *s, const uint64_t *ids, const double *prices,
                      uint64_t n, uint64_t *out_bad_index, uint64_t *out_written)
{
    int rc = enter_vector(s, out_bad_index && out_written, n, ids && prices);
    if (rc)
        return rc;
    *out_written = 0;
    for (uint64_t i = 0; i < n;) {
        uint64_t end = n - i < ENG_BATCH_CHECK ? n : i + ENG_BATCH_CHECK;
        if (end - i == ENG_BATCH_CHECK && !batch_block_bad(s->capacity, ids + i, prices + i)) {
            i = end;   /* a whole block is good */
            continue;
        }
        for (; i < end; i++)   /* the tail, or a block with a bad element: which one */
            if ((rc = batch_arg_check(s, ids[i], prices[i])) != 0) {
                *out_bad_index = i;
                return rc;
            }
    }
    op_timer t = op_begin(s, ENG_OP_PRICE_BATCH);
    int64_t ts = price_clock();
    int tear = tear_fault(s);
    uint64_t written = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (i + ENG_BATCH_PREFETCH < n)
            prefetch_slot(s, ids[i + ENG_BATCH_PREFETCH]);
        uint64_t id = ids[i];   /* checked again: the caller's arrays may change under us */
        double price = prices[i];
        rc = batch_arg_check(s, id, price);
        if (rc == 0)
            rc = write_price_checked(s, slot_at(s, (uint32_t)(id & ENG_ID_SLOT_MASK)), price, ts,
                                     t, BY_ID, id, tear);
        if (rc == ENG_ESTALE) {
            rc = 0;
            continue;
        }
        if (rc) {
            *out_bad_index = i;
            break;
        }
        written++;
    }
    *out_written = written;
    op_end(t, rc);
    return rc;
}

int64_t eng_update_token_price(eng_seg *s, int64_t token, double price)
{
    CHECK_SEG(s);
    if (!price_ok(price))
        return ENG_EBADPRICE;
    if (s->roles[ENG_ROLE_TOKEN] == ENG_ROLE_NONE)
        return ENG_EBADFIELD;   /* the spec has no token field */
    op_timer t = op_begin(s, ENG_OP_PRICE_BATCH);
    int64_t ts = price_clock();
    int tear = tear_fault(s);
    int64_t count = 0;
    uint32_t b = tb_of_token(s, token);
    uint64_t locked;
    int rc = tb_lock(s, b, t, &locked);   /* the token index: see its protocol */
    int held = rc == 0, busy = 0;
    uint32_t x = held ? tb_head(locked) : 0;
    for (uint32_t steps = 0; x; steps++) {
        if (!tb_valid(s, x) || steps >= s->capacity) {
            rc = ENG_ECORRUPT;
            break;
        }
        eng_slot *sl = slot_at(s, x - 1);
        x = load_relaxed_u32(&sl->tnext);
        /* the token hint filters; the check under the latch decides */
        if ((int64_t)load_relaxed_u64((const uint64_t *)&sl->token) != token ||
            !is_open_state(s, sw_state(load_acquire_u64(&sl->word))))
            continue;
        rc = write_price_checked(s, sl, price, ts, t, BY_TOKEN, (uint64_t)token, tear);
        if (rc == ENG_ESTALE || rc == ENG_EBUSY) {
            busy |= rc == ENG_EBUSY;   /* a live writer sits on it: write the others */
            rc = 0;
            continue;
        }
        if (rc)
            break;
        count++;
    }
    if (held)
        tb_unlock(s, b, locked);
    if (rc == 0 && busy)
        rc = ENG_EBUSY;
    op_end(t, rc ? rc : ENG_APPLIED);
    return rc ? rc : count;
}

/* Read a record of the id's opening, then check the opening again: a record
 * of a later opening is written only after that opening's lock CAS, which the
 * read's acquire makes visible to the second check. */
int eng_read_price(eng_seg *s, uint64_t id, eng_price_out *out)
{
    eng_slot *sl;
    uint64_t w;
    int rc = enter_id(s, id, out ? 0 : ENG_EBADARG, &sl, &w);
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_READ);
    eng_price_rec r;
    uint64_t v;
    rc = read_price_rec(sl, &r, &v);
    if (rc == 0)
        rc = id_live(sl, load_acquire_u64(&sl->word), id);
    if (rc == 0) {
        out->price = r.price;
        out->ts_ns = r.ts_ns;
        out->pnl_pct = r.pnl_pct;
        out->pnl_usd = r.pnl_usd;
        out->version = v;
    }
    op_end(t, rc);
    return rc;
}

static void ctx_out_from(const eng_seg *s, eng_ctx_out *out, const eng_ctx_rec *c)
{
    memset(out->w, 0, sizeof out->w);
    memcpy(out->w, c->w, sizeof(uint64_t) * s->n_words);
    out->version = c->version;
}

int eng_read_context(eng_seg *s, uint64_t id, eng_ctx_out *out)
{
    eng_slot *sl;
    int rc = enter_slot(s, id, &sl);
    if (rc == 0 && !out)
        rc = ENG_EBADARG;
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_READ);
    eng_ctx_rec c;
    uint64_t w;
    uint32_t opening;
    rc = read_ctx(s, sl, &c, &w, &opening);
    if (rc == 0)
        rc = opening_check(w, opening, id);
    if (rc == 0)
        ctx_out_from(s, out, &c);
    op_end(t, rc);
    return rc;
}

/* ==== vector calls ================================================================= */
/*
 * One C call per array.  Policy (update_prices, which checks only its
 * arrays up front, is in "prices"): the call first checks every element (id in range and naming an issued opening that is not
 * released; for transition_many also the trigger in range and the rule from
 * the current state not guarded); one bad element refuses the whole call with
 * its index in *out_bad_index and nothing applied.  Reads (states, prices)
 * fill out[i] as they check it, so the check is the read.
 *
 * transition_many then applies each element independently, as
 * eng_transition would, and stores its outcome (ENG_APPLIED ..
 * ENG_HALTED) in out[i].  An element whose position was released after the
 * check (a concurrent release) gets ENG_INVALID: no rule fires on a free
 * slot; one whose state moved, after the check, to a state where its rule is
 * guarded gets ENG_CONFLICT (another writer moved it; the guarded path is
 * transition()), as does one that meets a live lock holder past the bound.
 */

int eng_states(eng_seg *s, const uint64_t *ids, uint64_t n, uint16_t *out,
               uint64_t *out_bad_index)
{
    int rc = enter_vector(s, out_bad_index != NULL, n, ids && out);
    if (rc)
        return rc;
    for (uint64_t i = 0; i < n; i++) {
        eng_slot *sl;
        uint64_t w;
        rc = id_word(s, ids[i], &sl, &w);
        if (rc) {
            *out_bad_index = i;
            return rc;
        }
        out[i] = (uint16_t)sw_state(w);
    }
    return 0;
}

int eng_prices(eng_seg *s, const uint64_t *ids, uint64_t n, eng_price_out *out,
               uint64_t *out_bad_index)
{
    int rc = enter_vector(s, out_bad_index != NULL, n, ids && out);
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_READ);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t id = ids[i];
        eng_slot *sl;
        uint64_t w, v;
        eng_price_rec r;
        rc = id_word(s, id, &sl, &w);
        if (rc == 0)
            rc = read_price_rec(sl, &r, &v);
        if (rc == 0)   /* as eng_read_price: the opening again, after the record */
            rc = id_live(sl, load_acquire_u64(&sl->word), id);
        if (rc) {
            *out_bad_index = i;
            break;
        }
        out[i].price = r.price;
        out[i].ts_ns = r.ts_ns;
        out[i].pnl_pct = r.pnl_pct;
        out[i].pnl_usd = r.pnl_usd;
        out[i].version = v;
    }
    op_end(t, rc);
    return rc;
}

int eng_transition_many(eng_seg *s, const uint64_t *ids, const uint32_t *triggers,
                        uint64_t n, uint8_t *out, uint64_t *out_bad_index)
{
    int rc = enter_vector(s, out_bad_index != NULL, n, ids && triggers && out);
    if (rc)
        return rc;
    for (uint64_t i = 0; i < n; i++) {
        eng_slot *sl;
        uint64_t w;
        rc = id_word(s, ids[i], &sl, &w);
        if (rc == 0 && triggers[i] >= s->n_triggers)
            rc = ENG_EBADTRIGGER;
        if (rc == 0 && sw_state(w)) {
            uint8_t e = s->hdr->table[onehot_index(sw_state(w)) * ENG_MAX_TRIGGERS + triggers[i]];
            if (e & ENG_RULE_GUARDED)
                rc = ENG_EGUARDED;
        }
        if (rc) {
            *out_bad_index = i;
            return rc;
        }
    }
    *out_bad_index = n;   /* n: no element failed; else the first that did */
    for (uint64_t i = 0; i < n; i++) {
        int rc = eng_transition(s, ids[i], triggers[i]);
        /* released meanwhile: INVALID; moved meanwhile onto a guarded rule:
         * CONFLICT; any other error is the element's: ENG_MANY_ERROR | -code */
        out[i] = (uint8_t)(rc >= 0 ? rc
                           : rc == ENG_ESTALE || rc == ENG_ENOTOPEN ? ENG_INVALID
                           : rc == ENG_EGUARDED ? ENG_CONFLICT
                           : ENG_MANY_ERROR | -rc);
        if (out[i] >= ENG_MANY_ERROR && *out_bad_index == n)
            *out_bad_index = i;
    }
    return 0;
}

/* ==== waiting for a change ========================================================= */
/*
 * Blocks until the state word's committed bits (state, generation, C) differ
 * from `since` (or from their value at entry, with since < 0), the timeout
 * passes (ENG_ETIMEDOUT), or a signal arrives (ENG_EINTR: Python runs its
 * handlers, then calls again with *out_since and the remaining time).
 *
 * A sleeper sets the slot's `waiting` flag, reads the futex word, re-checks
 * the state word, then sleeps at most ENG_WAIT_SLICE_NS: a committer killed
 * between its CAS and its wake costs a waiter one slice, not its timeout.
 * Only committers clear the flag, so a sleeper killed here leaves at most one
 * spurious wake behind.
 */
int eng_wait_change(eng_seg *s, uint64_t id, int64_t since, int64_t timeout_ns,
                    int64_t *out_since)
{
    eng_slot *sl;
    uint64_t w;
    int rc = enter_id(s, id, timeout_ns < 0 || !out_since ? ENG_EBADARG : 0, &sl, &w);
    if (rc)
        return rc;
    if (timeout_ns > ENG_MAX_TIMEOUT_NS)
        timeout_ns = ENG_MAX_TIMEOUT_NS;
    op_timer t = op_begin(s, ENG_OP_WAIT);
    uint64_t base = since < 0 ? (w & SW_COMMITTED) : (uint64_t)since;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + timeout_ns;   /* < 2^63: both terms < 2^62 */
    rc = ENG_ETIMEDOUT;
    *out_since = (int64_t)base;
    uint32_t seen;
    for (;;) {
        if (load_acquire_u32(&s->gate_shut)) {   /* close() is waiting: see the close gate */
            rc = ENG_ECLOSED;
            break;
        }
        uint64_t cur = load_acquire_u64(&sl->word) & SW_COMMITTED;
        if (cur == base) {
            /* about to sleep: announce it, then read the counter (see
             * commit_after), then look once more */
            store_seq_cst_u32(&sl->waiting, 1);
            seen = load_seq_cst_u32(futex_word(sl));
            cur = load_acquire_u64(&sl->word) & SW_COMMITTED;
        }
        if (cur != base) {
            *out_since = (int64_t)cur;
            rc = ENG_APPLIED;
            break;
        }
        int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0)
            break;
        if (left > ENG_WAIT_SLICE_NS)
            left = ENG_WAIT_SLICE_NS;
        struct timespec ts = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
        if (futex(futex_word(sl), FUTEX_WAIT, seen, &ts) != 0 && errno == EINTR) {
            rc = ENG_EINTR;
            break;
        }
        /* woken, value changed (EAGAIN), slice over or spurious: re-check */
    }
    op_end(t, rc == ENG_ETIMEDOUT ? ENG_CONFLICT : rc);
    return rc;
}

/* ==== snapshot ======================================================================= */
/*
 * Each row is one opening's state, context and price read together: the
 * state word's committed bits did not move between the first and the last
 * read (a lock taken meanwhile does not move them; the row says locked).
 */
static int read_row(eng_seg *s, uint32_t slot, eng_row *r)
{
    eng_slot *sl = slot_at(s, slot);
    for (uint32_t i = 0; i < READ_RETRIES; i++) {
        eng_ctx_rec c;
        eng_price_rec p;
        uint64_t w, pv;
        uint32_t opening;
        int rc = read_ctx(s, sl, &c, &w, &opening);
        if (rc)
            return rc;
        if (!sw_state(w))
            return 1;                              /* free: no row */
        rc = read_price_rec(sl, &p, &pv);
        if (rc)
            return rc;
        uint64_t transitions = load_relaxed_u64(&sl->transitions);
        fence_acquire();
        if (((load_relaxed_u64(&sl->word) ^ w) & SW_COMMITTED) != 0)
            continue;
        r->id = make_id(opening, slot);
        r->slot = slot;
        r->state = sw_state(w);
        r->generation = sw_gen(w);
        r->locked = sw_locked(w);
        r->transitions = transitions;
        r->price = p.price;
        r->price_ts_ns = p.ts_ns;
        r->pnl_pct = p.pnl_pct;
        r->pnl_usd = p.pnl_usd;
        r->price_version = pv;
        r->context_version = c.version;
        memset(r->w, 0, sizeof r->w);
        memcpy(r->w, c.w, sizeof(uint64_t) * s->n_words);
        return 0;
    }
    return ENG_EBUSY;
}

int eng_snapshot(eng_seg *s, eng_row *rows, uint32_t max_rows, uint32_t *out_n)
{
    CHECK_SEG(s);
    if (!rows || !out_n)
        return ENG_EBADARG;
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->capacity && n < max_rows; i++) {
        int rc = read_row(s, i, &rows[n]);
        if (rc < 0)
            return rc;
        if (rc == 0)
            n++;
    }
    *out_n = n;
    return 0;
}
