/* ==== restore: a fresh segment placed from the journal on disk ===================== */
/*
 * Engine.restore (engine/durable/restore.py) reads a journal directory (its
 * format: "The journal on disk" in engine.h), reduces it to the last record
 * of every object (slot, key record, account, price, halt) and places that
 * state into a segment it has just created, which nobody can attach yet:
 *
 *   R1 eng_restore_format: the header as eng_format writes it, ready = 0
 *      (attach says ENG_ENOTREADY until R4), and this process's view of it
 *   R2 eng_restore_slots / _prices / _keys / _accounts: the objects, in
 *      batches of records; each record checked against the header (a
 *      crafted file is ENG_ECORRUPT with the index of the record, never a
 *      write outside the segment)
 *   R3 eng_restore_ring: the last records back into the journal's ring
 *   R4 eng_restore_finish: the token index and the booked accounts' sums
 *      rebuilt from the open positions, the halt flag, the journal's next
 *      seq (journal_start_at), then ready (release) last
 *
 * Nothing here is atomic against other processes: until R4 nobody else
 * can use the segment (attach refuses it), and R4's release publishes
 * everything written before it.
 */

/* The journal continues at first_seq: the latch word names first_seq - 1 as
 * the last published record (nobody holds it).  For today's latch design;
 * moves into journal.c when the `append` rewrite lands (it provides one of
 * this name). */
static void journal_start_at(eng_seg *s, uint64_t first_seq)
{
    if (!s->journal || first_seq == 0)
        return;
    store_relaxed_u64(&s->journal->latch, jl_make(first_seq - 1));
}

/* R1: format base (a fresh, zero-filled mapping of size bytes) as eng_format
 * does, but leave ready 0, and fill s with the views a restore writes
 * through.  The header is built in a private copy first and copied in whole. */
int eng_restore_format(eng_seg *s, void *base, uint64_t size, uint32_t capacity,
                       const uint8_t *table, uint32_t n_states, uint32_t n_triggers,
                       uint32_t initial_index, uint32_t closed_mask, uint64_t fingerprint,
                       uint32_t creator_pid, const eng_rec_layout *rec, uint32_t max_accounts,
                       uint32_t journal_records, uint32_t journal_flags)
{
    if (!s || !base || size < sizeof(eng_header))
        return ENG_EBADARG;
    static __thread eng_header hc;   /* 4.5 KiB: off the stack */
    memset(&hc, 0, sizeof hc);
    /* eng_format writes only the header it is given (its fields, ready
     * last): the copy, checked against the real size */
    int rc = eng_format(&hc, size, capacity, table, n_states, n_triggers, initial_index,
                        closed_mask, fingerprint, creator_pid, rec, max_accounts,
                        journal_records, journal_flags);
    if (rc)
        return rc;
    hc.ready = 1;
    rc = eng_validate(&hc, size, fingerprint);   /* the views below trust it */
    if (rc)
        return rc;
    hc.ready = 0;
    memcpy(base, &hc, sizeof hc);
    seg_view(s, base, size, base, &hc);
    s->fd = -1;
    /* no registry entry, no token: nothing here takes a lock */
    return 0;
}

/* A restore's eng_seg: formatted by R1 and not yet ready. */
static inline int restoring(const eng_seg *s)
{
    return s && s->hdr && s->base && !load_acquire_u32(&s->hdr->ready);
}

/* A committed state word as a record names it: one state (or none), no
 * lock, no owner, no error; generation and C as they were. */
static int word_ok(const eng_seg *s, uint64_t w, uint32_t kind)
{
    uint32_t st = sw_state(w);
    if (w & (ENG_SW_LOCK | ENG_SW_ERROR | (ENG_SW_TARGET_MASK << ENG_SW_TARGET_SHIFT)) ||
        w >> ENG_SW_OWNER_SHIFT)
        return 0;
    if (kind == ENG_JK_RELEASE)
        return st == 0;
    return st != 0 && (st & (st - 1)) == 0 && onehot_index(st) < s->hdr->n_states;
}

