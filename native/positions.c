/*
 * positions.c - open and release of positions.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== open and release ============================================================ */
/*
 * Opening is the slow path from state 0 (free) to the initial state: lock a
 * free word, count the opening, insert its key (see keys), latch the price,
 * leave the PnL inputs beside the price word and publish the opening price,
 * seal the record, publish the state.  The key is found from the moment the
 * state is published.  The price latch is taken before anything of the new
 * opening is visible, so a price writer that checked the old opening under
 * the latch cannot write into the new one, nor read its PnL inputs.  A
 * takeover of a dead opener rolls forward (context sealed, so the price is
 * out too) or back to free; the counted opening is then never issued and
 * its key is left for the next insert or recover() to clear.  Release frees
 * the slot by one CAS (which makes the opening's keys stale), then clears
 * its key records and cells.
 */

/* The values C relies on: entry price and amount finite and > 0, side +-1. */
static int check_roles(const eng_seg *s, const uint64_t *w)
{
    if (!s->pnl)
        return 0;
    if (!price_ok(as_f8(w[s->roles[ENG_ROLE_ENTRY_PRICE]])))
        return ENG_EBADPRICE;
    double amount = as_f8(w[s->roles[ENG_ROLE_AMOUNT]]);
    int64_t side = (int64_t)w[s->roles[ENG_ROLE_SIDE]];
    if (!(isfinite(amount) && amount > 0.0) || (side != 1 && side != -1))
        return ENG_EBADFIELD;
    return 0;
}

static inline int64_t token_of(const eng_seg *s, const uint64_t *w)
{
    uint8_t k = s->roles[ENG_ROLE_TOKEN];
    return k == ENG_ROLE_NONE ? 0 : (int64_t)w[k];
}

int eng_open(eng_seg *s, const uint64_t *words, const char *key, uint32_t key_len,
             uint64_t *out_id, uint64_t *out_word)
{
    CHECK_SEG(s);
    if (!out_id || !out_word || (!words && s->n_words))
        return ENG_EBADARG;
    eng_ctx_rec c;
    memset(&c, 0, sizeof c);
    if (s->n_words)
        memcpy(c.w, words, sizeof(uint64_t) * s->n_words);
    int rc = check_words(s, c.w, 0xFFFFFFFFu);
    if (rc == 0)
        rc = check_roles(s, c.w);
    if (rc)
        return rc;
    eng_key kbuf;
    if (key && (rc = key_from(key, key_len, &kbuf)) != 0)
        return rc;
    if (key && s->kpp == 0)
        return ENG_EKEYLIMIT;
    uint64_t acct = s->acct_role == ENG_ROLE_NONE ? 0 : c.w[s->acct_role];
    if (acct && s->reopens)
        return ENG_EBADFIELD;   /* a closing may happen twice: it cannot be booked once */
    if (acct) {
        /* the cheap refusals before a slot is taken; the latch decides */
        eng_account *a;
        eng_books b;
        uint64_t v;
        rc = acct_of_id(s, acct, &a);
        if (rc == 0 && money_of(as_f8(c.w[s->roles[ENG_ROLE_ENTRY_PRICE]]),
                                as_f8(c.w[s->roles[ENG_ROLE_AMOUNT]])) < 0)
            rc = ENG_EBADMONEY;
        if (rc == 0 && acct_read(s, a, &b, &v, NULL) == 0)
            rc = books_check(&b, acct);
        if (rc)
            return rc;
    }
    op_timer t = op_begin(s, ENG_OP_OPEN);
    uint32_t cap = s->capacity;
    uint32_t start = fetch_add_relaxed_u32(&s->hdr->alloc_hint, 1) % cap;
    uint32_t target = s->hdr->initial_index;
    uint32_t placed = UINT32_MAX;   /* the slot linked into the token index, if any */
    uint32_t tb_busy = 0;           /* a slot's old token index chain was busy */
    rc = ENG_EFULL;
    for (uint32_t k = 0; k < cap; k++) {
        uint32_t slot = (start + k) % cap;
        eng_slot *sl = slot_at(s, slot);
        uint64_t w = load_relaxed_u64(&sl->word);
        if (sw_state(w) != 0 || sw_locked(w))
            continue;
        uint64_t L = sw_make_locked(w, target, s->token);
        disown_seal(s, sl, L);
        if (!cas_acq_rel_u64(&sl->word, &w, L))
            continue;
        die_if(s, ENG_FAULT_DIE_AFTER_LOCK);
        uint32_t opening = load_relaxed_u32(&sl->opening) + 1;
        if (opening == 0)
            opening = 1;
        store_relaxed_u32(&sl->opening, opening);
        store_relaxed_u64((uint64_t *)&sl->token, (uint64_t)token_of(s, c.w));
        uint64_t id = make_id(opening, slot);
        int keyed = 0;   /* this opening's key is inserted */
        int retry = 0;   /* refused on this slot only: undo, then try another */
        if (key) {
            rc = key_insert(s, id, &kbuf, t, 0);   /* visible once the opening commits */
            if (rc)
                goto undo;
            keyed = 1;
        }
        if (s->roles[ENG_ROLE_TOKEN] != ENG_ROLE_NONE) {
            if ((rc = tindex_place(s, slot, token_of(s, c.w), t, &tb_busy)) != 0) {
                if (rc == TB_SKIP) {
                    rc = ENG_EBUSY;   /* a live holder sits on this slot's old chain: try another */
                    retry = 1;
                }   /* else the token's chain busy (every slot needs it), or corrupt */
                goto undo;
            }
            placed = slot;   /* a refused open unlinks it again: undo, or below */
        }
        uint64_t latched;
        if (price_latch(s, sl, t, &latched) != 0) {
            rc = ENG_EBUSY;   /* a live writer sits on this slot's price */
            retry = 1;
            goto undo;
        }
        int64_t ts = price_clock();
        if (s->roles[ENG_ROLE_OPENED_NS] != ENG_ROLE_NONE)
            c.w[s->roles[ENG_ROLE_OPENED_NS]] = (uint64_t)ts;
        double entry = 0.0;
        if (s->pnl) {
            entry = as_f8(c.w[s->roles[ENG_ROLE_ENTRY_PRICE]]);
            price_set_pnl(sl, entry, as_f8(c.w[s->roles[ENG_ROLE_AMOUNT]]) *
                                     (double)(int64_t)c.w[s->roles[ENG_ROLE_SIDE]]);
        }
        eng_price_rec r;
        price_rec_at(s, sl, &r, entry, ts);
        if (s->exit_armed)   /* the trailing peak starts at the entry (side space) */
            exit_peak_set(s, sl, latched, entry * copysign(1.0, as_f8(load_relaxed_u64(&sl->pnl_size))));
        uint64_t JL = 0;   /* journal_prices: every price publish is the journal latch holder's */
        if (s->jprices && (rc = journal_latch(s, t, &JL)) != 0) {
            price_unlatch(sl, latched);
            rc = journal_refusal(rc, ENG_EBUSY);   /* a live holder kept the latch past its bound */
            goto undo;
        }
        int published = price_publish(sl, latched, &r);
        if (JL)
            journal_abort(s, JL);   /* the open's own record covers its opening price */
        if (published != 0) {
            rc = ENG_EBUSY;   /* our latch was taken: we were judged gone, */
            keyed = 0;        /* and the key is left for the next insert or recover() */
            goto undo;
        }
        if (acct) {
            eng_account *a;
            uint64_t AL;
            rc = book_position(s, sl, L, &c, BOOK_OPEN, 0.0, t, &a, &AL);   /* reserve */
            if (rc)
                goto undo;
            rc = finish_booked(s, sl, L, &c, a, AL, t);
        } else {
            rc = finish_locked(s, sl, L, &c);
        }
        if (rc == ENG_APPLIED) {
            *out_id = id;
            *out_word = s->last_new_word;
        }
        break;
    undo:
        /* The one unwind of a refusal on this slot: unlock the word unchanged,
         * drop the key, and on a retry the slot's token index link (last:
         * tindex_drop unlinks only a free, unlocked slot; a refusal that ends
         * the open leaves the link to the drop below). */
        unlock_unchanged(sl, L);
        if (keyed)
            keys_drop(s, id);
        if (retry && placed == slot)
            tindex_drop(s, slot);
        if (!retry)
            break;
    }
    if (rc != ENG_APPLIED && placed != UINT32_MAX)
        tindex_drop(s, placed);   /* unlinks only while the slot is free and unlocked */
    op_end(t, rc);
    return rc;
}

