/*
 * transitions.c - transitions: the state machine's CAS protocol and commit.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== transitions ================================================================ */
/*
 * Protocol.  Fast path (no context change, no guard): load the word, check
 * the id, look the rule up, CAS old -> new with generation + 1.  Slow path:
 * CAS old -> L (lock bit, owner token, target; state, generation, C and E
 * unchanged), fill the unpublished context copy and seal it with L, then CAS
 * L -> new (target, generation + 1, C flipped if a context was written).
 * After any commit: bump the slot's transition counter (whose low half is the
 * futex word) and wake sleepers if any announced themselves.
 *
 *   holder:                                  takeover (owner proven dead):
 *     disown ctx[!C] if its commit == L        if ctx[!C(L)].commit == L:
 *     CAS w -> L                                 CAS L -> target, gen + 1, !C  (forward)
 *     fill ctx[!C], commit = L                 else:
 *     CAS L -> target, gen + 1, !C               CAS L -> w | E                 (back)
 *
 * Forward needs the exact locked word in the copy, so a copy sealed under an
 * older lock never passes for this one: before locking, a holder clears a
 * seal equal to the word it is about to lock with (which can only be left
 * from 2^16 commits ago), so dying right after the lock CAS rolls back.
 *
 * Guarantees: every transition is applied exactly once or not at all, even if
 * its process dies between any two steps; generations grow by one per commit;
 * nothing written by a holder whose lock was taken over becomes visible.
 * Does not guarantee: fairness between contending writers (a loser gets
 * ENG_CONFLICT after its bounded retries).
 */

static void die_if(eng_seg *s, uint32_t fault)
{
    uint32_t f = load_relaxed_u32(&s->hdr->fault_flags);
    if (__builtin_expect(f & fault, 0) && faults_allowed())
        kill(getpid(), (f & ENG_FAULT_STOP_NOT_KILL) ? SIGSTOP : SIGKILL);
}

static void commit_after(eng_seg *s, eng_slot *sl, uint64_t old_w, uint64_t new_w)
{
    s->last_old_word = old_w;
    s->last_new_word = new_w;
    die_if(s, ENG_FAULT_DIE_AFTER_CAS);
    /* seq_cst pair: increment the counter, then read `waiting`; a sleeper
     * sets `waiting`, then reads the counter.  One sees the other.  Only
     * committers clear the flag, so a sleeper that died leaves one wake. */
    fetch_add_seq_cst_u64(&sl->transitions, 1);
    if (load_seq_cst_u32(&sl->waiting) && exchange_seq_cst_u32(&sl->waiting, 0))
        futex(futex_word(sl), FUTEX_WAKE, INT_MAX, NULL);
}

static inline uint32_t next_gen(eng_seg *s, uint32_t gen)
{
    if (__builtin_expect(load_relaxed_u32(&s->hdr->fault_flags) & ENG_FAULT_SKIP_GEN, 0) &&
        faults_allowed())
        return gen;
    return (gen + 1) & ENG_SW_GEN_MASK;
}

/* Resolve lock L whose owner is proven dead.  Returns 1 forward, 2 back,
 * 0 if the word moved first. */
static int takeover(eng_seg *s, eng_slot *sl, uint64_t L, op_timer t)
{
    uint32_t pending = sw_ctx(L) ^ 1;
    const eng_ctx_rec *pc = copy_of(s, sl, pending);
    int forward = load_acquire_u64(&pc->commit) == L;   /* pairs with W2 */
    uint32_t st = sw_state(L);
    uint64_t resolved = forward ? sw_make(1u << sw_target(L), sw_gen(L) + 1, pending)
                                : sw_unlocked(L) | (st ? ENG_SW_ERROR : 0);
    uint64_t expected = L;
    uint64_t JL = 0;
    if (forward && s->journal) {
        /* a roll forward is a commit: made by the journal latch holder, with
         * its record (filled from the sealed copy) on the dead holder's behalf */
        if (journal_latch(s, t, &JL) != 0)
            return 0;
        if (load_acquire_u64(&sl->word) != L) {
            journal_abort(s, JL);
            return 0;
        }
        uint32_t slot = (uint32_t)(((uint8_t *)sl - s->slots) / s->slot_size);
        uint64_t id = make_id(load_relaxed_u32(&sl->opening), slot);
        journal_fill_ctx(s, JL, st ? ENG_JK_TRANSITION : ENG_JK_OPEN,
                         (uint32_t)load_relaxed_u64(&pc->cause), id, resolved, pc);
    }
    if (!cas_acq_rel_u64(&sl->word, &expected, resolved)) {
        if (JL)
            journal_abort(s, JL);
        return 0;
    }
    if (JL)
        journal_publish(s, JL);
    OP_TAKEOVERS(t, 1);
    if (forward) {
        OP_FORWARDS(t, 1);
        commit_after(s, sl, sw_unlocked(L), resolved);
    } else {
        OP_BACKS(t, 1);
    }
    return forward ? 1 : 2;
}

