/*
 * accounts.c - accounts: books that move with the positions booked on them.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== accounts: books that move with the positions booked on them ============= */
/*
 * Protocol.  An account is one latch word (version << 24 | holder token) and
 * two copies of its books; books[version & 1] is published.  A change of
 * the account alone (open_account, deposit, withdraw, halt, update, close)
 * is the latch-seqlock (above): latch, fill the other copy, seal it with the
 * latched word AL (written last, release), publish by CAS AL -> (v + 1, 0).
 *
 * A position changes its account's books only while its actor holds BOTH
 * the slot's transition lock L and the account latch AL (order: slot, then
 * account).  Opening reserves notional = money(entry x amount); the
 * transition out of an open state into a closed one releases it and books
 * realized = side x (money(last price x amount) - notional) into cash
 * (money(x) = llround(x x ENG_MONEY_SCALE): each leg is rounded to the unit,
 * half away from zero, and the difference is exact).
 *
 *   holder (slot locked: L):                 resolver of AL (holder proven dead):
 *     B1 latch the account: AL                 pend = books[(v(AL) + 1) & 1]
 *     B2 check the limits on the published     if pend.seal != AL: back
 *        books (refused: unlatch, unlock)      elif pend names no slot: forward
 *     B3 fill pend, seal = {slot, L, AL}       else: if the slot's word is
 *        (release, last)                             still L: slot takeover
 *     B4 seal the record copy with L (W2)          forward iff the slot's
 *     B5 CAS L -> committed  <- DECISION           PUBLISHED record copy has
 *     B6 CAS AL -> (v + 1, 0): publish             commit == L
 *                                              forward: CAS AL -> (v + 1, 0)
 *                                              back:    CAS AL -> (v, 0)
 *
 *   reader (never waits):
 *     w1 = word (acquire); books[v & 1], or pend if it is sealed with w1 and
 *     its slot's decision is already "committed"; fence (acquire); retry
 *     unless word == w1.
 *
 * The slot commit B5 decides both records: B3 precedes B4, so a record
 * sealed with L (which a slot takeover rolls forward) always has sealed
 * books beside it.  The evidence "published copy's commit == L" stays true
 * until another record copy of the slot is published, and every path that
 * could publish one waits for the latch first: a booked transition latches
 * the account; any other record-writing transition of a position with an
 * account waits, holding the slot lock, until the latch it saw is gone
 * (acct_settle); release_position settles, then frees the slot by a CAS from
 * exactly the word it settled against, so a booking that started meanwhile
 * (it must move the word) makes the release retry.  Specs whose positions
 * can leave a closed state (or start in one) are refused at create when
 * the record has an account: a closing is booked exactly once.  A reader sees the
 * new books exactly when readers of the slot see its new state.
 *
 * Guarantees: after any number of SIGKILLs and a resolution (any waiter on
 * the latch, or recover()), reserved == the sum of the notionals of the
 * account's open positions and cash == opening cash + deposits -
 * withdrawals + realized of its closed positions, exactly; a refused
 * opening changes nothing; realized losses reaching max_loss halt the
 * account in the same publish.
 * Does not guarantee: fairness between contending latchers (EBUSY after the
 * bound); exactness across 2^16 commits of one slot while its booking is
 * unresolved (generation wrap, as the record seal); an opening whose id
 * never reached its caller (eng_abandon_open) is not undone: it stays open
 * with its reservation, visible in snapshot(), for anyone to close.
 */

#define ACCT_WAIT_STEPS ENG_ACCT_WAIT_STEPS
#define BOOKS_WORDS REC_WORDS(eng_books)

static inline uint64_t aw_version(uint64_t w) { return w >> ENG_AW_VERSION_SHIFT; }
static inline uint32_t aw_token(uint64_t w) { return (uint32_t)(w & ENG_TOKEN_MASK); }
static inline uint64_t aw_make(uint64_t v) { return v << ENG_AW_VERSION_SHIFT; }

/* price x amount in money units, rounded half away from zero; -1 if it is
 * negative, not finite or beyond int64. */
static inline int64_t money_of(double price, double amount)
{
    double x = price * amount * (double)ENG_MONEY_SCALE;
    if (!(x >= 0.0) || x >= 9223372036854775808.0)   /* 2^63; NaN fails the first test */
        return -1;
    return (int64_t)llround(x);
}

int64_t eng_money_of(double price, double amount)
{
    int64_t m = money_of(price, amount);
    return m < 0 ? ENG_EBADMONEY : m;
}

static inline int acct_of_id(const eng_seg *s, uint64_t id, eng_account **out)
{
    if (id == 0 || id > ENG_ACCOUNT_ID_MAX || (id & ENG_ID_SLOT_MASK) >= s->max_accounts)
        return ENG_EBADACCOUNT;
    *out = &s->accounts[id & ENG_ID_SLOT_MASK];
    return 0;
}

/* 0 if books b are those of the open opening named by id. */
static inline int books_check(const eng_books *b, uint64_t id)
{
    uint32_t want = id_opening(id);
    if (b->open && b->opening == want)
        return 0;
    if (want == 0 || want > b->opening)
        return ENG_EBADACCOUNT;
    return ENG_ESTALEACCOUNT;
}

/* Has the transition that locked slot_ref - 1 with Ls committed?  1 yes,
 * 0 no, -1 not decided yet (still locked; resolve: run the slot's takeover
 * first when its owner is proven dead). */
