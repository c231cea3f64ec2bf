/*
 * keys.c - unique keys, lock-free to look up (invariants I1-I7).
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== keys: unique, lock-free to look up ============================================= */
/*
 * Protocol.  A key lives in a key record of its opening's slot (the truth)
 * and in one index cell (a pointer: slot, record r, the record's claim
 * count, 20 bits of fingerprint) in either of its two buckets.
 *
 *   insert (open, holding the slot lock; or bind_key):
 *     I1 take the stripe lock of the key's first bucket (token; a proven-dead
 *        holder's is taken over): live inserts of one key are serialised
 *     I2 claim a key record of the slot: CAS free / stale / dead -> BUSY(us);
 *        drop the index cell of the stale key it held
 *     I3 W0 fence (release), write the key bytes and the record's gen + 1
 *     I4 place our cell: CAS a free or dead cell -> (slot, r, gen, fp)
 *     I5 fence (seq_cst), scan both buckets for the key: a record HELD by an
 *        open opening -> EKEYEXISTS (one still being opened: wait for its
 *        slot's lock); BUSY by a proven-dead token -> revoke it (CAS to
 *        CLEARING); BUSY by a live token -> EBUSY (we lost the stripe)
 *     I6 CAS BUSY(us) -> HELD(id) (release): the key is in
 *     I7 release the stripe lock
 *   A failed insert retracts: CAS BUSY(us) -> CLEARING(us), unindex, free.
 *
 *   lookup (no lock, never waits):
 *     for each cell of both buckets with the fingerprint:
 *       t1 = record tag (acquire); copy the key (relaxed); fence (acquire);
 *       t2 = tag; a match with t1 == t2 == HELD(id) and id open -> id
 *
 * Uniqueness.  Live inserters of one key are serialised by the stripe lock.
 * An inserter judged gone while it lives (its lock was taken over) is fenced
 * by I4/I5: of two inserts of one key, each places its cell before it scans,
 * so the later scanner sees the earlier's record -- HELD (EKEYEXISTS), BUSY
 * by a live token (EBUSY), or BUSY by the proven-dead one, which it revokes
 * so that the other's I6 CAS fails.
 *
 * A record is HELD(id) only while id's key is indexed; the opening check
 * (id's opening is the slot's, and the slot is open) decides whether it
 * counts, so release makes every key of the opening stale in the same CAS
 * that frees the slot; the records and cells are then cleared behind it
 * (release, the next insert that meets them, or recover()).  An open's keys
 * go in while its slot is locked with state 0, so a lookup sees them exactly
 * when the opening commits; if the opener dies, takeover decides both.
 *
 * A cell is dead when its record is free, being cleared, BUSY by a
 * proven-dead token, or HELD with another key or claim or by an opening
 * that is gone: any inserter may reuse it.  A process killed anywhere in
 * I1-I7 leaves a stripe lock, a BUSY record and a cell that are all dead:
 * the next insert takes them over and recover() clears them (attach, too,
 * before it gives a dead entry a new incarnation).
 *
 * Does not guarantee: that a process judged gone while it still runs (code
 * outside the engine closed its liveness descriptor) stores nothing more
 * into a key record it lost -- what it publishes is fenced, its late plain
 * stores are not; openings of one slot 2^31 apart are told apart (the
 * opening count is compared with wrap); a stale cell and a new one with
 * equal slot, record, 16-bit claim count and fingerprint (2^16 claims of
 * one record during one delayed CAS) kept apart.
 */

typedef struct key_place {
    uint32_t b1, b2;         /* buckets; b1 also names the stripe lock */
    uint64_t fp;
} key_place;

static inline uint64_t fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static key_place key_place_of(const eng_seg *s, const uint8_t *key, uint32_t len)
{
    uint64_t h = s->key_seed ^ ((uint64_t)len * 0x9E3779B97F4A7C15ULL);
    for (uint32_t i = 0; i < len; i += 8) {
        uint64_t k = 0;
        memcpy(&k, key + i, len - i < 8 ? len - i : 8);
        h = fmix64(h ^ k) + 0x9E3779B97F4A7C15ULL;
    }
    h = fmix64(h);
    uint64_t n = s->key_buckets;
    key_place p;
    p.b1 = (uint32_t)(((h & 0xFFFFFFFFULL) * n) >> 32);
    p.b2 = (uint32_t)(((h >> 32) * n) >> 32);
    if (p.b2 == p.b1 && n > 1)
        p.b2 = (p.b1 + 1) % (uint32_t)n;
    p.fp = fmix64(h ^ 0x5851F42D4C957F2DULL) & ENG_KC_FP_MASK;
    return p;
}