/* Record i of a batch: recs[idx[i]] (idx NULL: recs[i]); NULL if past n_recs. */
static inline const eng_jrec *pick(const eng_jrec *recs, uint64_t n_recs, const uint64_t *idx,
                                   uint64_t i)
{
    uint64_t k = idx ? idx[i] : i;
    return k < n_recs ? &recs[k] : NULL;
}

/* R2 calls take a batch as n records recs[idx[0]], ... (idx NULL: recs[0],
 * ...) of the n_recs at recs, so a caller places its picks without copying
 * them out; *out_bad: the batch index of a record refused.  place(s, r)
 * places one record: 0, or the code that refuses it. */
static int place_batch(eng_seg *s, const eng_jrec *recs, uint64_t n_recs, const uint64_t *idx,
                       uint64_t n, uint64_t *out_bad, int (*place)(eng_seg *, const eng_jrec *))
{
    if (!restoring(s) || (!recs && n) || !out_bad)
        return ENG_EBADARG;
    for (uint64_t i = 0; i < n; i++) {
        const eng_jrec *r;
        *out_bad = i;
        if (!(r = pick(recs, n_recs, idx, i)))
            return ENG_EBADARG;
        int rc = place(s, r);
        if (rc)
            return rc;
    }
    *out_bad = n;
    return 0;
}

/* R2: the last slot record (open, transition or release) of each slot, in
 * any order, one per slot.  A released slot keeps its opening count (its
 * ids stay stale) and its generation. */
static int place_slots(eng_seg *s, const eng_jrec *r)
{
    uint64_t slot = r->id & ENG_ID_SLOT_MASK;
    uint32_t opening = id_opening(r->id);
    if (r->id > ENG_ID_MAX || slot >= s->capacity || opening == 0 || !slot_kind(r->kind) ||
        !word_ok(s, r->word, r->kind))
        return ENG_ECORRUPT;
    if (r->kind != ENG_JK_RELEASE) {
        if (check_words(s, r->w, 0xFFFFFFFFu) || check_roles(s, r->w))
            return ENG_ECORRUPT;
        if (r->kind == ENG_JK_TRANSITION && r->trigger >= s->n_triggers)
            return ENG_ECORRUPT;
    }
    eng_slot *sl = slot_at(s, (uint32_t)slot);
    eng_ctx_rec *c = copy_of(s, sl, sw_ctx(r->word));
    c->commit = 0;
    c->version = r->version;
    c->cause = r->trigger;
    memcpy(c->w, r->w, sizeof(uint64_t) * s->n_words);
    sl->opening = opening;
    sl->word = r->word;
    sl->token = r->kind == ENG_JK_RELEASE ? 0 : token_of(s, r->w);
    sl->tnext = sl->tbucket = 0;
    if (r->kind != ENG_JK_RELEASE && s->pnl) {
        double entry = as_f8(r->w[s->roles[ENG_ROLE_ENTRY_PRICE]]);
        price_set_pnl(sl, entry, as_f8(r->w[s->roles[ENG_ROLE_AMOUNT]]) *
                                 (double)(int64_t)r->w[s->roles[ENG_ROLE_SIDE]]);
    }
    return 0;
}

int eng_restore_slots(eng_seg *s, const eng_jrec *recs, uint64_t n_recs, const uint64_t *idx,
                      uint64_t n, uint64_t *out_bad)
{
    return place_batch(s, recs, n_recs, idx, n, out_bad, place_slots);
}

/* R2: the last price record of each open position (after eng_restore_slots):
 * a record of another opening than the slot's is skipped (the open's own
 * price stands, see R4); the price sequence is the record's. */
static int place_prices(eng_seg *s, const eng_jrec *r)
{
    uint64_t slot = r->id & ENG_ID_SLOT_MASK;
    eng_price_rec p;
    memcpy(&p, r->w, sizeof p);
    if (r->kind != ENG_JK_PRICE || r->id > ENG_ID_MAX || slot >= s->capacity ||
        r->version == 0 || r->version > (UINT64_MAX >> ENG_PW_SEQ_SHIFT) ||
        !price_ok(p.price) || !isfinite(p.pnl_pct) || !isfinite(p.pnl_usd))
        return ENG_ECORRUPT;
    eng_slot *sl = slot_at(s, (uint32_t)slot);
    if (sl->opening != id_opening(r->id) || !sw_state(sl->word))
        return 0;
    sl->price[r->version & 1] = p;
    sl->pword = r->version << ENG_PW_SEQ_SHIFT;
    return 0;
}