static int slot_decision(eng_seg *s, uint64_t slot_ref, uint64_t Ls, op_timer t, int resolve)
{
    if (slot_ref == 0 || slot_ref > s->capacity)
        return 0;
    eng_slot *sl = slot_at(s, (uint32_t)(slot_ref - 1));
    uint64_t w = load_acquire_u64(&sl->word);
    if (w == Ls) {
        if (!resolve || !token_dead(s, sw_owner(Ls)))
            return -1;
        takeover(s, sl, Ls, t);
        w = load_acquire_u64(&sl->word);
        if (w == Ls)
            return -1;
    }
    return load_acquire_u64(&copy_of(s, sl, sw_ctx(w))->commit) == Ls;   /* pairs with W2 */
}

/* An account record's words: the books, then the key and its length (see
 * ENG_DJ_ACCT_KEY_WORD): the key is written before the open's seal and
 * stable while the account is open, so a record of its latch holder has it. */
#define ACCT_RECORD_WORDS (ENG_DJ_ACCT_KEYLEN_WORD + 1)
static void acct_record_words(const eng_account *a, const eng_books *b, uint64_t *words)
{
    copy_words_relaxed(words, (const uint64_t *)b, BOOKS_WORDS);
    copy_words_relaxed(&words[ENG_DJ_ACCT_KEY_WORD], (const uint64_t *)a->key, ENG_KEY_MAX / 8);
    uint32_t len = load_relaxed_u32(&a->key_len);
    words[ENG_DJ_ACCT_KEYLEN_WORD] = len <= ENG_KEY_MAX ? len : 0;
}

/* Resolve latch AL by its evidence (its holder is proven dead, or is us
 * after our slot commit failed).  1 forward, 2 back, 0 word moved / undecided. */
static int acct_resolve(eng_seg *s, eng_account *a, uint64_t AL, op_timer t)
{
    uint64_t v = aw_version(AL);
    eng_books *pend = &a->books[(v + 1) & 1];
    int forward = 0;
    uint64_t ref = 0;
    if (load_acquire_u64(&pend->seal) == AL) {                     /* pairs with B3 */
        ref = load_relaxed_u64(&pend->seal_slot);
        int d = ref ? slot_decision(s, ref, load_relaxed_u64(&pend->seal_word), t, 1) : 1;
        if (d < 0)
            return 0;
        forward = d;
    }
    uint64_t expected = AL;
    uint64_t JL = 0;
    if (forward && !ref && s->journal) {
        /* rolling a change of the account alone forward is its commit: made
         * by the journal latch holder, recorded on the dead holder's behalf
         * (a booked change is recorded by its slot's commit) */
        if (journal_latch(s, t, &JL) != 0)
            return 0;
        if (load_acquire_u64(&a->word) != AL) {
            journal_abort(s, JL);
            return 0;
        }
        uint64_t id = make_id(load_relaxed_u32(&pend->opening), (uint32_t)(a - s->accounts));
        uint64_t words[ACCT_RECORD_WORDS];
        acct_record_words(a, pend, words);
        journal_fill_release(s, JL, ENG_JK_ACCOUNT, 0, id, aw_make(v + 1), words,
                             ACCT_RECORD_WORDS, v + 1);
    }
    if (!cas_acq_rel_u64(&a->word, &expected, aw_make(forward ? v + 1 : v))) {
        if (JL)
            journal_abort(s, JL);
        return 0;
    }
    if (JL)
        journal_publish(s, JL);
    OP_TAKEOVERS(t, 1);
    if (forward)
        OP_FORWARDS(t, 1);
    else
        OP_BACKS(t, 1);
    return forward ? 1 : 2;
}

/* B1: take the latch; a holder proven dead is resolved first. */
static int acct_latch(eng_seg *s, eng_account *a, op_timer t, uint64_t *latched)
{
    for (uint32_t step = 0; step < ACCT_WAIT_STEPS; step++) {
        uint64_t cur = load_acquire_u64(&a->word);
        uint32_t holder = aw_token(cur);
        if (holder == 0) {
            uint64_t mine = cur | s->token;
            if (cas_acq_rel_u64(&a->word, &cur, mine)) {
                *latched = mine;
                return 0;
            }
        } else if (time_to_check_owner(step) && token_dead(s, holder)) {
            acct_resolve(s, a, cur, t);
            continue;
        }
        OP_RETRIES(t, 1);
        backoff_step(step < MAX_WAIT_STEPS ? step : MAX_WAIT_STEPS - 1);
    }
    return ENG_EBUSY;
}

static void acct_unlatch(eng_account *a, uint64_t AL)
{
    seq_publish_acq_rel(&a->word, AL, aw_make(aw_version(AL)));
}

/* B3: fill the unpublished copy, then seal it with AL (W0-W2). */
static void acct_write_pending(eng_account *a, uint64_t AL, eng_books *nb, uint64_t slot_ref,
                               uint64_t Ls)
{
    eng_books *dst = &a->books[(aw_version(AL) + 1) & 1];
    nb->seal_slot = slot_ref;
    nb->seal_word = Ls;
    seq_fill_release((uint64_t *)dst + 1, (uint64_t *)nb + 1, BOOKS_WORDS - 1, &dst->seal, AL);
}

/* B6 (or a single change's publish, W3): 0, or EBUSY if a resolver took the
 * latch (it rolled the sealed copy forward: the change is in). */