static inline uint64_t kc_make(uint32_t slot, uint32_t r, uint32_t gen, uint64_t fp)
{
    return ENG_KC_USED | ((uint64_t)slot << ENG_KC_SLOT_SHIFT) |
           ((uint64_t)r << ENG_KC_R_SHIFT) |
           ((uint64_t)(gen & ENG_KC_GEN_MASK) << ENG_KC_GEN_SHIFT) | fp;
}
static inline uint32_t kc_slot(uint64_t c) { return (uint32_t)((c >> ENG_KC_SLOT_SHIFT) & ENG_ID_SLOT_MASK); }
static inline uint32_t kc_r(uint64_t c) { return (uint32_t)((c >> ENG_KC_R_SHIFT) & 7); }
static inline uint32_t kc_gen(uint64_t c) { return (uint32_t)((c >> ENG_KC_GEN_SHIFT) & ENG_KC_GEN_MASK); }

static inline uint64_t kr_tag(uint32_t kind, uint32_t token) { return ((uint64_t)token << 8) | kind; }
static inline uint64_t kr_held(uint64_t id) { return (id << 8) | ENG_KR_HELD; }
static inline uint32_t kr_kind(uint64_t t) { return (uint32_t)(t & 0xFF); }
static inline uint32_t kr_token(uint64_t t) { return (uint32_t)(t >> 8) & (uint32_t)ENG_TOKEN_MASK; }

static inline eng_keyrec *keyrec_at(const eng_seg *s, uint32_t slot, uint32_t r)
{
    return &s->keyrecs[(uint64_t)slot * s->kpp + r];
}

static inline uint64_t *bucket_at(const eng_seg *s, uint32_t b)
{
    return &s->keyidx[(uint64_t)b * ENG_KEY_BUCKET];
}

/* The words of a key record after its tag: len, order, gen, key (an eng_key). */
#define KR_BODY_WORDS ((sizeof(eng_keyrec) - sizeof(uint64_t)) / sizeof(uint64_t))

static void copy_keyrec(eng_seg *s, const void *obj, uint64_t tag, void *out)
{
    (void)s; (void)tag;
    copy_words_relaxed(out, (const uint64_t *)obj + 1, KR_BODY_WORDS);
}

/* A consistent read of a key record: its tag and body (the seqlock reader
 * over one copy: the tag is its word, I6 its publish, I3's W0 its fence).
 * Returns 0, or ENG_EBUSY if it kept changing. */
static int keyrec_read(const eng_keyrec *kr, uint64_t *tag, eng_key *out)
{
    int rc = seq_read_acquire(NULL, &kr->tag, ~0ULL, copy_keyrec, kr, out, tag);
    if (rc == 0 && out->len > ENG_KEY_MAX)
        out->len = 0;   /* a record never written: no key */
    return rc;
}

static inline int key_equal(const eng_key *a, const eng_key *b)
{
    return a->len == b->len && memcmp(a->key, b->key, a->len) == 0;
}

/* Is the holder of a BUSY or CLEARING tag proven gone (never us)? */
static inline int tag_owner_dead(eng_seg *s, uint64_t t)
{
    return kr_token(t) != s->token && token_dead(s, kr_token(t));
}

enum { ID_GONE, ID_OPEN, ID_OPENING };

/* Where opening id stands: open, still being opened (its slot locked with
 * state 0 and its opening counted), or gone (released, rolled back, or a
 * later opening took the slot) -- gone is for good. */
static int id_status(const eng_seg *s, uint64_t id)
{
    if ((id & ENG_ID_SLOT_MASK) >= s->capacity)
        return ID_GONE;
    eng_slot *sl = slot_at(s, (uint32_t)(id & ENG_ID_SLOT_MASK));
    uint64_t w = load_acquire_u64(&sl->word);
    if (load_relaxed_u32(&sl->opening) != id_opening(id))
        return ID_GONE;
    if (sw_state(w))
        return ID_OPEN;
    return sw_locked(w) ? ID_OPENING : ID_GONE;
}