int eng_restore_prices(eng_seg *s, const eng_jrec *recs, uint64_t n_recs, const uint64_t *idx,
                      uint64_t n, uint64_t *out_bad)
{
    return place_batch(s, recs, n_recs, idx, n, out_bad, place_prices);
}

/* R2: the keys of the open positions (after eng_restore_slots): each record
 * names its opening (id), its key record (word) and the key (w, version =
 * its length); a key of an opening not open is skipped.  The key goes into
 * its record and a cell of one of its buckets; a key already held, or both
 * buckets full (the new segment hashes with a new seed), is an error. */
static int place_keys(eng_seg *s, const eng_jrec *r)
{
    uint64_t slot = r->id & ENG_ID_SLOT_MASK;
    if (r->kind != ENG_JK_KEY || r->id > ENG_ID_MAX || slot >= s->capacity ||
        r->word >= s->kpp || r->version < 1 || r->version > ENG_KEY_MAX)
        return ENG_ECORRUPT;
    eng_slot *sl = slot_at(s, (uint32_t)slot);
    if (sl->opening != id_opening(r->id) || !sw_state(sl->word))
        return 0;
    eng_keyrec *kr = keyrec_at(s, (uint32_t)slot, (uint32_t)r->word);
    if (kr->tag)
        return ENG_ECORRUPT;   /* two keys in one record of one opening */
    eng_key k;
    memset(&k, 0, sizeof k);
    k.len = (uint16_t)r->version;
    memcpy(k.key, r->w, k.len);
    key_place p = key_place_of(s, k.key, k.len);
    /* unique: no open opening holds it yet */
    for (int b = 0; b < 2; b++) {
        uint64_t *cells = bucket_at(s, b ? p.b2 : p.b1);
        for (uint32_t j = 0; j < ENG_KEY_BUCKET; j++) {
            uint64_t c = cells[j];
            if (!c || (c & ENG_KC_FP_MASK) != p.fp)
                continue;
            const eng_keyrec *o = keyrec_at(s, kc_slot(c), kc_r(c));
            if (o->len == k.len && memcmp(o->key, k.key, k.len) == 0)
                return ENG_EKEYEXISTS;
        }
    }
    uint16_t order = 0;
    for (uint32_t q = 0; q < s->kpp; q++) {
        const eng_keyrec *o = keyrec_at(s, (uint32_t)slot, q);
        if (o->tag == kr_held(r->id) && o->order + 1u > order)
            order = (uint16_t)(o->order + 1u);
    }
    uint64_t *cell = NULL;
    for (int b = 0; b < 2 && !cell; b++) {
        uint64_t *cells = bucket_at(s, b ? p.b2 : p.b1);
        for (uint32_t j = 0; j < ENG_KEY_BUCKET && !cell; j++)
            if (!cells[j])
                cell = &cells[j];
    }
    if (!cell)
        return ENG_EKEYFULL;
    kr->len = k.len;
    kr->order = order;
    kr->gen = (uint16_t)(kr->gen + 1);
    memcpy(kr->key, k.key, ENG_KEY_MAX);
    kr->tag = kr_held(r->id);
    *cell = kc_make((uint32_t)slot, (uint32_t)r->word, kr->gen, p.fp);
    return 0;
}

int eng_restore_keys(eng_seg *s, const eng_jrec *recs, uint64_t n_recs, const uint64_t *idx,
                      uint64_t n, uint64_t *out_bad)
{
    return place_batch(s, recs, n_recs, idx, n, out_bad, place_keys);
}

/* R2: the last record of each account: its books (w), key (see
 * ENG_DJ_ACCT_KEY_WORD) and version.  A closed account keeps its opening
 * count (its ids stay stale). */