static int acct_publish(eng_account *a, uint64_t AL)
{
    return seq_publish_acq_rel(&a->word, AL, aw_make(aw_version(AL) + 1));
}

/* A change of account a alone (id), latched as AL: seal books b and publish
 * them (B3, W3), journaled: J1 before the seal (busy past the bound: unlatch,
 * nothing sealed, ENG_EBUSY), J2 the books after, J3 the publish, J4.
 * fault: a test fault switch honoured once the change is sealed (0: none). */
static int acct_commit(eng_seg *s, eng_account *a, uint64_t AL, eng_books *b, uint64_t id,
                       uint32_t fault)
{
    uint64_t JL = 0;
    op_timer none = {NULL, 0};
    int jrc = s->journal ? journal_latch(s, none, &JL) : 0;         /* J1 */
    if (jrc) {
        acct_unlatch(a, AL);
        return journal_refusal(jrc, ENG_EBUSY);
    }
    acct_write_pending(a, AL, b, 0, 0);
    if (fault)
        die_if(s, fault);   /* latch held, the change sealed, its record not filled */
    if (JL) {
        uint64_t words[ACCT_RECORD_WORDS];
        acct_record_words(a, b, words);
        journal_fill_release(s, JL, ENG_JK_ACCOUNT, 0, id, aw_make(aw_version(AL) + 1), words,
                             ACCT_RECORD_WORDS, aw_version(AL) + 1);   /* J2 */
    }
    if (acct_publish(a, AL) != 0) {                                 /* J3 */
        if (JL)   /* not reached while we hold the journal latch: a resolver needs it */
            journal_abort(s, JL);
        return 0;   /* taken: a resolver rolled the sealed copy forward */
    }
    if (JL)
        journal_publish(s, JL);                                     /* J4 */
    return 0;
}

typedef struct books_view {
    eng_books *b;
    uint64_t version;
    uint32_t *key_len;       /* non-NULL: also the opening's key, in the same read */
    uint64_t *key;           /* ENG_KEY_MAX / 8 words */
} books_view;

/* R1 of the books reader: books[v & 1], or pend if it is sealed with w and
 * its slot's decision is already "committed". */
static void copy_books(eng_seg *s, const void *obj, uint64_t w, void *out)
{
    const eng_account *a = obj;
    books_view *v = out;
    uint64_t ver = aw_version(w);
    const eng_books *src = &a->books[ver & 1];
    if (aw_token(w)) {
        const eng_books *pend = &a->books[(ver + 1) & 1];
        if (load_acquire_u64(&pend->seal) == w) {                  /* pairs with B3 */
            op_timer none = {NULL, 0};
            uint64_t ref = load_relaxed_u64(&pend->seal_slot);
            if (ref && slot_decision(s, ref, load_relaxed_u64(&pend->seal_word), none, 0) == 1) {
                src = pend;
                ver++;
            }
        }
    }
    copy_words_relaxed(v->b, src, BOOKS_WORDS);
    v->version = ver;
    if (v->key_len) {   /* written only while the record is free: the version re-check covers it */
        *v->key_len = load_relaxed_u32(&a->key_len);
        copy_words_relaxed(v->key, (const uint64_t *)a->key, ENG_KEY_MAX / 8);
    }
}

/* A consistent read of the books (see the reader above); never waits. */
static int acct_read(eng_seg *s, const eng_account *a, eng_books *out, uint64_t *version,
                     uint32_t *latched)
{
    books_view v = {out, 0, NULL, NULL};
    uint64_t w;
    int rc = seq_read_acquire(s, &a->word, ~0ULL, copy_books, a, &v, &w);
    if (rc)
        return rc;
    *version = v.version;
    if (latched)
        *latched = aw_token(w) != 0;
    return 0;
}

/* Wait until the latch seen now is gone (resolving a dead holder): after
 * it, no booking about a slot we hold (or release) is unresolved. */
static int acct_settle(eng_seg *s, uint64_t acct, op_timer t)
{
    eng_account *a;
    if (acct_of_id(s, acct, &a))
        return 0;
    uint64_t first = load_acquire_u64(&a->word);
    if (!aw_token(first))
        return 0;
    for (uint32_t step = 0; step < ACCT_WAIT_STEPS; step++) {
        uint64_t cur = load_acquire_u64(&a->word);
        if (cur != first)
            return 0;
        if (time_to_check_owner(step) && token_dead(s, aw_token(cur))) {
            acct_resolve(s, a, cur, t);
            continue;
        }
        OP_RETRIES(t, 1);
        backoff_step(step < MAX_WAIT_STEPS ? step : MAX_WAIT_STEPS - 1);
    }
    return ENG_EBUSY;
}

enum { BOOK_OPEN = 1, BOOK_CLOSE = 2 };

/*
 * The worst case of a booked position.  Its close books realized = side x
 * (money(last, amount) - notional) with last in (0, ENG_BOOK_PRICE_MULT x
 * entry] (a close above the band is refused), so with top = money(MULT x
 * entry, amount) it adds at most gain and takes at most loss:
 *
 *   long:  realized in [-notional, top - notional]   gain = top - notional, loss = notional
 *   short: realized in [notional - top, notional]    gain = notional, loss = top - notional
 *
 * (money() is monotonic in the price, and MULT is a power of two, so MULT x
 * entry is exact.)  An account keeps, with worst_gain / worst_loss the sums
 * over its open positions:
 *
 *   cash + worst_gain <= INT64_MAX      realized + worst_gain <= INT64_MAX
 *   cash - worst_loss >= INT64_MIN      realized - worst_loss >= INT64_MIN
 *
 * An opening that would break it, or a deposit (cash + amount + worst_gain),
 * is refused; a close keeps it (realized <= its gain, which leaves the sums
 * with it), and a withdrawal keeps cash >= reserved >= 0.  So every close
 * within the band books.
 */