/* May cell c be reused?  Only when what it points to can never be its key
 * again: the record is free, being cleared, BUSY by a proven-dead inserter,
 * or holds another key, another opening's, or an opening that is gone. */
static int cell_dead(eng_seg *s, uint64_t c)
{
    uint32_t slot = kc_slot(c), r = kc_r(c);
    if (slot >= s->capacity || r >= s->kpp)
        return 1;
    uint64_t t;
    eng_key k;
    if (keyrec_read(keyrec_at(s, slot, r), &t, &k) != 0)
        return 0;
    switch (kr_kind(t)) {
    case 0:
    case ENG_KR_CLEARING:
        return 1;
    case ENG_KR_BUSY:
        return tag_owner_dead(s, t);
    default:
        break;
    }
    if (k.gen != kc_gen(c) || key_place_of(s, k.key, k.len).fp != (c & ENG_KC_FP_MASK))
        return 1;   /* the record was claimed again since this cell was placed */
    return id_status(s, t >> 8) == ID_GONE;
}

/* Clear every cell that points at record (slot, r) for the key and claim
 * in its body.  The caller holds the record (BUSY or CLEARING), so all of
 * them are its own or left-overs. */
static uint32_t key_unindex(eng_seg *s, uint32_t slot, uint32_t r, const eng_key *k)
{
    uint32_t n = 0;
    if (k->len < 1 || k->len > ENG_KEY_MAX)
        return 0;   /* never written: no cell */
    key_place p = key_place_of(s, k->key, k->len);
    uint64_t want = kc_make(slot, r, k->gen, p.fp);
    uint32_t buckets[2] = {p.b1, p.b2};
    for (int i = 0; i < 2; i++) {
        uint64_t *b = bucket_at(s, buckets[i]);
        for (uint32_t j = 0; j < ENG_KEY_BUCKET; j++) {
            uint64_t c = want;
            n += cas_acq_rel_u64(&b[j], &c, 0);
        }
    }
    return n;
}

/* Take record (slot, r), whose tag is t, as CLEARING(us) and unindex the key
 * it held or was inserting.  Returns 0 if not taken, else 1 + the cells
 * cleared. */
static uint32_t keyrec_take(eng_seg *s, uint32_t slot, uint32_t r, uint64_t t)
{
    eng_keyrec *kr = keyrec_at(s, slot, r);
    if (!cas_acq_rel_u64(&kr->tag, &t, kr_tag(ENG_KR_CLEARING, s->token)))
        return 0;
    if (!t)
        return 1;
    eng_key k;
    copy_words_relaxed(&k, (const uint64_t *)kr + 1, KR_BODY_WORDS);   /* ours now */
    return 1 + key_unindex(s, slot, r, &k);
}

/* From CLEARING(us) or BUSY(us): free. */
static void keyrec_free(eng_seg *s, uint32_t slot, uint32_t r, uint32_t kind)
{
    uint64_t mine = kr_tag(kind, s->token);
    cas_acq_rel_u64(&keyrec_at(s, slot, r)->tag, &mine, 0);
}

/* Take, unindex and free record (slot, r) if its tag is still t.  Returns
 * what keyrec_take does. */
static uint32_t keyrec_clear(eng_seg *s, uint32_t slot, uint32_t r, uint64_t t)
{
    uint32_t n = keyrec_take(s, slot, r, t);
    if (n)
        keyrec_free(s, slot, r, ENG_KR_CLEARING);
    return n;
}

/* Drop the keys of opening id (gone). */
static void keys_drop(eng_seg *s, uint64_t id)
{
    uint32_t slot = (uint32_t)(id & ENG_ID_SLOT_MASK);
    for (uint32_t r = 0; r < s->kpp; r++) {
        uint64_t t = load_acquire_u64(&keyrec_at(s, slot, r)->tag);
        if (t == kr_held(id))
            keyrec_clear(s, slot, r, t);
    }
}

