/*
 * recovery.c - recovery of proven-dead holders, and the controls.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== recovery ========================================================================= */
/*
 * One recovery at a time: header.recovering is a CAS flag holding its
 * owner's token, taken over if that owner is proven dead.  Three steps:
 *
 *   1. take the liveness lock of each registry entry whose pid is set and
 *      whose lock nobody holds: its owner is gone, and no claimer can
 *      touch the entry while we hold it
 *   2. sweep: resolve every transition lock, price latch, account latch, key
 *      stripe and record and token-index bucket lock whose owner is proven
 *      dead -- those of step 1 included (a gone owner takes no more)
 *   3. free the entries of step 1 (shards folded into the retired shard)
 *
 * So an entry is freed only after its owner's locks were resolved: a freed
 * entry's incarnation can come round (2^17 - 1 claims later) without ever
 * meeting them.  An owner that dies after step 1 keeps its entry until the
 * next recover() or an attach takes it over (which sweeps the same way).
 * Does not guarantee: an attach that finds every other entry held (a full
 * registry whose dead entries step 1 holds) waits for nothing: ENG_ENOPROC.
 * Live processes keep working throughout: every change is a CAS against the
 * exact word seen.
 */
static eng_test_hook_fn recover_test_hook;   /* tests only, this process only */

void eng_test_recover_hook(eng_test_hook_fn fn) { recover_test_hook = fn; }

static int take_recovery_flag(eng_seg *s)
{
    for (uint32_t step = 0; step < MAX_WAIT_STEPS * 4; step++) {
        uint32_t cur = 0;
        if (cas_acq_rel_u32(&s->hdr->recovering, &cur, s->token))
            return 0;
        if (time_to_check_owner(step) && token_dead(s, cur) &&
            cas_acq_rel_u32(&s->hdr->recovering, &cur, s->token))
            return 0;
        backoff_step(step);
    }
    return ENG_ERECOVERING;
}

/* Resolve every transition lock and price latch whose owner is proven gone. */
static void sweep_dead(eng_seg *s, eng_recover_report *out)
{
    op_timer t = {s->me ? &s->me->op[ENG_OP_RECOVER] : NULL, 0};
    journal_sweep(s);   /* first: a slot takeover that rolls forward takes the latch */
    for (uint32_t i = 0; i < s->capacity; i++) {
        eng_slot *sl = slot_at(s, i);
        uint64_t w = load_acquire_u64(&sl->word);
        if (sw_locked(w) && sw_owner(w) != s->token && token_dead(s, sw_owner(w))) {
            int how = takeover(s, sl, w, t);
            out->rolled_forward += how == 1;
            out->rolled_back += how == 2;
        }
        uint64_t pw = load_acquire_u64(&sl->pword);
        uint32_t holder = pw_token(pw);
        if (holder && holder != s->token && token_dead(s, holder) &&
            price_unlatch(sl, pw) == 0)
            out->price_latches++;
    }
    accounts_sweep(s, t, out);
}

int eng_recover(eng_seg *s, eng_recover_report *out)
{
    CHECK_SEG(s);
    if (!out)
        return ENG_EBADARG;
    memset(out, 0, sizeof *out);
    if (!fd_is_segment(s))
        return ENG_ECLOSED;   /* code outside the engine closed or replaced our descriptor */
    op_timer t = op_begin(s, ENG_OP_RECOVER);
    int rc = take_recovery_flag(s);
    if (rc) {
        op_end(t, rc);
        return rc;
    }
    /* 1. take the entries of gone owners: getting an entry's liveness lock
     * while its pid is set proves its owner gone, and holding it keeps every
     * claimer off the entry until it is freed */
    uint8_t gone[ENG_MAX_PROCS];
    for (uint32_t i = 0; i < ENG_MAX_PROCS; i++) {
        eng_proc *e = &s->registry[i];
        gone[i] = 0;
        if (i == s->proc_index || load_acquire_u32(&e->pid) == 0)
            continue;
        if (ofd_setlk(s->fd, entry_lock_offset(s, i), F_WRLCK) != 0)
            continue;
        if (load_acquire_u32(&e->pid) == 0)
            ofd_setlk(s->fd, entry_lock_offset(s, i), F_UNLCK);
        else
            gone[i] = 1;
    }
    /* 2. resolve their locks with every other dead owner's (theirs read as
     * dead: nobody else holds their entries' locks now) */
    sweep_dead(s, out);
    out->keys_cleared = keys_sweep(s);
    out->tindex_repaired = tindex_sweep(s, t);
    if (recover_test_hook)
        recover_test_hook();
    /* 3. free them */
    for (uint32_t i = 0; i < ENG_MAX_PROCS; i++)
        if (gone[i]) {
            out->removed_pids[out->procs_removed++] = load_relaxed_u32(&s->registry[i].pid);
            release_entry(s, i);
        }
    store_release_u32(&s->hdr->recovering, 0);
    op_end(t, ENG_APPLIED);
    return 0;
}