_Static_assert((ENG_BOOK_PRICE_MULT & (ENG_BOOK_PRICE_MULT - 1)) == 0, "the band's top is exact");

static int position_worst(double entry, double amount, int64_t side, int64_t *notional,
                          int64_t *top, int64_t *gain, int64_t *loss)
{
    *notional = money_of(entry, amount);
    *top = money_of(entry * ENG_BOOK_PRICE_MULT, amount);
    if (*notional < 0 || *top < 0)
        return ENG_EBADMONEY;   /* the position's value at the band's top is beyond money */
    *gain = side > 0 ? *top - *notional : *notional;
    *loss = side > 0 ? *notional : *top - *notional;
    return 0;
}

/* 0 if books b (with worst_gain, worst_loss already summed) keep the room. */
static inline int books_room_ok(const eng_books *b)
{
    int64_t x;
    return !__builtin_add_overflow(b->cash, b->worst_gain, &x) &&
           !__builtin_add_overflow(b->realized, b->worst_gain, &x) &&
           !__builtin_sub_overflow(b->cash, b->worst_loss, &x) &&
           !__builtin_sub_overflow(b->realized, b->worst_loss, &x);
}

static int books_reserve(eng_books *b, int64_t notional, int64_t gain, int64_t loss)
{
    int64_t reserved, avail;
    if (b->halted)
        return ENG_ERISK_HALTED;
    if (b->open_positions >= b->max_positions)
        return ENG_ERISK_COUNT;
    if (__builtin_add_overflow(b->reserved, notional, &reserved) || reserved > b->max_exposure)
        return ENG_ERISK_EXPOSURE;
    if (__builtin_sub_overflow(b->cash, b->reserved, &avail) || notional > avail)
        return ENG_ERISK_CASH;
    eng_books n = *b;
    if (__builtin_add_overflow(b->worst_gain, gain, &n.worst_gain) ||
        __builtin_add_overflow(b->worst_loss, loss, &n.worst_loss) || !books_room_ok(&n))
        return ENG_EBADMONEY;   /* a close in the band could not be booked */
    b->worst_gain = n.worst_gain;
    b->worst_loss = n.worst_loss;
    b->reserved = reserved;
    b->open_positions++;
    return 0;
}

static int books_release(eng_books *b, int64_t notional, int64_t realized, int64_t gain,
                         int64_t loss)
{
    int64_t reserved, cash, total;
    if (b->open_positions == 0 || __builtin_sub_overflow(b->reserved, notional, &reserved) ||
        reserved < 0)
        return ENG_ECORRUPT;   /* the books lost a reservation: never, if the invariant holds */
    if (__builtin_add_overflow(b->cash, realized, &cash) ||
        __builtin_add_overflow(b->realized, realized, &total))
        return ENG_EBADMONEY;   /* never within the band, if the room was kept */
    b->reserved = reserved;
    b->open_positions--;
    b->cash = cash;
    b->realized = total;
    b->worst_gain = b->worst_gain > gain ? b->worst_gain - gain : 0;
    b->worst_loss = b->worst_loss > loss ? b->worst_loss - loss : 0;
    if (total < 0 && total <= -b->max_loss)
        b->halted = 1;
    return 0;
}

/* B1-B3 for the position in record c (the copy about to be sealed with L).
 * A close books at fill when it is > 0 (the closing transition's
 * exit_price), else at the last price written. */
static int book_position(eng_seg *s, eng_slot *sl, uint64_t L, const eng_ctx_rec *c, int kind,
                         double fill, op_timer t, eng_account **out_a, uint64_t *out_AL)
{
    uint64_t acct = c->w[s->acct_role];
    eng_account *a;
    int rc = acct_of_id(s, acct, &a);
    if (rc)
        return rc;
    double amount = as_f8(c->w[s->roles[ENG_ROLE_AMOUNT]]);
    int64_t side = (int64_t)c->w[s->roles[ENG_ROLE_SIDE]];
    int64_t notional, top, gain, loss, realized = 0;
    rc = position_worst(as_f8(c->w[s->roles[ENG_ROLE_ENTRY_PRICE]]), amount, side, &notional,
                        &top, &gain, &loss);
    if (rc)
        return rc;
    if (kind == BOOK_CLOSE) {
        eng_price_rec p = {.price = fill};
        uint64_t pv;
        if (!(fill > 0.0) && (rc = read_price_rec(sl, &p, &pv)) != 0)
            return rc;
        int64_t last = money_of(p.price, amount);
        if (last < 0 || last > top)
            return ENG_EBADMONEY;   /* a price above the band: nothing changes */
        realized = side > 0 ? last - notional : notional - last;   /* in [-loss, gain] */
    }
    uint64_t AL;
    rc = acct_latch(s, a, t, &AL);                                 /* B1 */
    if (rc)
        return rc;
    eng_books b;
    /* we hold the latch: the published copy cannot change under us */
    copy_words_relaxed(&b, &a->books[aw_version(AL) & 1], BOOKS_WORDS);
    rc = books_check(&b, acct);                                    /* B2 */
    if (rc == 0) {
        s->last_books = b;
        s->last_amount = notional;
        rc = kind == BOOK_OPEN ? books_reserve(&b, notional, gain, loss)
                               : books_release(&b, notional, realized, gain, loss);
    }
    if (rc) {
        acct_unlatch(a, AL);
        return rc;
    }
    uint32_t slot = (uint32_t)(((uint8_t *)sl - s->slots) / s->slot_size);
    acct_write_pending(a, AL, &b, (uint64_t)slot + 1, L);          /* B3 */
    *out_a = a;
    *out_AL = AL;
    return 0;
}