static int stripe_lock(eng_seg *s, uint32_t b, op_timer t)
{
    return token_lock(s, &s->stripes[b], t);
}

static void stripe_unlock(eng_seg *s, uint32_t b)
{
    uint32_t mine = s->token;
    cas_acq_rel_u32(&s->stripes[b], &mine, 0);
}

/* I2: claim a key record of id's slot for id: *r receives its index, and
 * the record is BUSY(us). */
static int keyrec_claim(eng_seg *s, uint64_t id, uint32_t *r)
{
    uint32_t slot = (uint32_t)(id & ENG_ID_SLOT_MASK);
    for (uint32_t step = 0; step < MAX_WAIT_STEPS; step++) {
        int busy = 0;
        for (uint32_t i = 0; i < s->kpp; i++) {
            uint64_t t = load_acquire_u64(&keyrec_at(s, slot, i)->tag);
            int free = t == 0;
            if (kr_kind(t) == ENG_KR_HELD && (t >> 8) != id) {
                /* openings of one slot only grow: an earlier one is gone for
                 * good; a later one means id itself is gone */
                if ((int32_t)(id_opening(t >> 8) - id_opening(id)) > 0)
                    return ENG_ESTALE;
                free = 1;
            } else if (kr_kind(t) == ENG_KR_BUSY || kr_kind(t) == ENG_KR_CLEARING) {
                free = tag_owner_dead(s, t);
                busy += !free;
            }
            if (!free)
                continue;
            uint64_t mine = kr_tag(ENG_KR_CLEARING, s->token);
            if (keyrec_take(s, slot, i, t) &&
                cas_acq_rel_u64(&keyrec_at(s, slot, i)->tag, &mine, kr_tag(ENG_KR_BUSY, s->token))) {
                *r = i;
                return 0;
            }
            busy++;   /* lost it to another claimant: look again */
        }
        if (!busy)
            return ENG_EKEYLIMIT;
        backoff_step(step);   /* a record being cleared or written: wait for it */
    }
    return ENG_EBUSY;
}

/* I4: place cell c in the emptier of the key's buckets (or the other). */
static int cell_place(eng_seg *s, const key_place *p, uint64_t c)
{
    uint32_t used[2] = {0, 0}, buckets[2] = {p->b1, p->b2};
    for (int i = 0; i < 2; i++)
        for (uint32_t j = 0; j < ENG_KEY_BUCKET; j++)
            used[i] += load_relaxed_u64(&bucket_at(s, buckets[i])[j]) != 0;
    int first = used[1] < used[0];
    for (int i = 0; i < 2; i++) {
        uint64_t *b = bucket_at(s, buckets[first ^ i]);
        for (uint32_t j = 0; j < ENG_KEY_BUCKET; j++) {
            uint64_t cur = load_acquire_u64(&b[j]);
            if ((cur == 0 || cell_dead(s, cur)) && cas_acq_rel_u64(&b[j], &cur, c))
                return 0;
        }
    }
    return ENG_EKEYFULL;
}

/* I5: after our own cell is placed, is key k held or being inserted by
 * anyone else?  A record of an open opening: ENG_EKEYEXISTS (one being
 * opened: wait for its slot).  An insert by a proven-dead token: revoked,
 * so it can never publish.  An insert by a live token: we lost the stripe
 * (we were judged gone), ENG_EBUSY. */