/* Wait while the word is locked.  Returns the unlocked word, or leaves
 * *locked set if the bound ran out with a live owner. */
static uint64_t wait_unlocked(eng_seg *s, eng_slot *sl, uint64_t w, op_timer t, int *locked)
{
    for (uint32_t step = 0; step < MAX_WAIT_STEPS; step++) {
        if (!sw_locked(w)) {
            *locked = 0;
            return w;
        }
        OP_RETRIES(t, 1);
        if (time_to_check_owner(step) && token_dead(s, sw_owner(w)))
            takeover(s, sl, w, t);
        else
            backoff_step(step);
        w = load_acquire_u64(&sl->word);
    }
    *locked = sw_locked(w);
    return w;
}

/* The rule for trigger in word w: the target index, or -1 with *rc set. */
static inline int lookup(eng_seg *s, uint64_t w, uint32_t trigger, int *rc)
{
    uint8_t e = s->hdr->table[onehot_index(sw_state(w)) * ENG_MAX_TRIGGERS + trigger];
    if (!(e & ENG_RULE_TARGET_MASK)) {
        *rc = ENG_INVALID;
        return -1;
    }
    *rc = (e & ENG_RULE_GUARDED) ? ENG_EGUARDED : 0;
    return (int)(e & ENG_RULE_TARGET_MASK) - 1;
}

/* Common start of a transition: the id's word, unlocked, not halted.
 * Returns 0 with *w set, or an outcome / error. */
static int ready_word(eng_seg *s, eng_slot *sl, uint64_t id, op_timer t, uint64_t *w)
{
    for (;;) {
        int rc = id_live(sl, *w, id);
        if (rc)
            return rc;
        if (load_relaxed_u32(&s->hdr->halted))
            return ENG_HALTED;
        if (!sw_locked(*w))
            return 0;
        int locked;
        *w = wait_unlocked(s, sl, *w, t, &locked);
        if (locked)
            return ENG_CONFLICT;
    }
}

static int lock_slot(eng_seg *s, eng_slot *sl, uint64_t id, uint32_t trigger, int guarded,
                     op_timer t, uint64_t *out_L);
static int commit_with_update(eng_seg *s, eng_slot *sl, uint64_t L, const eng_ctx_update *u,
                              op_timer t);
static inline int is_closing(const eng_seg *s, uint32_t from, uint32_t to);