static int place_accounts(eng_seg *s, const eng_jrec *r)
{
    uint64_t index = r->id & ENG_ID_SLOT_MASK;
    eng_books b;
    memcpy(&b, r->w, sizeof b);
    uint64_t key_len = r->w[ENG_DJ_ACCT_KEYLEN_WORD];
    if (r->kind != ENG_JK_ACCOUNT || r->id > ENG_ACCOUNT_ID_MAX || index >= s->max_accounts ||
        b.opening != id_opening(r->id) || b.opening == 0 || b.open > 1 ||
        key_len > ENG_KEY_MAX || r->version == 0 ||
        r->version > (UINT64_MAX >> ENG_AW_VERSION_SHIFT) || b.cash < 0 || b.reserved < 0)
        return ENG_ECORRUPT;
    eng_account *a = &s->accounts[index];
    b.seal = aw_make(r->version);
    b.seal_slot = b.seal_word = 0;
    a->books[r->version & 1] = b;
    a->key_len = (uint32_t)key_len;
    memset(a->key, 0, sizeof a->key);
    memcpy(a->key, &r->w[ENG_DJ_ACCT_KEY_WORD], key_len);
    a->word = aw_make(r->version);
    return 0;
}

int eng_restore_accounts(eng_seg *s, const eng_jrec *recs, uint64_t n_recs, const uint64_t *idx,
                      uint64_t n, uint64_t *out_bad)
{
    return place_batch(s, recs, n_recs, idx, n, out_bad, place_accounts);
}

/* R3: records back into the ring, each at its seq (the caller gives the
 * last records, at most journal_records - 1, in seq order). */
int eng_restore_ring(eng_seg *s, const eng_jrec *recs, uint64_t n)
{
    if (!restoring(s) || (!recs && n))
        return ENG_EBADARG;
    if (!s->journal)
        return n ? ENG_ENOJOURNAL : 0;
    if (n >= s->jrecords)
        return ENG_EBADARG;
    for (uint64_t i = 0; i < n; i++) {
        if (recs[i].seq == 0 || (i && recs[i].seq != recs[i - 1].seq + 1))
            return ENG_ECORRUPT;
        eng_jrec *r = jrec_at(s, recs[i].seq);
        *r = recs[i];
        r->latch = jl_make(recs[i].seq - 1);
    }
    if (n)
        s->journal->last_ts = (uint64_t)recs[n - 1].ts_ns;
    return 0;
}

/* R4: what follows from the open positions, then ready.  halted: the
 * emergency stop; next_seq: the journal's next record (0: leave it);
 * last_ts: the time of the last record (the journal's clock floor).  The
 * booked accounts' reserved, open_positions, worst_gain and worst_loss are
 * the sums over the open positions booked on them (cash and realized are
 * the caller's).  An open position with no price record gets its opening
 * price (its entry, at its opened_ns).  0, or ENG_ECORRUPT with *out_bad
 * the slot whose account is not open. */