/* ==== controls: every shared switch is stored here, never from Python ======== */

int eng_set_halt(eng_seg *s, uint32_t on)
{
    CHECK_SEG(s);
    if (s->journal)
        return journal_halt(s, on ? 1 : 0);
    store_release_u32(&s->hdr->halted, on ? 1 : 0);   /* read relaxed on hot paths */
    return 0;
}

int eng_set_metrics(eng_seg *s, uint32_t on, uint32_t sample_mask)
{
    CHECK_SEG(s);
    if (sample_mask & (sample_mask + 1))
        return ENG_EBADARG;   /* a power of two minus one */
    store_release_u32(&s->hdr->sample_mask, sample_mask);
    store_release_u32(&s->hdr->metrics_on, on ? 1 : 0);
    return 0;
}

int eng_set_faults(eng_seg *s, uint32_t flags, uint64_t pause_ns)
{
    CHECK_SEG(s);
    if ((flags & ~(uint32_t)FAULT_FLAGS_KNOWN) || pause_ns > ENG_TEST_PAUSE_MAX_NS ||
        ((flags || pause_ns) && !faults_allowed()))
        return ENG_EBADARG;   /* clearing them is always allowed */
    store_release_u64(&s->hdr->test_pause_ns, pause_ns);
    store_release_u32(&s->hdr->fault_flags, flags);
    return 0;
}

/* Tests only: take something and return holding it, so that a test can kill
 * or stop its holder.  what: 1 the id's price latch, 2 its transition lock
 * (target = its current state), 3 the recovery flag. */
int eng_test_hold(eng_seg *s, uint32_t what, uint64_t id)
{
    CHECK_SEG(s);
    if (what == 3) {
        uint32_t cur = 0;
        return cas_acq_rel_u32(&s->hdr->recovering, &cur, s->token) ? 0 : ENG_EBUSY;
    }
    eng_slot *sl;
    uint64_t w;
    int rc = id_word(s, id, &sl, &w);
    if (rc)
        return rc;
    op_timer none = {NULL, 0};
    if (what == 1) {
        uint64_t latched;
        return price_latch(s, sl, none, &latched);
    }
    if (what == 2) {
        if (sw_locked(w))
            return ENG_EBUSY;
        uint64_t L = sw_make_locked(w, onehot_index(sw_state(w)), s->token);
        disown_seal(s, sl, L);
        return cas_acq_rel_u64(&sl->word, &w, L) ? 0 : ENG_EBUSY;
    }
    return ENG_EBADARG;
}

int eng_owner_alive(eng_seg *s, uint32_t token)
{
    CHECK_SEG(s);
    return !token_dead(s, token & (uint32_t)ENG_TOKEN_MASK);
}

_Static_assert(-ENG_ERRNO_MIN < ENG_MANY_ERROR && ENG_HALTED < ENG_MANY_ERROR, "an element's error fits its byte");
_Static_assert(ENG_ACCT_WAIT_STEPS == 8 * ENG_MAX_WAIT_STEPS, "account waits: 8x a slot wait");
_Static_assert(ENG_YIELD_STEPS > ENG_SPIN_STEPS && ENG_MAX_WAIT_STEPS > ENG_YIELD_STEPS, "back-off phases");
_Static_assert(((ENG_DEFAULT_SAMPLE_MASK + 1) & ENG_DEFAULT_SAMPLE_MASK) == 0, "sample mask: 2^k - 1");
