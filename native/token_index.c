/*
 * token_index.c - the token index: positions by token.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== the token index: positions by token ========================================= */
/*
 * update_token_price visits only the slots on its token's chain, not every
 * slot.  Each bucket word (see engine.h) is a lock and a chain head in one
 * word; eng_slot.tnext links the chain and eng_slot.tbucket names the bucket
 * a slot was linked into.  Every change of a chain, and every walk of one,
 * happens under the bucket's lock, taken by CAS (head, 0) -> (head, token) and
 * given back by CAS to (head, 0); a lock whose holder is proven dead is taken
 * over like a price latch.  Each change of a chain is ONE store, so a chain is
 * whole at every instant and a takeover needs no repair:
 *
 *   link x (opener, holding x's transition lock; x.tbucket == 0):
 *     x.tbucket = b + 1; x.tnext = head      (x not reachable yet)
 *     CAS (head, me) -> (x + 1, me)          the link (fenced: a holder taken
 *                                            over changes nothing)
 *   unlink x (x.tbucket == b + 1):
 *     pred.tnext = x.tnext, or CAS head      the unlink
 *     x.tbucket = 0
 *
 * Invariant: a slot reachable from bucket b has tbucket == b + 1, and sits on
 * one chain at most (it is linked only with tbucket == 0).  A crash leaves at
 * worst tbucket naming a chain the slot is not on (a later unlink walks the
 * chain, does not find it, and clears tbucket) or a free slot on a chain.
 *
 *   open:    lock slot (L) -> unlink x from x.tbucket's chain (if any) ->
 *            link x on hash(token)'s chain -> price latch -> commit.
 *            An open waits for a busy chain at most twice: the token's
 *            chain busy past the bound -> EBUSY (every slot needs it); a
 *            slot's old chain busy -> that slot stays linked there (free) and
 *            the open tries other slots, from then on only those on no chain
 *            or on the token's (no wait per linked slot)
 *   release: CAS word -> free -> under the bucket lock, unlink x only if its
 *            word is still free and unlocked (an opener that locked x since
 *            needs this bucket's lock to unlink it first, so it waits)
 *   recover: release dead bucket locks; unlink every free, unlocked slot
 *   attach:  taking a dead entry over, release dead bucket locks before the
 *            entry's new incarnation (a wrapped incarnation must never meet
 *            them: its live Engine would own them, and no one could take
 *            them back)
 *   update_token_price: lock the bucket, walk, write each slot whose token
 *            hint matches and whose state is open through the price latch
 *            (the check under the latch decides), unlock.  A latch busy past
 *            the bound (a live writer sits on it) does not end the walk: the
 *            others are written, then the call says EBUSY (never a count
 *            that misses a position)
 *
 * Lock order: slot lock -> bucket lock -> price latch; a bucket lock is never
 * held while taking another bucket lock or a slot lock.
 *
 * Guarantees: every opening not yet released is on its token's chain from
 * before its open commits until its slot is released (an opening is linked
 * before its commit; an open that dies before it rolls back); so once opens
 * and releases are quiescent, update_token_price reaches every open position
 * on the token, and writes only to positions the check under the price latch
 * accepts as open on that token.  A walk is bounded by the capacity
 * (ENG_ECORRUPT beyond it).
 * Does not guarantee: that a chain holds only open positions (a release that
 * dies, or finds the bucket busy past the bound, leaves its free slot linked
 * until the slot's next open or recover(): each costs a walk step, never a
 * write); that a position opened while a walk runs is reached by it; that a
 * holder whose liveness lock was lost while it still ran (its descriptor
 * closed under it) cannot store a tnext after a takeover (only the head
 * changes are fenced by CAS).
 */

static inline uint32_t tb_head(uint64_t b) { return (uint32_t)(b >> ENG_TB_HEAD_SHIFT); }
static inline uint32_t tb_holder(uint64_t b) { return (uint32_t)(b & ENG_TOKEN_MASK); }
static inline uint64_t tb_make(uint32_t head, uint32_t holder)
{
    return ((uint64_t)head << ENG_TB_HEAD_SHIFT) | holder;
}

static inline uint32_t tb_of_token(const eng_seg *s, int64_t token)
{
    return (uint32_t)(fmix64((uint64_t)token ^ s->key_seed) & (s->tindex_buckets - 1));
}

/* Lock bucket b (its head kept); acquire: the chain as the last holder left it. */
static int tb_lock(eng_seg *s, uint32_t b, op_timer t, uint64_t *locked)
{
    return token_lock_u64(s, &s->tindex[b], tb_make(UINT32_MAX, 0), t, locked, 0);
}

/* Give the lock back (release: our chain stores before it).  Fails only if
 * the lock was taken over: then nothing is left to give back. */