/* B4-B6: seal the record with L, commit the slot, publish the books. */
static int finish_booked(eng_seg *s, eng_slot *sl, uint64_t L, eng_ctx_rec *c, eng_account *a,
                         uint64_t AL, op_timer t)
{
    uint64_t nw;
    int rc = ctx_publish(s, sl, L, c, &nw);                        /* B4, B5 */
    if (rc) {
        acct_resolve(s, a, AL, t);   /* not committed (journal busy, or judged gone): the evidence decides */
        return journal_refusal(rc, sw_state(L) ? ENG_CONFLICT : ENG_EBUSY);
    }
    die_if(s, ENG_FAULT_DIE_IN_BOOKING);
    acct_publish(a, AL);                                           /* B6 */
    commit_after(s, sl, sw_unlocked(L), nw);
    return ENG_APPLIED;
}

/* The booked form of commit_with_update: out of an open state into a closed one. */
static int commit_booked_close(eng_seg *s, eng_slot *sl, uint64_t L, const eng_ctx_update *u,
                               op_timer t)
{
    eng_ctx_rec c;
    copy_words_relaxed(&c, copy_of(s, sl, sw_ctx(L)), rec_words(s));   /* ours: we hold L */
    if (u)
        for (uint32_t i = 0; i < s->n_words; i++)
            if (u->mask & (1u << i))
                c.w[i] = u->w[i];
    eng_account *a;
    uint64_t AL;
    uint8_t xp = s->roles[ENG_ROLE_EXIT_PRICE];
    double fill = (u && xp != ENG_ROLE_NONE && (u->mask >> xp) & 1) ? as_f8(u->w[xp]) : 0.0;
    int rc = book_position(s, sl, L, &c, BOOK_CLOSE, fill, t, &a, &AL);
    if (rc) {
        unlock_unchanged(sl, L);
        return rc;
    }
    return finish_booked(s, sl, L, &c, a, AL, t);
}

/* The account a holder of L must care about: 0, or the record's account. */
static inline uint64_t account_of_locked(const eng_seg *s, const eng_slot *sl, uint64_t L)
{
    if (s->acct_role == ENG_ROLE_NONE)
        return 0;
    return load_relaxed_u64(&copy_of(s, sl, sw_ctx(L))->w[s->acct_role]);
}

static inline int is_closing(const eng_seg *s, uint32_t from, uint32_t to)
{
    uint32_t cm = s->hdr->closed_mask;
    return from && !(from & cm) && (to & cm);
}

/* ---- changes of one account alone ------------------------------------------ */

enum { AC_DEPOSIT, AC_WITHDRAW, AC_HALT, AC_UPDATE, AC_CLOSE };

typedef struct acct_args {
    int64_t amount, max_exposure, max_loss;
    uint64_t version;
    uint32_t max_positions, halted, attempt;
} acct_args;

static int books_change(eng_books *b, int kind, const acct_args *x, uint64_t version)
{
    int64_t v1, v2;
    switch (kind) {
    case AC_DEPOSIT:
        if (__builtin_add_overflow(b->cash, x->amount, &v1) ||
            __builtin_add_overflow(v1, b->worst_gain, &v2) ||   /* the open positions' room */
            __builtin_add_overflow(b->deposits, x->amount, &v2))
            return ENG_EBADMONEY;
        b->cash = v1;
        b->deposits = v2;
        return 0;
    case AC_WITHDRAW:
        if (__builtin_sub_overflow(b->cash, b->reserved, &v1) || x->amount > v1)
            return ENG_ERISK_CASH;
        if (__builtin_add_overflow(b->withdrawals, x->amount, &v2))
            return ENG_EBADMONEY;
        b->cash -= x->amount;
        b->withdrawals = v2;
        return 0;
    case AC_HALT:
        b->halted = x->halted;
        return 0;
    case AC_UPDATE:
        if (version != x->version)
            return ENG_EVERSION;
        b->max_exposure = x->max_exposure;
        b->max_positions = x->max_positions;
        b->max_loss = x->max_loss;
        /* losses already at a lowered max_loss halt it, as a closing would */
        b->halted = x->halted || (b->realized < 0 && b->realized <= -b->max_loss);
        return 0;
    case AC_CLOSE:
        if (b->open_positions || b->reserved)
            return ENG_EACCTBUSY;
        b->open = 0;
        return 0;
    default:
        return ENG_EBADARG;
    }
}