static int key_conflicts(eng_seg *s, const eng_key *k, const key_place *p, uint32_t my_slot,
                         uint32_t my_r, op_timer t)
{
    uint32_t buckets[2] = {p->b1, p->b2}, rejudged = 0;
    for (int i = 0; i < 2; i++) {
        uint64_t *b = bucket_at(s, buckets[i]);
        for (uint32_t j = 0; j < ENG_KEY_BUCKET; j++) {
            uint64_t c = load_acquire_u64(&b[j]);
            uint32_t slot = kc_slot(c), r = kc_r(c);
            if (!(c & ENG_KC_USED) || (c & ENG_KC_FP_MASK) != p->fp || slot >= s->capacity ||
                r >= s->kpp || (slot == my_slot && r == my_r))
                continue;
            uint64_t tag;
            eng_key other;
            if (keyrec_read(keyrec_at(s, slot, r), &tag, &other) != 0)
                return ENG_EBUSY;
            if (!key_equal(&other, k))
                continue;
            if (kr_kind(tag) == ENG_KR_BUSY) {
                if (!tag_owner_dead(s, tag))
                    return ENG_EBUSY;
                /* revoke: its I6 CAS now fails; if the record moved first
                 * (it published, or was cleared), judge this cell again */
                if (!keyrec_clear(s, slot, r, tag)) {
                    if (++rejudged > READ_RETRIES)
                        return ENG_EBUSY;
                    j--;
                }
                continue;
            }
            if (kr_kind(tag) != ENG_KR_HELD)
                continue;
            uint64_t holder = tag >> 8;
            int st = id_status(s, holder);
            if (st == ID_OPENING) {
                int locked;
                eng_slot *sl = slot_at(s, (uint32_t)(holder & ENG_ID_SLOT_MASK));
                wait_unlocked(s, sl, load_acquire_u64(&sl->word), t, &locked);
                st = id_status(s, holder);
                if (st == ID_OPENING)
                    return ENG_EBUSY;
            }
            if (st == ID_OPEN)
                return ENG_EKEYEXISTS;
        }
    }
    return 0;
}

/* The bind order of id's next key: one past its keys' highest. */
static uint16_t next_order(eng_seg *s, uint64_t id)
{
    uint32_t slot = (uint32_t)(id & ENG_ID_SLOT_MASK), next = 0;
    for (uint32_t r = 0; r < s->kpp; r++) {
        uint64_t t;
        eng_key k;
        if (keyrec_read(keyrec_at(s, slot, r), &t, &k) == 0 && t == kr_held(id) &&
            k.order + 1u > next)
            next = k.order + 1u;
    }
    return (uint16_t)next;
}

/* Insert key k for opening id (I1-I7).  record: bind_key's insert is a
 * change of its own, journaled (J1 before I6, which is its J3); an open's
 * key is recorded by the open. */
static int key_insert(eng_seg *s, uint64_t id, const eng_key *k, op_timer t, int record)
{
    key_place p = key_place_of(s, k->key, k->len);
    int rc = stripe_lock(s, p.b1, t);                              /* I1 */
    if (rc)
        return rc;
    uint32_t slot = (uint32_t)(id & ENG_ID_SLOT_MASK), r = 0;
    /* a key already held wins over a full opening: check before claiming */
    rc = key_conflicts(s, k, &p, UINT32_MAX, 0, t);
    if (rc == 0)
        rc = keyrec_claim(s, id, &r);                              /* I2 */
    if (rc == 0) {
        eng_keyrec *kr = keyrec_at(s, slot, r);
        eng_key body = *k, old;
        copy_words_relaxed(&old, (const uint64_t *)kr + 1, KR_BODY_WORDS);   /* ours */
        body.gen = (uint16_t)(old.gen + 1);
        body.order = next_order(s, id);
        fence_release();                                           /* I3: W0 */
        copy_words_relaxed((uint64_t *)kr + 1, &body, KR_BODY_WORDS);
        rc = cell_place(s, &p, kc_make(slot, r, body.gen, p.fp));  /* I4 */
        if (rc == 0) {
            fence_seq_cst();   /* our cell before the scan: pairs with theirs */
            rc = key_conflicts(s, k, &p, slot, r, t);              /* I5 */
        }
        uint64_t JL = 0;
        if (rc == 0) {
            die_if(s, ENG_FAULT_DIE_IN_KEY);
            if (record && s->journal && (rc = journal_latch(s, t, &JL)) != 0)   /* J1 */
                rc = journal_refusal(rc, ENG_EBUSY);   /* busy past its bound: retract */
        }
        if (rc == 0) {
            uint64_t words[ENG_KEY_MAX / 8];
            memcpy(words, body.key, sizeof words);
            if (JL)
                journal_fill_release(s, JL, ENG_JK_KEY, 0, id, r, words, ENG_KEY_MAX / 8,
                                     body.len);                     /* J2 */
            uint64_t busy = kr_tag(ENG_KR_BUSY, s->token);
            if (!cas_acq_rel_u64(&kr->tag, &busy, kr_held(id)))    /* I6 (J3) */
                rc = ENG_EBUSY;   /* revoked: we were proven gone */
            if (JL && rc)
                journal_abort(s, JL);
            else if (JL)
                journal_publish(s, JL);                             /* J4 */
        } else if (keyrec_take(s, slot, r, kr_tag(ENG_KR_BUSY, s->token))) {
            keyrec_free(s, slot, r, ENG_KR_CLEARING);              /* retract */
        }
    }
    stripe_unlock(s, p.b1);                                        /* I7 */
    return rc;
}