int eng_transition(eng_seg *s, uint64_t id, uint32_t trigger)
{
    eng_slot *sl;
    int rc = enter_transition(s, id, trigger, &sl);
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_TRANSITION);
    uint64_t retries = 0;
    int booked = 0;
    uint64_t w = load_acquire_u64(&sl->word);
    for (;;) {
        rc = ready_word(s, sl, id, t, &w);
        if (rc)
            break;
        int target = lookup(s, w, trigger, &rc);
        if (target < 0 || rc)
            break;
        if (s->acct_role != ENG_ROLE_NONE && is_closing(s, sw_state(w), 1u << target) &&
            load_relaxed_u64(&copy_of(s, sl, sw_ctx(w))->w[s->acct_role])) {
            booked = 1;   /* a closing with an account is booked: the slow path */
            break;
        }
        uint64_t nw = sw_make(1u << target, next_gen(s, sw_gen(w)), sw_ctx(w));
        if (__builtin_expect(load_relaxed_u32(&s->hdr->fault_flags) & ENG_FAULT_BLIND_STORE, 0) &&
            faults_allowed()) {
            sched_yield();   /* deliberately broken, tests only: another writer gets in ... */
            store_release_u64(&sl->word, nw);   /* ... and this store loses its commit */
            commit_after(s, sl, w, nw);
            rc = ENG_APPLIED;
            break;
        }
        uint64_t old = w;
        if (s->journal) {
            /* J1, then the word again: only the latch holder commits, so a
             * word read under it moves only by a lock (see the journal) */
            uint64_t JL;
            if ((rc = journal_latch(s, t, &JL)) != 0)
                break;
            w = load_acquire_u64(&sl->word);
            if (w != old) {
                journal_abort(s, JL);
                continue;   /* locked or committed meanwhile: look again */
            }
            journal_fill_ctx(s, JL, ENG_JK_TRANSITION, trigger, id, nw,
                             copy_of(s, sl, sw_ctx(w)));                       /* J2 */
            if (cas_acq_rel_u64(&sl->word, &w, nw)) {                          /* J3 */
                journal_publish(s, JL);                                        /* J4 */
                commit_after(s, sl, old, nw);
                rc = ENG_APPLIED;
                break;
            }
            journal_abort(s, JL);
        } else if (cas_acq_rel_u64(&sl->word, &w, nw)) {   /* on failure w is reloaded */
            commit_after(s, sl, old, nw);
            rc = ENG_APPLIED;
            break;
        }
        if (++retries > CAS_RETRIES) {
            rc = ENG_CONFLICT;
            break;
        }
        backoff_step((uint32_t)(retries / 4));
    }
    OP_RETRIES(t, retries);
    if (booked) {
        uint64_t L;
        rc = lock_slot(s, sl, id, trigger, 0, t, &L);
        if (rc == ENG_APPLIED)
            rc = commit_with_update(s, sl, L, NULL, t);
    }
    op_end(t, rc);
    return rc;
}

/* Clear a seal equal to the lock word about to be taken (see the protocol). */
static inline void disown_seal(eng_seg *s, eng_slot *sl, uint64_t L)
{
    uint64_t *seal = &copy_of(s, sl, sw_ctx(L) ^ 1)->commit;
    if (load_relaxed_u64(seal) == L)
        store_relaxed_u64(seal, 0);   /* ordered before the lock CAS by its release */
}

/* Lock the id's slot for (trigger -> target).  On success *out_L is the
 * locked word.  guarded says whether guarded rules are allowed. */
static int lock_slot(eng_seg *s, eng_slot *sl, uint64_t id, uint32_t trigger, int guarded,
                     op_timer t, uint64_t *out_L)
{
    uint64_t retries = 0;
    uint64_t w = load_acquire_u64(&sl->word);
    int rc;
    for (;;) {
        rc = ready_word(s, sl, id, t, &w);
        if (rc)
            break;
        int target = lookup(s, w, trigger, &rc);
        if (target < 0 || (rc && !(rc == ENG_EGUARDED && guarded)))
            break;
        uint64_t L = sw_make_locked(w, (uint32_t)target, s->token);
        disown_seal(s, sl, L);
        if (cas_acq_rel_u64(&sl->word, &w, L)) {
            die_if(s, ENG_FAULT_DIE_AFTER_LOCK);
            s->jtrigger = trigger;   /* sealed with the copy, recorded with the commit */
            *out_L = L;
            rc = ENG_APPLIED;
            break;
        }
        if (++retries > CAS_RETRIES) {
            rc = ENG_CONFLICT;
            break;
        }
        backoff_step((uint32_t)(retries / 4));
    }
    OP_RETRIES(t, retries);
    return rc;
}

/* Holder of L gives up: restore the word exactly. */
static void unlock_unchanged(eng_slot *sl, uint64_t L)
{
    seq_publish_acq_rel(&sl->word, L, sw_unlocked(L));
}