static int acct_single(eng_seg *s, uint64_t id, int kind, const acct_args *x)
{
    eng_account *a;
    int rc = acct_of_id(s, id, &a);
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_ACCOUNT);
    OP_RETRIES(t, x->attempt ? 1 : 0);   /* update_account: this try is a retry */
    uint64_t AL;
    rc = acct_latch(s, a, t, &AL);
    if (rc == 0) {
        eng_books b;
        copy_words_relaxed(&b, &a->books[aw_version(AL) & 1], BOOKS_WORDS);
        s->last_books = b;
        s->last_amount = x->amount;
        rc = books_check(&b, id);
        if (rc == 0)
            rc = books_change(&b, kind, x, aw_version(AL));
        if (rc)
            acct_unlatch(a, AL);
        else
            rc = acct_commit(s, a, AL, &b, id, 0);
    }
    op_end(t, rc == ENG_EVERSION ? ENG_CONFLICT : rc);
    return rc;
}

static inline int money_ok(int64_t m) { return m >= 0; }

/*
 * Account keys.  open_account(key=) gives the opening a key, unique among
 * open accounts; lookup_account finds it.  The key lives in its record's
 * line 0, written only while the record is free (published open == 0) by
 * the opener that holds the latch, before it seals the open; so while the
 * published books say open at version v, the key is that opening's, and a
 * reader that sees the version unchanged after copying it has it whole.
 *
 *   keyed open:                               lookup (never waits):
 *     K1 take the header's key lock (token;     for each record:
 *        a proven-dead holder's taken over)       w1 = word (acquire); open,
 *     K2 scan: a record latched by a proven-      opening = books[v(w1) & 1];
 *        dead holder is resolved first (its       copy the key; fence
 *        sealed open may roll forward); an        (acquire); retry unless
 *        open record with the key: EKEYEXISTS     v(word) == v(w1); open and
 *     K3 open as any opening does, the key        equal: its id
 *        written before the seal
 *     K4 release the key lock
 *
 * Keyed opens are serialised by the key lock; an unkeyed open writes no key
 * (length 0), so it cannot collide.  A keyed opener killed anywhere leaves a
 * lock the next keyed open takes over and a latch any waiter resolves: its
 * open rolls forward with its key or back without it, before K2 judges it.
 * Does not guarantee: uniqueness against an opener judged gone while it
 * still runs (code outside the engine closed its liveness descriptor);
 * lookups faster than a scan of max_accounts records.
 */
_Static_assert(ENG_KEY_MAX % 8 == 0, "an account key is whole words");

static int acct_key_lock(eng_seg *s, op_timer t)
{
    return token_lock(s, &s->hdr->acct_key_lock, t);
}

static void acct_key_unlock(eng_seg *s)
{
    uint32_t mine = s->token;
    cas_acq_rel_u32(&s->hdr->acct_key_lock, &mine, 0);
}

/* The opening of record a if it is open with key k (a consistent read, see
 * the lookup above): 0 if not; -1 if it kept changing. */
static int64_t acct_key_of(const eng_account *a, const eng_key *k)
{
    for (uint32_t i = 0; i < READ_RETRIES; i++) {
        uint64_t w = load_acquire_u64(&a->word);
        const eng_books *b = &a->books[aw_version(w) & 1];
        uint32_t open = load_relaxed_u32(&b->open), opening = load_relaxed_u32(&b->opening);
        uint32_t len = load_relaxed_u32(&a->key_len);
        uint64_t key[ENG_KEY_MAX / 8];
        copy_words_relaxed(key, a->key, ENG_KEY_MAX / 8);
        fence_acquire();                                     /* pairs with the seal's release */
        if (aw_version(load_relaxed_u64(&a->word)) != aw_version(w))
            continue;
        return open && len == k->len && memcmp(key, k->key, len) == 0 ? (int64_t)opening : 0;
    }
    return -1;
}

/* K2: is key k held by an open account?  0 no, ENG_EKEYEXISTS, ENG_EBUSY. */
static int acct_key_taken(eng_seg *s, const eng_key *k, op_timer t)
{
    for (uint32_t i = 0; i < s->max_accounts; i++) {
        eng_account *a = &s->accounts[i];
        uint64_t w = load_acquire_u64(&a->word);
        uint32_t holder = aw_token(w);
        if (holder && holder != s->token && token_dead(s, holder))
            acct_resolve(s, a, w, t);   /* a dead keyed opener's open: decided now */
        int64_t opening = acct_key_of(a, k);
        if (opening)
            return opening < 0 ? ENG_EBUSY : ENG_EKEYEXISTS;
    }
    return 0;
}

/* K3: the opening's key into a free record we hold latched (0 bytes: none). */
static void acct_key_write(eng_account *a, const eng_key *k)
{
    uint64_t key[ENG_KEY_MAX / 8];
    memset(key, 0, sizeof key);
    uint32_t len = k ? k->len : 0;
    if (len)
        memcpy(key, k->key, len);
    store_relaxed_u32(&a->key_len, len);
    uint64_t *dst = (uint64_t *)a->key;
    for (uint32_t i = 0; i < ENG_KEY_MAX / 8; i++)
        store_relaxed_u64(&dst[i], key[i]);   /* published by the seal's release (B3) */
}

int64_t eng_lookup_account(eng_seg *s, const char *key, uint32_t key_len)
{
    CHECK_SEG(s);
    eng_key k;
    int rc = key_from(key, key_len, &k);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < s->max_accounts; i++) {
        int64_t opening = acct_key_of(&s->accounts[i], &k);
        if (opening < 0)
            return ENG_EBUSY;
        if (opening)
            return (int64_t)make_id((uint32_t)opening, i);
    }
    return 0;
}