static void tb_unlock(eng_seg *s, uint32_t b, uint64_t locked)
{
    cas_acq_rel_u64(&s->tindex[b], &locked, tb_make(tb_head(locked), 0));
}

static int tb_set_head(eng_seg *s, uint32_t b, uint64_t *locked, uint32_t head)
{
    uint64_t expected = *locked, want = tb_make(head, tb_holder(*locked));
    if (!cas_acq_rel_u64(&s->tindex[b], &expected, want))
        return ENG_EBUSY;   /* taken over: we were judged gone */
    *locked = want;
    return 0;
}

static inline int tb_valid(const eng_seg *s, uint32_t ref) { return ref <= s->capacity; }

/* Holder of b: unlink slot x if it is on b's chain; clear x.tbucket. */
static int tb_unlink(eng_seg *s, uint32_t b, uint64_t *locked, uint32_t x)
{
    eng_slot *xs = slot_at(s, x);
    uint32_t next = load_relaxed_u32(&xs->tnext);
    uint32_t cur = tb_head(*locked);
    if (cur == x + 1) {
        int rc = tb_set_head(s, b, locked, next);
        if (rc)
            return rc;
    } else {
        for (uint32_t steps = 0; cur; steps++) {
            if (!tb_valid(s, cur) || steps >= s->capacity)
                return ENG_ECORRUPT;
            eng_slot *ps = slot_at(s, cur - 1);
            uint32_t pn = load_relaxed_u32(&ps->tnext);
            if (pn == x + 1) {
                store_relaxed_u32(&ps->tnext, next);   /* the unlink (ordered by tb_unlock) */
                break;
            }
            cur = pn;
        }
    }
    die_if(s, ENG_FAULT_DIE_IN_TINDEX_DEL);
    store_relaxed_u32(&xs->tbucket, 0);
    return 0;
}

/* Holder of b: link slot x (x.tbucket == 0) at the head of b's chain. */
static int tb_link(eng_seg *s, uint32_t b, uint64_t *locked, uint32_t x)
{
    eng_slot *xs = slot_at(s, x);
    store_relaxed_u32(&xs->tbucket, b + 1);
    store_relaxed_u32(&xs->tnext, tb_head(*locked));
    die_if(s, ENG_FAULT_DIE_IN_TINDEX_ADD);
    return tb_set_head(s, b, locked, x + 1);   /* the link */
}

/* tindex_place: x's old chain is busy (x was left on it): try another slot. */
#define TB_SKIP 1

/* Opener holding slot x's transition lock: move x to token's chain.  Returns
 * 0, TB_SKIP, ENG_EBUSY (the token's chain is busy: so it is for every
 * slot) or ENG_ECORRUPT.  *busy: this open found an old chain busy; from
 * then on it skips slots on chains other than the token's without waiting,
 * so an open waits at most once for an old chain and once for its own. */
static int tindex_place(eng_seg *s, uint32_t x, int64_t token, op_timer t, uint32_t *busy)
{
    eng_slot *xs = slot_at(s, x);
    uint64_t locked;
    int rc;
    uint32_t old = load_relaxed_u32(&xs->tbucket);
    uint32_t b = tb_of_token(s, token);
    if (old) {
        if (old > s->tindex_buckets)
            return ENG_ECORRUPT;
        if ((*busy && old != b + 1) || tb_lock(s, old - 1, t, &locked) != 0) {
            *busy = 1;
            return old == b + 1 ? ENG_EBUSY : TB_SKIP;
        }
        rc = 0;
        /* only a holder of this lock clears it, and only we (holding x) set it */
        if (load_relaxed_u32(&xs->tbucket) == old)
            rc = tb_unlink(s, old - 1, &locked, x);
        tb_unlock(s, old - 1, locked);
        if (rc)
            return rc;
    }
    if ((rc = tb_lock(s, b, t, &locked)) != 0)
        return rc;
    rc = load_relaxed_u32(&xs->tbucket) ? ENG_ECORRUPT : tb_link(s, b, &locked, x);
    tb_unlock(s, b, locked);
    return rc;
}

static inline int slot_free(uint64_t w) { return sw_state(w) == 0 && !sw_locked(w); }

/* Slot x was freed (release, abandon): unlink it while it is still free.  A
 * bucket busy past the bound leaves it linked, for its next open or recover(). */
static void tindex_drop(eng_seg *s, uint32_t x)
{
    eng_slot *xs = slot_at(s, x);
    uint32_t old = load_relaxed_u32(&xs->tbucket);
    op_timer none = {NULL, 0};
    uint64_t locked;
    if (!old || old > s->tindex_buckets || tb_lock(s, old - 1, none, &locked) != 0)
        return;
    if (load_relaxed_u32(&xs->tbucket) == old && slot_free(load_acquire_u64(&xs->word)))
        tb_unlink(s, old - 1, &locked, x);
    tb_unlock(s, old - 1, locked);
}