/* Undo an open whose id never reached its caller (an exception between the
 * C call and the caller): only if its word is still exactly the one the open
 * published (word, from eng_open_position), so nothing happened to it since. */
int eng_abandon_open(eng_seg *s, uint64_t id, uint64_t word)
{
    eng_slot *sl;
    uint64_t w;
    int rc = enter_id(s, id, 0, &sl, &w);
    if (rc)
        return rc;
    if (w != word)
        return ENG_INVALID;
    if (account_of_locked(s, sl, w))
        return ENG_INVALID;   /* its reservation stays booked: it stays open (see accounts) */
    uint64_t nw = sw_make(0, sw_gen(w) + 1, sw_ctx(w));
    if (journal_commit(s, sl, id, w, nw, ENG_JK_RELEASE) != 0)
        return ENG_INVALID;
    commit_after(s, sl, w, nw);
    keys_drop(s, id);
    tindex_drop(s, (uint32_t)(id & ENG_ID_SLOT_MASK));
    return ENG_APPLIED;
}

/* A closed position's slot goes back to the free pool (generation + 1). */
int eng_release_position(eng_seg *s, uint64_t id)
{
    eng_slot *sl;
    int rc = enter_slot(s, id, &sl);
    if (rc)
        return rc;
    op_timer none = {NULL, 0};
    for (uint32_t retries = 0; retries < CAS_RETRIES; retries++) {
        eng_ctx_rec c;
        uint64_t w;
        uint32_t opening;
        rc = read_ctx(s, sl, &c, &w, &opening);
        if (rc == 0)
            rc = opening_check(w, opening, id);   /* housekeeping: allowed while halted */
        if (rc)
            return rc;
        if (sw_locked(w) || !(sw_state(w) & s->hdr->closed_mask))
            return ENG_INVALID;
        /* a booking about this slot must be resolved before a reopen can
         * rewrite the record copies that are its evidence (see accounts);
         * one that starts after this settle moves the word, and the CAS
         * below from exactly w fails */
        if (s->acct_role != ENG_ROLE_NONE && c.w[s->acct_role] &&
            (rc = acct_settle(s, c.w[s->acct_role], none)) != 0)
            return rc;
        uint64_t nw = sw_make(0, sw_gen(w) + 1, sw_ctx(w));
        uint64_t old = w;
        if (journal_commit(s, sl, id, w, nw, ENG_JK_RELEASE) == 0) {
            commit_after(s, sl, old, nw);
            keys_drop(s, id);   /* already stale; clear them for the next inserts */
            tindex_drop(s, (uint32_t)(id & ENG_ID_SLOT_MASK));
            return ENG_APPLIED;
        }
        backoff_step(retries / 4);
    }
    return ENG_CONFLICT;
}