int eng_open_account(eng_seg *s, int64_t cash, int64_t max_exposure, uint32_t max_positions,
                     int64_t max_loss, const char *key, uint32_t key_len, uint64_t *out_id)
{
    CHECK_SEG(s);
    if (!out_id)
        return ENG_EBADARG;
    if (!money_ok(cash) || !money_ok(max_exposure) || !money_ok(max_loss))
        return ENG_EBADMONEY;
    eng_key kbuf;
    if (key && key_from(key, key_len, &kbuf) != 0)
        return ENG_EBADKEY;
    if (s->max_accounts == 0)
        return ENG_EACCTFULL;
    op_timer t = op_begin(s, ENG_OP_ACCOUNT);
    int rc = key ? acct_key_lock(s, t) : 0;                                 /* K1 */
    if (rc == 0 && key && (rc = acct_key_taken(s, &kbuf, t)) != 0)          /* K2 */
        acct_key_unlock(s);
    if (rc) {
        op_end(t, rc);
        return rc;
    }
    if (key)
        test_pause(s);   /* tests: widen the window between the scan and the publish */
    uint32_t n = s->max_accounts;
    uint32_t start = fetch_add_relaxed_u32(&s->hdr->account_hint, 1) % n;
    rc = ENG_EACCTFULL;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = (start + k) % n;
        eng_account *a = &s->accounts[i];
        uint64_t w = load_acquire_u64(&a->word);
        if (aw_token(w) || load_relaxed_u32(&a->books[aw_version(w) & 1].open))
            continue;
        uint64_t AL = w | s->token;
        if (!cas_acq_rel_u64(&a->word, &w, AL))
            continue;
        eng_books b;
        copy_words_relaxed(&b, &a->books[aw_version(AL) & 1], BOOKS_WORDS);
        if (b.open) {
            acct_unlatch(a, AL);
            continue;
        }
        uint32_t opening = b.opening + 1 ? b.opening + 1 : 1;
        memset(&b, 0, sizeof b);
        b.opening = opening;
        b.open = 1;
        b.cash = b.opening_cash = cash;
        b.max_exposure = max_exposure;
        b.max_positions = max_positions;
        b.max_loss = max_loss;
        acct_key_write(a, key ? &kbuf : NULL);                                   /* K3 */
        /* key lock and latch held, open sealed: ENG_FAULT_DIE_IN_KEY for a keyed open */
        rc = acct_commit(s, a, AL, &b, make_id(opening, i), key ? ENG_FAULT_DIE_IN_KEY : 0);
        if (rc == 0)
            *out_id = make_id(opening, i);
        break;
    }
    if (key)
        acct_key_unlock(s);                                                      /* K4 */
    op_end(t, rc);
    return rc;
}

int eng_close_account(eng_seg *s, uint64_t id)
{
    CHECK_SEG(s);
    acct_args x = {0};
    return acct_single(s, id, AC_CLOSE, &x);
}

int eng_deposit(eng_seg *s, uint64_t id, int64_t amount)
{
    CHECK_SEG(s);
    if (!money_ok(amount))
        return ENG_EBADMONEY;
    acct_args x = {.amount = amount};
    return acct_single(s, id, AC_DEPOSIT, &x);
}

int eng_withdraw(eng_seg *s, uint64_t id, int64_t amount)
{
    CHECK_SEG(s);
    if (!money_ok(amount))
        return ENG_EBADMONEY;
    acct_args x = {.amount = amount};
    return acct_single(s, id, AC_WITHDRAW, &x);
}

int eng_halt_account(eng_seg *s, uint64_t id, uint32_t on)
{
    CHECK_SEG(s);
    acct_args x = {.halted = on ? 1 : 0};
    return acct_single(s, id, AC_HALT, &x);
}

int eng_update_account(eng_seg *s, uint64_t id, uint64_t version, int64_t max_exposure,
                       uint32_t max_positions, int64_t max_loss, uint32_t halted,
                       uint32_t attempt)
{
    CHECK_SEG(s);
    if (!money_ok(max_exposure) || !money_ok(max_loss))
        return ENG_EBADMONEY;
    acct_args x = {.max_exposure = max_exposure, .max_loss = max_loss, .version = version,
                   .max_positions = max_positions, .halted = halted ? 1 : 0,
                   .attempt = attempt};
    return acct_single(s, id, AC_UPDATE, &x);
}

static int account_row(eng_seg *s, uint32_t i, eng_account_row *r)
{
    uint64_t key[ENG_KEY_MAX / 8];
    books_view v = {&r->b, 0, &r->key_len, key};
    uint64_t w;
    int rc = seq_read_acquire(s, &s->accounts[i].word, ~0ULL, copy_books, &s->accounts[i], &v, &w);
    if (rc)
        return rc;
    if (r->key_len > ENG_KEY_MAX || !r->b.open)
        r->key_len = 0;
    memcpy(r->key, key, sizeof key);
    r->version = v.version;
    r->latched = aw_token(w) != 0;
    r->index = i;
    r->id = make_id(r->b.opening, i);
    return 0;
}

int eng_read_account(eng_seg *s, uint64_t id, eng_account_row *out)
{
    CHECK_SEG(s);
    eng_account *a;
    int rc = acct_of_id(s, id, &a);
    if (rc)
        return rc;
    if (!out)
        return ENG_EBADARG;
    rc = account_row(s, (uint32_t)(id & ENG_ID_SLOT_MASK), out);
    return rc ? rc : books_check(&out->b, id);
}