/* recover(), and attach before it gives a dead entry a new incarnation:
 * release every bucket lock whose holder is proven dead, by one CAS from the
 * exact word seen (no lock taken: s->token may not exist yet).  Returns the
 * locks released. */
static uint32_t tindex_release_dead(eng_seg *s)
{
    uint32_t released = 0;
    for (uint32_t b = 0; b < s->tindex_buckets; b++) {
        uint64_t cur = load_acquire_u64(&s->tindex[b]);
        uint32_t holder = tb_holder(cur);
        if (holder && holder != s->token && token_dead(s, holder) &&
            cas_acq_rel_u64(&s->tindex[b], &cur, tb_make(tb_head(cur), 0)))
            released++;
    }
    return released;
}

/* recover(): release bucket locks of proven-dead holders and unlink every
 * free, unlocked slot.  Returns the locks released plus the slots unlinked. */
static uint32_t tindex_sweep(eng_seg *s, op_timer t)
{
    uint32_t repaired = tindex_release_dead(s);
    for (uint32_t b = 0; b < s->tindex_buckets; b++) {
        uint64_t locked;
        if (tb_head(load_acquire_u64(&s->tindex[b])) == 0 || tb_lock(s, b, t, &locked) != 0)
            continue;
        uint32_t prev = 0, x = tb_head(locked);
        for (uint32_t steps = 0; x && tb_valid(s, x) && steps < s->capacity; steps++) {
            eng_slot *xs = slot_at(s, x - 1);
            uint32_t next = load_relaxed_u32(&xs->tnext);
            if (slot_free(load_acquire_u64(&xs->word))) {
                if (prev == 0) {
                    if (tb_set_head(s, b, &locked, next) != 0)
                        break;
                } else {
                    store_relaxed_u32(&slot_at(s, prev - 1)->tnext, next);
                }
                store_relaxed_u32(&xs->tbucket, 0);
                repaired++;
            } else {
                prev = x;
            }
            x = next;
        }
        tb_unlock(s, b, locked);
    }
    return repaired;
}

int eng_tindex_check(eng_seg *s, uint64_t *out)
{
    CHECK_SEG(s);
    if (!out)
        return ENG_EBADARG;
    memset(out, 0, 4 * sizeof *out);
    uint8_t *seen = calloc(s->capacity, 1);
    if (!seen)
        return ENG_EBUSY;
    for (uint32_t b = 0; b < s->tindex_buckets; b++) {
        uint32_t x = tb_head(load_acquire_u64(&s->tindex[b]));
        for (uint32_t steps = 0; x; steps++) {
            if (!tb_valid(s, x) || steps >= s->capacity || seen[x - 1]) {
                out[2]++;   /* a corrupt reference, a cycle or a slot on two chains */
                break;
            }
            eng_slot *xs = slot_at(s, x - 1);
            seen[x - 1] = 1;
            out[3]++;
            uint64_t w = load_acquire_u64(&xs->word);
            if (sw_state(w) == 0)
                out[1]++;
            if (load_relaxed_u32(&xs->tbucket) != b + 1 ||
                (sw_state(w) && tb_of_token(s, (int64_t)load_relaxed_u64((uint64_t *)&xs->token)) != b))
                out[2]++;
            x = load_relaxed_u32(&xs->tnext);
        }
    }
    for (uint32_t i = 0; i < s->capacity; i++)
        if (sw_state(load_acquire_u64(&slot_at(s, i)->word)) && !seen[i])
            out[0]++;
    free(seen);
    return 0;
}

int eng_tindex_slots(eng_seg *s, int64_t token, uint32_t *out, uint32_t max, uint32_t *out_n)
{
    CHECK_SEG(s);
    if (!out_n || (max && !out))
        return ENG_EBADARG;
    uint32_t n = 0, b = tb_of_token(s, token);
    op_timer none = {NULL, 0};
    uint64_t locked;
    int rc = tb_lock(s, b, none, &locked);
    if (rc)
        return rc;
    uint32_t x = tb_head(locked);
    for (uint32_t steps = 0; x; steps++) {
        if (!tb_valid(s, x) || steps >= s->capacity) {
            rc = ENG_ECORRUPT;
            break;
        }
        eng_slot *xs = slot_at(s, x - 1);
        if ((int64_t)load_relaxed_u64((uint64_t *)&xs->token) == token) {
            if (n == max) {
                rc = ENG_EBADARG;   /* out too small */
                break;
            }
            out[n++] = x - 1;
        }
        x = load_relaxed_u32(&xs->tnext);
    }
    tb_unlock(s, b, locked);
    *out_n = n;
    return rc;
}