int eng_bind_key(eng_seg *s, uint64_t id, const char *key, uint32_t key_len)
{
    eng_slot *sl;
    uint64_t w;
    eng_key k;
    int rc = enter_id(s, id, 0, &sl, &w);
    if (rc == 0)
        rc = key_from(key, key_len, &k);
    if (rc == 0 && s->kpp == 0)
        rc = ENG_EKEYLIMIT;
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_KEY);
    rc = key_insert(s, id, &k, t, 1);
    op_end(t, rc);
    return rc;
}

int64_t eng_lookup(eng_seg *s, const char *key, uint32_t key_len)
{
    CHECK_SEG(s);
    eng_key want;
    int rc = key_from(key, key_len, &want);
    if (rc)
        return rc;
    if (s->kpp == 0)
        return 0;
    op_timer t = op_begin(s, ENG_OP_LOOKUP);
    key_place p = key_place_of(s, want.key, want.len);
    uint32_t buckets[2] = {p.b1, p.b2};
    uint64_t found = 0;
    for (int i = 0; i < 2 && !found; i++) {
        uint64_t *b = bucket_at(s, buckets[i]);
        for (uint32_t j = 0; j < ENG_KEY_BUCKET; j++) {
            uint64_t c = load_acquire_u64(&b[j]);
            if (!(c & ENG_KC_USED) || (c & ENG_KC_FP_MASK) != p.fp ||
                kc_slot(c) >= s->capacity || kc_r(c) >= s->kpp)
                continue;
            uint64_t tag;
            eng_key k;
            if (keyrec_read(keyrec_at(s, kc_slot(c), kc_r(c)), &tag, &k) != 0) {
                rc = ENG_EBUSY;
                continue;
            }
            if (kr_kind(tag) == ENG_KR_HELD && key_equal(&k, &want) &&
                id_status(s, tag >> 8) == ID_OPEN) {
                found = tag >> 8;
                rc = 0;
                break;
            }
        }
    }
    op_end(t, rc ? rc : ENG_APPLIED);
    return rc ? rc : (int64_t)found;
}

int eng_keys(eng_seg *s, uint64_t id, eng_key *out, uint32_t max, uint32_t *out_n)
{
    eng_slot *sl;
    uint64_t w;
    int rc = enter_id(s, id, 0, &sl, &w);
    if (rc == 0 && (!out_n || (max && !out)))
        rc = ENG_EBADARG;
    if (rc)
        return rc;
    uint32_t n = 0, slot = (uint32_t)(id & ENG_ID_SLOT_MASK);
    for (uint32_t r = 0; r < s->kpp && n < max; r++) {
        uint64_t tag;
        rc = keyrec_read(keyrec_at(s, slot, r), &tag, &out[n]);
        if (rc)
            return rc;
        if (tag == kr_held(id))
            n++;
    }
    for (uint32_t i = 1; i < n; i++)   /* in bind order (at most kpp: insertion sort) */
        for (uint32_t j = i; j > 0 && out[j - 1].order > out[j].order; j--) {
            eng_key tmp = out[j];
            out[j] = out[j - 1];
            out[j - 1] = tmp;
        }
    *out_n = n;
    return id_live(sl, load_acquire_u64(&sl->word), id);   /* released meanwhile: stale */
}

/* recover(), and attach before it reuses a dead entry's incarnation: clear
 * what dead inserters (their stripe locks, BUSY and CLEARING records) and
 * gone openings left in the index.  Run by an attach before its token is
 * set, it works as token 0 (no live Engine has it). */