int eng_accounts(eng_seg *s, eng_account_row *rows, uint32_t max_rows, uint32_t *out_n)
{
    CHECK_SEG(s);
    if (!out_n || (max_rows && !rows))
        return ENG_EBADARG;
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->max_accounts && n < max_rows; i++) {
        int rc = account_row(s, i, &rows[n]);
        if (rc)
            return rc;
        n += rows[n].b.open != 0;
    }
    *out_n = n;
    return 0;
}

/* recover(): resolve every account latch of a proven-dead holder. */
static void accounts_sweep(eng_seg *s, op_timer t, eng_recover_report *out)
{
    for (uint32_t i = 0; i < s->max_accounts; i++) {
        eng_account *a = &s->accounts[i];
        uint64_t w = load_acquire_u64(&a->word);
        uint32_t holder = aw_token(w);
        if (holder && holder != s->token && token_dead(s, holder)) {
            int how = acct_resolve(s, a, w, t);
            out->accounts_forward += how == 1;
            out->accounts_back += how == 2;
        }
    }
}

/* Holder of L: apply the update to the published context and commit.  A
 * position with an account: out of an open state into a closed one is
 * booked; any other record write first waits out the account's latch. */
static int commit_with_update(eng_seg *s, eng_slot *sl, uint64_t L, const eng_ctx_update *u,
                              op_timer t)
{
    if (load_relaxed_u32(&s->hdr->halted)) {   /* halted while we held the lock (a guard) */
        unlock_unchanged(sl, L);
        return ENG_HALTED;
    }
    uint64_t acct = account_of_locked(s, sl, L);
    if (acct) {
        if (is_closing(s, sw_state(L), 1u << sw_target(L)))
            return commit_booked_close(s, sl, L, u, t);
        int rc = (u && u->mask) ? acct_settle(s, acct, t) : 0;
        if (rc) {
            unlock_unchanged(sl, L);
            return rc;
        }
    }
    if (!u || !u->mask)
        return finish_locked(s, sl, L, NULL);
    eng_ctx_rec c;
    /* we hold the lock: the published copy cannot change under us */
    copy_words_relaxed(&c, copy_of(s, sl, sw_ctx(L)), rec_words(s));
    for (uint32_t i = 0; i < s->n_words; i++)
        if (u->mask & (1u << i))
            c.w[i] = u->w[i];
    return finish_locked(s, sl, L, &c);
}

int eng_transition_ctx(eng_seg *s, uint64_t id, uint32_t trigger, const eng_ctx_update *u)
{
    eng_slot *sl;
    int rc = enter_transition(s, id, trigger, &sl);
    if (rc == 0)
        rc = check_update(s, u);
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_TRANSITION_CTX);
    uint64_t L;
    rc = lock_slot(s, sl, id, trigger, 0, t, &L);
    if (rc == ENG_APPLIED)
        rc = commit_with_update(s, sl, L, u, t);
    op_end(t, rc);
    return rc;
}

/*
 * A guarded transition is one C call: lock (guarded rules allowed), call the
 * guard (a Python callback; it may read the position), then commit or
 * restore the word.  However the guard ends (False, an exception, a signal
 * handler's exception), the lock is released before this returns; a process
 * killed inside the guard is rolled back by takeover (nothing was sealed).
 */
int eng_guard_transition(eng_seg *s, uint64_t id, uint32_t trigger,
                         const eng_ctx_update *u, eng_guard_fn guard, void *user)
{
    eng_slot *sl;
    int rc = enter_transition(s, id, trigger, &sl);
    if (rc == 0)
        rc = guard ? check_update(s, u) : ENG_EBADARG;
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_TRANSITION_CTX);
    uint64_t L;
    rc = lock_slot(s, sl, id, trigger, 1, t, &L);
    if (rc == ENG_APPLIED) {
        int verdict = guard(user, id, onehot_index(sw_state(L)), trigger);
        int gone = seg_error(s);
        if (gone)
            return gone;   /* the guard forked (this is the child: the lock is the
                              parent's) or closed the view: touch nothing */
        if (verdict == 1) {
            rc = commit_with_update(s, sl, L, u, t);
        } else {
            unlock_unchanged(sl, L);
            rc = verdict == 0 ? ENG_REJECTED : ENG_EGUARDFAIL;
        }
    }
    op_end(t, rc);
    return rc;
}

int eng_state(eng_seg *s, uint64_t id)
{
    eng_slot *sl;
    uint64_t w;
    int rc = enter_id(s, id, 0, &sl, &w);
    return rc ? rc : (int)sw_state(w);
}

int eng_state_word(eng_seg *s, uint32_t slot, uint64_t *out_word)
{
    int rc = enter_index(s, slot, out_word != NULL);
    if (rc)
        return rc;
    *out_word = load_acquire_u64(&slot_at(s, slot)->word);
    return 0;
}

int eng_id_of(eng_seg *s, uint32_t slot, uint64_t *out_id)
{
    int rc = enter_index(s, slot, out_id != NULL);
    if (rc)
        return rc;
    eng_slot *sl = slot_at(s, slot);
    uint64_t w = load_acquire_u64(&sl->word);
    if (!sw_state(w))
        return ENG_ENOTOPEN;
    *out_id = make_id(load_relaxed_u32(&sl->opening), slot);
    return 0;
}