static void test_pause(eng_seg *s)
{
    uint64_t ns = load_relaxed_u64(&s->hdr->test_pause_ns);
    if (__builtin_expect(ns != 0, 0) && faults_allowed()) {
        if (ns > ENG_TEST_PAUSE_MAX_NS)
            ns = ENG_TEST_PAUSE_MAX_NS;
        struct timespec ts = {(time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL)};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
}

/* Holder of L: fill the unpublished context copy with ctx (if given) and
 * seal it with L (W0-W2), then publish state and context by one CAS from L
 * (W3; C flips when ctx is given).  *nw receives the committed word.  0, or
 * ENG_EBUSY if we were taken over (only if we were proven dead): nothing
 * became visible. */
static int ctx_publish(eng_seg *s, eng_slot *sl, uint64_t L, eng_ctx_rec *ctx, uint64_t *nw)
{
    uint32_t c = sw_ctx(L);
    uint32_t trigger = sw_state(L) ? s->jtrigger : 0;
    if (ctx) {
        eng_ctx_rec *dst = copy_of(s, sl, c ^ 1);
        ctx->version = load_relaxed_u64(&copy_of(s, sl, c)->version) + 1;
        ctx->cause = trigger;
        seq_fill_release((uint64_t *)dst + 1, (uint64_t *)ctx + 1, rec_words(s) - 1,
                         &dst->commit, L);
        c ^= 1;
    }
    test_pause(s);
    *nw = sw_make(1u << sw_target(L), next_gen(s, sw_gen(L)), c);
    if (!s->journal)
        return seq_publish_acq_rel(&sl->word, L, *nw);
    uint64_t JL;
    op_timer none = {NULL, 0};
    if (journal_latch(s, none, &JL) != 0) {
        unlock_unchanged(sl, L);   /* nothing committed, nothing recorded */
        return ENG_EBUSY;
    }
    uint32_t slot = (uint32_t)(((uint8_t *)sl - s->slots) / s->slot_size);
    journal_fill_ctx(s, JL, sw_state(L) ? ENG_JK_TRANSITION : ENG_JK_OPEN, trigger,
                     make_id(load_relaxed_u32(&sl->opening), slot), *nw,
                     copy_of(s, sl, c));                                       /* J2 */
    if (seq_publish_acq_rel(&sl->word, L, *nw) != 0) {                         /* J3 */
        journal_abort(s, JL);
        return ENG_EBUSY;
    }
    journal_publish(s, JL);                                                    /* J4 */
    return 0;
}

/* Holder of L: publish (ctx_publish), then count the commit and wake. */
static int finish_locked(eng_seg *s, eng_slot *sl, uint64_t L, eng_ctx_rec *ctx)
{
    uint64_t nw;
    if (ctx_publish(s, sl, L, ctx, &nw) != 0)   /* the journal's latch busy past the bound */
        return sw_state(L) ? ENG_CONFLICT : ENG_EBUSY;   /* (or taken over: only if proven dead) */
    commit_after(s, sl, sw_unlocked(L), nw);
    return ENG_APPLIED;
}



/* 0 if every word in mask holds a value of its field's type. */
static int check_words(const eng_seg *s, const uint64_t *w, uint32_t mask)
{
    for (uint32_t i = 0; i < s->n_words; i++) {
        if (!(mask & (1u << i)))
            continue;
        int64_t v = (int64_t)w[i];
        double d;
        switch (s->hdr->rec.word_type[i]) {
        case ENG_FT_F8:
            memcpy(&d, &w[i], sizeof d);
            if (!isfinite(d))
                return ENG_EBADFIELD;
            break;
        case ENG_FT_I4:
            if (v < INT32_MIN || v > INT32_MAX)
                return ENG_EBADFIELD;
            break;
        default:
            break;
        }
    }
    return 0;
}

static inline uint32_t role_mask(const eng_seg *s)
{
    uint32_t m = 0;
    for (uint32_t k = 0; k < ENG_ROLE_AT_OPEN; k++)
        if (s->roles[k] != ENG_ROLE_NONE)
            m |= 1u << s->roles[k];
    return m;
}

static int check_update(const eng_seg *s, const eng_ctx_update *u)
{
    if (!u)
        return 0;
    if (s->n_words < 32 && (u->mask >> s->n_words))
        return ENG_EBADARG;
    if (u->mask & role_mask(s))
        return ENG_EBADFIELD;   /* set at open only */
    return check_words(s, u->w, u->mask);
}