static uint32_t keys_sweep(eng_seg *s)
{
    uint32_t n = 0;
    for (uint32_t b = 0; b < s->key_buckets; b++) {
        uint32_t cur = load_relaxed_u32(&s->stripes[b]);
        if (cur && cur != s->token && token_dead(s, cur))
            n += cas_acq_rel_u32(&s->stripes[b], &cur, 0);
    }
    for (uint32_t slot = 0; slot < s->capacity; slot++)
        for (uint32_t r = 0; r < s->kpp; r++) {
            uint64_t t = load_acquire_u64(&keyrec_at(s, slot, r)->tag);
            int gone = kr_kind(t) == ENG_KR_HELD ? id_status(s, t >> 8) == ID_GONE
                                                 : t != 0 && tag_owner_dead(s, t);
            if (gone)
                n += keyrec_clear(s, slot, r, t);
        }
    for (uint64_t i = 0; i < (uint64_t)s->key_buckets * ENG_KEY_BUCKET; i++) {
        uint64_t c = load_acquire_u64(&s->keyidx[i]);
        if (c && cell_dead(s, c))
            n += cas_acq_rel_u64(&s->keyidx[i], &c, 0);
    }
    return n;
}

/* ---- riders: the records that ride on a slot commit ----------------------------- */
/*
 * A slot commit can change more than the slot: an open publishes its key
 * (inserted before the commit, visible once it commits: key_insert with
 * record 0) and a booked change publishes its account's books (sealed
 * pending with the slot's lock word, B3; published after, B6, or by a
 * resolver that finds the slot committed).  Each such change is committed
 * iff the slot's is, so its record is filled by the same latch holder before
 * the same commit (J2), right after the slot's own record, and published
 * with it (journal_publish_n; a takeover publishes every record its dead
 * holder filled under the latch).  A reader sees the slot's record first,
 * then the key's, then the account's, all or none.  Per account the order
 * is the commit order: the booker holds the account latch across the slot
 * commit.
 */
static uint32_t journal_fill_riders(eng_seg *s, uint64_t JL, uint32_t kind, uint64_t id,
                                    uint64_t L, const eng_ctx_rec *c)
{
    uint64_t seq = jl_seq(JL) + 2;   /* the slot's record is n + 1 */
    uint32_t slot = (uint32_t)(id & ENG_ID_SLOT_MASK);
    if (kind == ENG_JK_OPEN) {   /* an open takes one key: the record it holds */
        for (uint32_t r = 0; r < s->kpp; r++) {
            eng_keyrec *kr = keyrec_at(s, slot, r);
            if (load_acquire_u64(&kr->tag) != kr_held(id))
                continue;
            uint64_t words[ENG_KEY_MAX / 8];
            copy_words_relaxed(words, (const uint64_t *)kr->key, ENG_KEY_MAX / 8);
            journal_fill_at(s, JL, seq++, ENG_JK_KEY, 0, id, r, words, ENG_KEY_MAX / 8,
                            __atomic_load_n(&kr->len, __ATOMIC_RELAXED));
            break;
        }
    }
    eng_account *a;
    if (s->acct_role != ENG_ROLE_NONE && acct_of_id(s, c->w[s->acct_role], &a) == 0) {
        uint64_t AL = load_acquire_u64(&a->word);
        uint64_t v = aw_version(AL);
        const eng_books *pend = &a->books[(v + 1) & 1];
        if (aw_token(AL) && load_acquire_u64(&pend->seal) == AL &&           /* pairs with B3 */
            load_relaxed_u64(&pend->seal_slot) == (uint64_t)slot + 1 &&
            load_relaxed_u64(&pend->seal_word) == L) {
            uint64_t words[ACCT_RECORD_WORDS];
            acct_record_words(a, pend, words);
            journal_fill_at(s, JL, seq++, ENG_JK_ACCOUNT, 0,
                            make_id(load_relaxed_u32(&pend->opening), (uint32_t)(a - s->accounts)),
                            aw_make(v + 1), words, ACCT_RECORD_WORDS, v + 1);
        }
    }
    uint32_t riders = (uint32_t)(seq - jl_seq(JL) - 2);
    /* the slot's record (unpublished: no reader sees it change) counts them
     * before the commit (J3, release), so a takeover that rolls it forward
     * publishes exactly as many */
    if (riders)
        store_relaxed_u32(&jrec_at(s, jl_seq(JL) + 1)->riders, riders);
    return riders;
}