int eng_restore_finish(eng_seg *s, uint32_t halted, uint64_t next_seq, int64_t last_ts,
                       uint64_t *out_bad)
{
    if (!restoring(s) || halted > 1 || !out_bad)
        return ENG_EBADARG;
    *out_bad = UINT64_MAX;
    int booked = s->acct_role != ENG_ROLE_NONE && s->pnl;
    if (booked)
        for (uint32_t i = 0; i < s->max_accounts; i++) {
            eng_account *a = &s->accounts[i];
            eng_books *b = &a->books[aw_version(a->word) & 1];
            b->reserved = b->worst_gain = b->worst_loss = 0;
            b->open_positions = 0;
        }
    for (uint32_t slot = 0; slot < s->capacity; slot++) {
        eng_slot *sl = slot_at(s, slot);
        if (!sw_state(sl->word))
            continue;
        const eng_ctx_rec *c = copy_of(s, sl, sw_ctx(sl->word));
        if (!sl->pword) {
            double entry = s->pnl ? as_f8(c->w[s->roles[ENG_ROLE_ENTRY_PRICE]]) : 0.0;
            uint8_t on = s->roles[ENG_ROLE_OPENED_NS];
            eng_price_rec p;
            price_rec_at(s, sl, &p, entry, on == ENG_ROLE_NONE ? 0 : (int64_t)c->w[on]);
            sl->price[1] = p;
            sl->pword = 1ULL << ENG_PW_SEQ_SHIFT;
        }
        if (s->exit_armed) {
            double entry = s->pnl ? as_f8(c->w[s->roles[ENG_ROLE_ENTRY_PRICE]]) : 0.0;
            double side = copysign(1.0, as_f8(sl->pnl_size));
            uint64_t *peaks = slot_peaks(s, sl);
            peaks[0] = peaks[1] = f8_bits(entry * side);   /* the trailing peak starts again */
        }
        if (s->roles[ENG_ROLE_TOKEN] != ENG_ROLE_NONE) {
            uint32_t tb = tb_of_token(s, sl->token);
            uint32_t head = tb_head(s->tindex[tb]);
            sl->tnext = head;
            sl->tbucket = tb + 1;
            s->tindex[tb] = tb_make(slot + 1, 0);
        }
        uint64_t acct = booked ? c->w[s->acct_role] : 0;
        if (!acct || (sw_state(sl->word) & s->hdr->closed_mask))
            continue;
        uint64_t index = acct & ENG_ID_SLOT_MASK;
        eng_account *a = index < s->max_accounts ? &s->accounts[index] : NULL;
        eng_books *b = a ? &a->books[aw_version(a->word) & 1] : NULL;
        int64_t notional, top, gain, loss;
        if (!b || !b->open || b->opening != id_opening(acct) || acct > ENG_ACCOUNT_ID_MAX ||
            position_worst(as_f8(c->w[s->roles[ENG_ROLE_ENTRY_PRICE]]),
                           as_f8(c->w[s->roles[ENG_ROLE_AMOUNT]]),
                           (int64_t)c->w[s->roles[ENG_ROLE_SIDE]], &notional, &top, &gain,
                           &loss) != 0 ||
            __builtin_add_overflow(b->reserved, notional, &b->reserved) ||
            __builtin_add_overflow(b->worst_gain, gain, &b->worst_gain) ||
            __builtin_add_overflow(b->worst_loss, loss, &b->worst_loss)) {
            *out_bad = slot;
            return ENG_ECORRUPT;
        }
        b->open_positions++;
    }
    s->hdr->halted = halted;
    journal_start_at(s, next_seq);
    if (s->journal && last_ts > 0)
        s->journal->last_ts = (uint64_t)last_ts;
    store_release_u32(&s->hdr->ready, 1);   /* last: pairs with the acquire in eng_validate */
    memset(s, 0, sizeof *s);   /* the restorer attaches as anyone does */
    return 0;
}

/* ---- CRC-32C (Castagnoli), the frames' checksum ------------------------------------- */
/* durable.c's eng_crc32c is the one implementation; this name is the readers'. */
uint32_t eng_dj_crc32c(uint32_t crc, const void *data, uint64_t n)
{
    return data ? eng_crc32c(crc, data, n) : crc;
}

/* Check n frames at buf (n x ENG_DJ_FRAME_BYTES bytes): out[i] = 1 whole
 * (magic and CRC), 0 an empty frame (all of it zero: the end of a file's
 * records), 2 anything else (torn or corrupt). */
int eng_dj_check_frames(const uint8_t *buf, uint64_t n, uint8_t *out)
{
    if ((!buf || !out) && n)
        return ENG_EBADARG;
    static const uint8_t zero[ENG_DJ_FRAME_BYTES];
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *f = buf + i * ENG_DJ_FRAME_BYTES;
        uint32_t magic, crc;
        memcpy(&magic, f, 4);
        memcpy(&crc, f + 4, 4);
        if (magic == ENG_DJ_FRAME_MAGIC)
            out[i] = eng_dj_crc32c(0, f + 8, ENG_JREC_SIZE) == crc ? 1 : 2;
        else
            out[i] = memcmp(f, zero, ENG_DJ_FRAME_BYTES) == 0 ? 0 : 2;
    }
    return 0;
}
