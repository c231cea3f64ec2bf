/*
 * segment.c - the segment itself: fork safety, layout, test faults, format,
 * validate, attach and detach, and the close gate.
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

/* ==== fork ====================================================================== */
/*
 * A child made by fork() inherits every eng_seg of its parent, registry entry
 * and token included.  The child's copy must never act as the parent: each
 * eng_seg records the process's fork count at attach, a pthread_atfork hook
 * bumps the count in every child, and every entry point refuses a view from
 * another fork count with ENG_EFORKED.  eng_detach of such a view forgets it
 * without touching the registry.
 */
static uint32_t fork_epoch;
static pthread_once_t fork_hook_once = PTHREAD_ONCE_INIT;

/*
 * The liveness descriptors of this process's Engines.  A fork child closes
 * its copies at once: the parent's OFD locks then live and die with the
 * parent alone.  (Closing a copy never drops an OFD lock the parent holds.)
 *
 * No window: a descriptor enters the table in the same critical section that
 * opens it (eng_attach_path), and leaves it in the one that closes it, under
 * local_fds_lock, which the atfork prepare hook takes too.  So at every fork
 * the table names exactly the liveness descriptors that exist, wherever
 * another thread is in open, lock, claim, attach or detach: a child never
 * keeps a copy of one.  (A descriptor opened outside, e.g. by a raw caller
 * of eng_attach, enters the table only at attach: before it holds a lock,
 * but not before a fork can copy it; the Engine class never does that.)
 */
#define LOCAL_FD_ATTACHED 0x80000000u   /* an eng_seg owns it (else: opened, not attached) */

static pthread_mutex_t local_fds_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t local_fds[ENG_MAX_LOCAL_ENGINES];   /* (fd + 1) | LOCAL_FD_ATTACHED?; 0 = empty;
                                                        only under local_fds_lock (or in
                                                        the fork child, single-threaded) */

/* Index of fd in the table, or -1.  The caller holds local_fds_lock. */
static int local_fd_find(int fd)
{
    for (int i = 0; i < ENG_MAX_LOCAL_ENGINES; i++)
        if (local_fds[i] && (local_fds[i] & ~LOCAL_FD_ATTACHED) == (uint32_t)fd + 1)
            return i;
    return -1;
}

/* A free index, or -1.  The caller holds local_fds_lock. */
static int local_fd_free(void)
{
    for (int i = 0; i < ENG_MAX_LOCAL_ENGINES; i++)
        if (!local_fds[i])
            return i;
    return -1;
}

static void local_fd_close(int fd);

static void on_fork_prepare(void) { pthread_mutex_lock(&local_fds_lock); }
static void on_fork_parent(void) { pthread_mutex_unlock(&local_fds_lock); }

static void on_fork_child(void)
{
    /* the forking thread took the lock in on_fork_prepare: it is ours */
    store_relaxed_u32(&fork_epoch, load_relaxed_u32(&fork_epoch) + 1);
    for (int i = 0; i < ENG_MAX_LOCAL_ENGINES; i++) {
        uint32_t v = local_fds[i] & ~LOCAL_FD_ATTACHED;
        local_fds[i] = 0;
        if (v)
            close((int)v - 1);
    }
    pthread_mutex_unlock(&local_fds_lock);
}

static void install_fork_hook(void)
{
    pthread_atfork(on_fork_prepare, on_fork_parent, on_fork_child);
}

/* Open a liveness descriptor for the file at path, in the table from birth:
 * 0 and *out_fd, ENG_ETOOMANY (the table is full), or a positive errno
 * (ESTALE: path names another file than dev/ino now). */
static int local_fd_open(const char *path, uint64_t dev, uint64_t ino, int *out_fd)
{
    pthread_once(&fork_hook_once, install_fork_hook);
    pthread_mutex_lock(&local_fds_lock);
    int i = local_fd_free(), fd = -1, rc = 0;
    if (i < 0) {
        rc = ENG_ETOOMANY;
    } else {
        fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
            rc = errno ? errno : EIO;
        else
            local_fds[i] = (uint32_t)fd + 1;   /* before any fork can copy it */
    }
    pthread_mutex_unlock(&local_fds_lock);
    if (rc)
        return rc;
    struct stat st;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_dev != dev || (uint64_t)st.st_ino != ino) {
        local_fd_close(fd);
        return ESTALE;
    }
    *out_fd = fd;
    return 0;
}

/* eng_attach, before the fd holds any lock: mark it attached (adding it if
 * a raw caller opened it).  *added says it was not in the table.  0,
 * ENG_EBADARG (another eng_seg owns it), or ENG_ETOOMANY. */
static int local_fd_attach(int fd, int *added)
{
    int rc = 0;
    pthread_mutex_lock(&local_fds_lock);
    int i = local_fd_find(fd);
    *added = i < 0;
    if (i >= 0 && (local_fds[i] & LOCAL_FD_ATTACHED))
        rc = ENG_EBADARG;
    else if (i < 0 && (i = local_fd_free()) < 0)
        rc = ENG_ETOOMANY;
    else
        local_fds[i] = ((uint32_t)fd + 1) | LOCAL_FD_ATTACHED;
    pthread_mutex_unlock(&local_fds_lock);
    return rc;
}

/* A failed eng_attach: the fd goes back to how the caller gave it. */
static void local_fd_unattach(int fd, int added)
{
    pthread_mutex_lock(&local_fds_lock);
    int i = local_fd_find(fd);
    if (i >= 0)
        local_fds[i] = added ? 0 : (uint32_t)fd + 1;
    pthread_mutex_unlock(&local_fds_lock);
}

/* Out of the table and closed, in one step (eng_detach, a failed attach). */
static void local_fd_close(int fd)
{
    pthread_mutex_lock(&local_fds_lock);
    int i = local_fd_find(fd);
    if (i >= 0)
        local_fds[i] = 0;
    close(fd);
    pthread_mutex_unlock(&local_fds_lock);
}

/* Every exported function taking an eng_seg starts here. */
static inline int seg_error(const eng_seg *s)
{
    if (!s || !s->hdr)
        return ENG_ECLOSED;
    if (__builtin_expect(s->fork_epoch != load_relaxed_u32(&fork_epoch), 0))
        return ENG_EFORKED;
    return 0;
}

#define CHECK_SEG(s) do { int seg_rc_ = seg_error(s); if (seg_rc_) return seg_rc_; } while (0)

/* ==== layout ==================================================================== */

static inline uint64_t align_line(uint64_t x)
{
    return (x + ENG_CACHE_LINE - 1) & ~(uint64_t)(ENG_CACHE_LINE - 1);
}

static inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

typedef struct layout {
    uint64_t registry_off, shards_off, slots_off, keyrecs_off, keyidx_off, stripes_off;
    uint64_t tindex_off, accounts_off, journal_off, durable_off, size;
    uint32_t rec_size, slot_size, key_buckets, tindex_buckets;
} layout;

/* Buckets of the key index: two cells per key a segment can hold, so a
 * bucket is half full on average when every opening has all its keys. */
static inline uint32_t key_buckets_for(uint32_t capacity, uint32_t kpp)
{
    uint64_t cells = 2ULL * capacity * kpp;
    return (uint32_t)((cells + ENG_KEY_BUCKET - 1) / ENG_KEY_BUCKET);
}

/* Token index buckets: a power of two >= capacity (at least ENG_TB_MIN_BUCKETS). */
static inline uint32_t tindex_buckets_for(uint32_t capacity)
{
    uint32_t b = ENG_TB_MIN_BUCKETS;
    while (b < capacity)
        b <<= 1;
    return b;
}

static layout compute_layout(uint32_t capacity, uint32_t n_words, uint32_t kpp,
                             uint32_t max_accounts, uint32_t journal_records)
{
    layout l;
    l.rec_size = (uint32_t)align_up(8 * (ENG_REC_META_WORDS + n_words), ENG_REC_ALIGN);
    l.slot_size = (uint32_t)align_line(sizeof(eng_slot) + 2ULL * l.rec_size + ENG_SLOT_PEAKS);
    l.key_buckets = key_buckets_for(capacity, kpp);
    l.registry_off = align_line(sizeof(eng_header));
    l.shards_off = align_line(l.registry_off + sizeof(eng_proc) * ENG_MAX_PROCS);
    l.slots_off = align_line(l.shards_off + sizeof(eng_shard) * (ENG_MAX_PROCS + 1));
    l.keyrecs_off = l.slots_off + (uint64_t)l.slot_size * capacity;
    l.keyidx_off = l.keyrecs_off + sizeof(eng_keyrec) * (uint64_t)capacity * kpp;
    l.stripes_off = l.keyidx_off + (uint64_t)ENG_CACHE_LINE * l.key_buckets;
    l.tindex_buckets = tindex_buckets_for(capacity);
    l.tindex_off = align_line(l.stripes_off + sizeof(uint32_t) * (uint64_t)l.key_buckets);
    l.accounts_off = align_line(l.tindex_off + sizeof(uint64_t) * (uint64_t)l.tindex_buckets);
    l.size = l.accounts_off + sizeof(eng_account) * (uint64_t)max_accounts;
    l.journal_off = 0;
    l.durable_off = 0;
    if (journal_records) {
        l.journal_off = align_line(l.size);
        l.size = l.journal_off + sizeof(eng_journal) + sizeof(eng_jrec) * (uint64_t)journal_records;
        l.durable_off = align_line(l.size);   /* the file writer's area (native/durable.c) */
        l.size = l.durable_off + sizeof(eng_durable);
    }
    return l;
}

static inline int journal_records_ok(uint32_t n)
{
    return n == 0 || (n >= ENG_JOURNAL_MIN_RECORDS && n <= ENG_JOURNAL_MAX_RECORDS &&
                      (n & (n - 1)) == 0);
}

uint64_t eng_segment_size_journal(uint32_t capacity, uint32_t n_words,
                                  uint32_t keys_per_position, uint32_t max_accounts,
                                  uint32_t journal_records)
{
    if (capacity == 0 || capacity > ENG_MAX_CAPACITY || n_words > ENG_MAX_FIELD_WORDS ||
        keys_per_position > ENG_MAX_KEYS_PER_POSITION || max_accounts > ENG_MAX_ACCOUNTS ||
        !journal_records_ok(journal_records))
        return 0;
    return compute_layout(capacity, n_words, keys_per_position, max_accounts,
                          journal_records).size;
}

uint64_t eng_segment_size(uint32_t capacity, uint32_t n_words, uint32_t keys_per_position,
                          uint32_t max_accounts)
{
    return eng_segment_size_journal(capacity, n_words, keys_per_position, max_accounts, 0);
}

int eng_noop(void) { return 0; }

const char *eng_strerror(int code)
{
    switch (code) {
    case ENG_APPLIED: return "applied";
    case ENG_INVALID: return "no rule for this trigger from this state";
    case ENG_CONFLICT: return "retries spent against other writers";
    case ENG_REJECTED: return "rejected by the guard";
    case ENG_HALTED: return "emergency stop is on";
    case ENG_EBADSLOT: return "id names a slot out of range";
    case ENG_ENOTOPEN: return "id was never issued by open";
    case ENG_EBADTRIGGER: return "trigger out of range";
    case ENG_EBADPRICE: return "price is not finite and > 0";
    case ENG_EBADARG: return "argument out of range";
    case ENG_EFULL: return "no free slot";
    case ENG_ETIMEDOUT: return "timed out";
    case ENG_EINTR: return "interrupted by a signal";
    case ENG_EBUSY: return "a live writer held the record past the bound";
    case ENG_EMAGIC: return "not an engine segment";
    case ENG_ELAYOUT: return "another layout version";
    case ENG_ESIZE: return "segment sizes disagree with its header";
    case ENG_ENOTREADY: return "segment not formatted yet";
    case ENG_ESPEC: return "another machine spec";
    case ENG_ENOPROC: return "process registry full";
    case ENG_ESTALE: return "id's opening was released";
    case ENG_EGUARDED: return "rule has a guard";
    case ENG_ECORRUPT: return "segment header is corrupt";
    case ENG_ECLOSED: return "engine is closed";
    case ENG_EFORKED: return "engine was inherited through fork";
    case ENG_ERECOVERING: return "another live process is recovering";
    case ENG_EGUARDFAIL: return "the guard raised";
    case ENG_ETOOMANY: return "too many Engines attached in this process";
    case ENG_EKEYEXISTS: return "the key names another open position";
    case ENG_EKEYLIMIT: return "the position has keys_per_position keys";
    case ENG_EKEYFULL: return "the key index has no room for this key";
    case ENG_EBADFIELD: return "field value out of range, or set at open only";
    case ENG_EBADKEY: return "key length out of range";
    case ENG_ERISK_HALTED: return "the account is halted";
    case ENG_ERISK_EXPOSURE: return "the opening would pass the account's max_exposure";
    case ENG_ERISK_COUNT: return "the opening would pass the account's max_positions";
    case ENG_ERISK_CASH: return "not enough cash beyond what is reserved";
    case ENG_EBADACCOUNT: return "account id out of range or never issued";
    case ENG_ESTALEACCOUNT: return "account id's opening was closed";
    case ENG_EBADMONEY: return "money negative or beyond the fixed-point range";
    case ENG_EACCTFULL: return "no free account record";
    case ENG_EACCTBUSY: return "the account has open positions";
    case ENG_EVERSION: return "the account's version moved";
    case ENG_ELAPPED: return "the journal's records after that seq were overwritten";
    case ENG_ENOJOURNAL: return "the engine has no journal";
    case ENG_EJOURNALFULL: return "the journal's file writer is behind: the ring is full";
    case ENG_EDURABLE: return "the journal's file writer failed: changes are refused";
    default: return "unknown code";
    }
}

/* ==== test faults ================================================================ */
/*
 * The fault words of the header (fault_flags, test_pause_ns) make C kill
 * itself or sleep holding a lock: test hooks.  A process honours them only
 * while its own switch is on -- ENGINE_TEST_FAULTS=1 in its environment when
 * it first asks, or eng_test_faults(1) -- and nothing in a segment can turn
 * that switch on.  With it off, attach refuses a segment whose fault words
 * are set (ENG_ECORRUPT naming the word), eng_set_faults refuses to set them,
 * and every fault site ignores them (they are read only when set, so the
 * check costs nothing on a clean segment).  A build with ENG_NO_TEST_FAULTS
 * (ENGINE_RELEASE=1 when building) has the switch off for good.
 */
#define FAULT_FLAGS_KNOWN (ENG_FAULT_SKIP_GEN | ENG_FAULT_BLIND_STORE | ENG_FAULT_DIE_AFTER_CAS | \
                           ENG_FAULT_DIE_AFTER_LOCK | ENG_FAULT_DIE_IN_KEY |                    \
                           ENG_FAULT_DIE_IN_BOOKING | ENG_FAULT_DIE_IN_TINDEX_ADD |             \
                           ENG_FAULT_DIE_IN_TINDEX_DEL | ENG_FAULT_TEAR_PRICE |                \
                           ENG_FAULT_DIE_AFTER_JLATCH | ENG_FAULT_DIE_IN_JFILL |                \
                           ENG_FAULT_DIE_AFTER_JFILL | ENG_FAULT_DIE_BEFORE_JPUBLISH |            \
                           ENG_FAULT_DIE_IN_EXIT | ENG_FAULT_STOP_NOT_KILL |                  \
                           ENG_FAULT_DIE_IN_RIDER | ENG_FAULT_DIE_AFTER_RIDER)

static int test_faults_on = -1;   /* -1 until the first question reads the environment */

int eng_test_faults(int on)
{
#ifdef ENG_NO_TEST_FAULTS
    (void)on;
    return 0;   /* a release build (ENGINE_RELEASE=1 at build time): never on */
#endif
    if (on >= 0) {
        __atomic_store_n(&test_faults_on, on ? 1 : 0, __ATOMIC_RELAXED);
        return on ? 1 : 0;
    }
    int m = __atomic_load_n(&test_faults_on, __ATOMIC_RELAXED);
    if (m < 0) {
        const char *env = getenv("ENGINE_TEST_FAULTS");
        m = env && strcmp(env, "1") == 0;
        __atomic_store_n(&test_faults_on, m, __ATOMIC_RELAXED);
    }
    return m;
}

static inline int faults_allowed(void) { return eng_test_faults(-1) == 1; }

/* The fault words of header h: 0, or ENG_ECORRUPT naming the first that is
 * set while this process does not honour faults, or out of range. */
static int faults_check(const eng_header *h, const char **what, uint64_t *value)
{
    uint32_t flags = load_relaxed_u32((uint32_t *)&h->fault_flags);
    uint64_t pause = load_relaxed_u64((uint64_t *)&h->test_pause_ns);
    int allowed = (flags || pause) && faults_allowed();
    if (flags && (!allowed || (flags & ~(uint32_t)FAULT_FLAGS_KNOWN))) {
        *what = "fault_flags";
        *value = flags;
        return ENG_ECORRUPT;
    }
    if (pause && (!allowed || pause > ENG_TEST_PAUSE_MAX_NS)) {
        *what = "test_pause_ns";
        *value = pause;
        return ENG_ECORRUPT;
    }
    return 0;
}

/* ==== format, validate, attach ================================================== */

/* The type a role's word must have (0: any integer type listed in the check). */
static int rec_layout_ok(const eng_rec_layout *r)
{
    static const uint8_t role_type[ENG_ROLE_COUNT] = {
        [ENG_ROLE_ENTRY_PRICE] = ENG_FT_F8, [ENG_ROLE_AMOUNT] = ENG_FT_F8,
        [ENG_ROLE_SIDE] = ENG_FT_I4, [ENG_ROLE_TOKEN] = ENG_FT_I8,
        [ENG_ROLE_OPENED_NS] = ENG_FT_I8, [ENG_ROLE_ACCOUNT] = ENG_FT_I8,
        [ENG_ROLE_STOP_LOSS] = ENG_FT_F8, [ENG_ROLE_TAKE_PROFIT] = ENG_FT_F8,
        [ENG_ROLE_TRAILING] = ENG_FT_F8, [ENG_ROLE_EXIT_REASON] = ENG_FT_I4,
        [ENG_ROLE_EXIT_PRICE] = ENG_FT_F8};
    if (r->n_words > ENG_MAX_FIELD_WORDS || r->keys_per_position > ENG_MAX_KEYS_PER_POSITION)
        return 0;
    for (uint32_t i = 0; i < ENG_MAX_FIELD_WORDS; i++) {
        uint8_t ty = r->word_type[i];
        if (i < r->n_words ? (ty < ENG_FT_F8 || ty > ENG_FT_BYTES) : ty != 0)
            return 0;
    }
    for (uint32_t k = 0; k < ENG_ROLE_COUNT; k++) {
        uint8_t wi = r->roles[k];
        if (wi == ENG_ROLE_NONE)
            continue;
        if (wi >= r->n_words || !role_type[k])
            return 0;
        uint8_t ty = r->word_type[wi];
        if (ty != role_type[k] &&
            !((k == ENG_ROLE_SIDE || k == ENG_ROLE_EXIT_REASON) && ty == ENG_FT_I8))
            return 0;
    }
    /* exits fire from the price (PnL roles) and write the firing price */
    if (r->exit_state != ENG_EXITS_NONE &&
        (r->roles[ENG_ROLE_SIDE] == ENG_ROLE_NONE || r->roles[ENG_ROLE_ENTRY_PRICE] == ENG_ROLE_NONE ||
         r->roles[ENG_ROLE_AMOUNT] == ENG_ROLE_NONE || r->roles[ENG_ROLE_EXIT_PRICE] == ENG_ROLE_NONE))
        return 0;
    /* an account reserves |entry x amount|: only with the PnL roles */
    if (r->roles[ENG_ROLE_ACCOUNT] != ENG_ROLE_NONE &&
        (r->roles[ENG_ROLE_ENTRY_PRICE] == ENG_ROLE_NONE ||
         r->roles[ENG_ROLE_AMOUNT] == ENG_ROLE_NONE || r->roles[ENG_ROLE_SIDE] == ENG_ROLE_NONE))
        return 0;
    return 1;
}

/* The machine's words (also what eng_format was given): NULL if they are
 * well formed, else the name of the first bad word (*value: its value; for
 * "table", the index of the bad entry).  With exits (rec->exit_state), the
 * armed state's rule for the exit trigger exists, has no guard and leads to
 * another state that is not closed.  (A rule may leave a closed state: an
 * opening on an account is refused on such a machine instead, see reopens.) */
static const char *table_problem(const uint8_t *table, uint32_t n_states, uint32_t n_triggers,
                                 uint32_t initial_index, uint32_t closed_mask,
                                 const eng_rec_layout *rec, uint64_t *value)
{
    uint64_t ignored;
    if (!value)
        value = &ignored;
    if (n_states == 0 || n_states > ENG_MAX_STATES)
        return *value = n_states, "n_states";
    if (n_triggers == 0 || n_triggers > ENG_MAX_TRIGGERS)
        return *value = n_triggers, "n_triggers";
    if (initial_index >= n_states)
        return *value = initial_index, "initial_index";
    if ((closed_mask >> n_states) != 0)
        return *value = closed_mask, "closed_mask";
    for (uint32_t i = 0; i < ENG_MAX_STATES * ENG_MAX_TRIGGERS; i++) {
        uint32_t st = i / ENG_MAX_TRIGGERS, tr = i % ENG_MAX_TRIGGERS;
        uint32_t tgt = table[i] & ENG_RULE_TARGET_MASK;
        if ((table[i] & ~(ENG_RULE_TARGET_MASK | ENG_RULE_GUARDED)) ||
            (tgt && (st >= n_states || tr >= n_triggers || tgt > n_states)))
            return *value = i, "table";
    }
    if (rec->exit_state != ENG_EXITS_NONE) {
        uint32_t st = rec->exit_state, tr = rec->exit_trigger;
        uint8_t e = st < n_states && tr < n_triggers ? table[st * ENG_MAX_TRIGGERS + tr] : 0;
        uint32_t tgt = (e & ENG_RULE_TARGET_MASK);
        if (!tgt || (e & ENG_RULE_GUARDED) || tgt - 1 == st || ((closed_mask >> (tgt - 1)) & 1))
            return *value = st * ENG_MAX_TRIGGERS + tr, "exit_state";
    }
    return NULL;
}

/* 1 if a rule leaves a closed state, or the initial state is closed: a
 * closing may then happen more than once, so nothing opens on an account. */
static int table_reopens(const uint8_t *table, uint32_t n_states, uint32_t initial_index,
                         uint32_t closed_mask)
{
    if ((closed_mask >> initial_index) & 1)
        return 1;
    for (uint32_t st = 0; st < n_states; st++) {
        if (!((closed_mask >> st) & 1))
            continue;
        for (uint32_t tr = 0; tr < ENG_MAX_TRIGGERS; tr++) {
            uint32_t tgt = table[st * ENG_MAX_TRIGGERS + tr] & ENG_RULE_TARGET_MASK;
            if (tgt && !((closed_mask >> (tgt - 1)) & 1))
                return 1;
        }
    }
    return 0;
}

int eng_format(void *base, uint64_t size, uint32_t capacity,
               const uint8_t *table, uint32_t n_states, uint32_t n_triggers,
               uint32_t initial_index, uint32_t closed_mask,
               uint64_t fingerprint, uint32_t creator_pid, const eng_rec_layout *rec,
               uint32_t max_accounts, uint32_t journal_records, uint32_t journal_flags)
{
    if (!base || !table || !rec || capacity == 0 || capacity > ENG_MAX_CAPACITY ||
        !rec_layout_ok(rec) || max_accounts > ENG_MAX_ACCOUNTS ||
        !journal_records_ok(journal_records) ||
        journal_flags & ~(uint32_t)(ENG_JOURNAL_PRICES | ENG_JOURNAL_DURABLE) ||
        (journal_flags && !journal_records))
        return ENG_EBADARG;
    layout l = compute_layout(capacity, rec->n_words, rec->keys_per_position, max_accounts,
                              journal_records);
    if (size < l.size)
        return ENG_ESIZE;
    const char *bad = table_problem(table, n_states, n_triggers, initial_index, closed_mask,
                                    rec, NULL);
    if (bad)
        return ENG_EBADARG;
    /* A fresh segment is zero-filled; the header goes in field by field and
     * ready last. */
    eng_header *h = base;
    memcpy(h->table, table, sizeof h->table);
    h->layout_version = ENG_LAYOUT_VERSION;
    h->segment_size = l.size;
    h->capacity = capacity;
    h->slot_size = l.slot_size;
    h->rec = *rec;
    h->rec_size = l.rec_size;
    h->keyrecs_off = l.keyrecs_off;
    h->keyidx_off = l.keyidx_off;
    h->stripes_off = l.stripes_off;
    h->key_buckets = l.key_buckets;
    h->tindex_off = l.tindex_off;
    h->tindex_buckets = l.tindex_buckets;
    h->accounts_off = l.accounts_off;
    h->max_accounts = max_accounts;
    h->journal_off = l.journal_off;
    h->journal_records = journal_records;
    h->journal_flags = journal_flags;
    h->durable_off = l.durable_off;
    if (getrandom(&h->key_seed, sizeof h->key_seed, GRND_NONBLOCK) != sizeof h->key_seed)
        h->key_seed = (uint64_t)now_ns(CLOCK_MONOTONIC) ^ ((uint64_t)creator_pid << 32);
    h->fingerprint = fingerprint;
    h->n_states = n_states;
    h->n_triggers = n_triggers;
    h->initial_index = initial_index;
    h->closed_mask = closed_mask;
    h->creator_pid = creator_pid;
    h->created_ns = (uint64_t)now_ns(CLOCK_REALTIME);
    h->registry_off = l.registry_off;
    h->shards_off = l.shards_off;
    h->slots_off = l.slots_off;
    h->metrics_on = 1;
    h->sample_mask = ENG_DEFAULT_SAMPLE_MASK;
    h->magic = ENG_MAGIC;
    store_release_u32(&h->ready, 1);   /* pairs with the acquire in eng_validate */
    return 0;
}

/* Every header word a crafted segment could set, checked before any is
 * used: 0, or the status and (if what) the name and value of the first bad
 * word.  Words not checked here are free of meaning to attach and use:
 * creator_pid, created_ns and the pads are for people; key_seed is any
 * seed; alloc_hint and account_hint are taken modulo their ranges;
 * recovering is a token, judged dead or alive as any lock's owner. */
static int header_check(const void *base, uint64_t size, uint64_t fingerprint,
                        const char **what, uint64_t *value)
{
    const char *ignored_what;
    uint64_t ignored_value;
    if (!what)
        what = &ignored_what;
    if (!value)
        value = &ignored_value;
#define BAD(code, field, v) do { *what = (field); *value = (uint64_t)(v); return (code); } while (0)
    if (!base || size < sizeof(eng_header))
        BAD(size < sizeof(uint64_t) || !base ? ENG_EMAGIC : ENG_ESIZE, "segment_size", size);
    const eng_header *h = base;
    if (h->magic != ENG_MAGIC)
        BAD(ENG_EMAGIC, "magic", h->magic);
    if (!load_acquire_u32((uint32_t *)&h->ready))   /* pairs with eng_format */
        BAD(ENG_ENOTREADY, "ready", 0);
    if (h->layout_version != ENG_LAYOUT_VERSION)
        BAD(ENG_ELAYOUT, "layout_version", h->layout_version);
    if (h->capacity == 0 || h->capacity > ENG_MAX_CAPACITY)
        BAD(ENG_ECORRUPT, "capacity", h->capacity);
    if (!rec_layout_ok(&h->rec))
        BAD(ENG_ECORRUPT, "rec", h->rec.n_words);
    if (h->max_accounts > ENG_MAX_ACCOUNTS)
        BAD(ENG_ECORRUPT, "max_accounts", h->max_accounts);
    if (!journal_records_ok(h->journal_records))
        BAD(ENG_ECORRUPT, "journal_records", h->journal_records);
    if (h->journal_flags & ~(uint32_t)(ENG_JOURNAL_PRICES | ENG_JOURNAL_DURABLE) ||
        (h->journal_flags && !h->journal_records))
        BAD(ENG_ECORRUPT, "journal_flags", h->journal_flags);
    layout l = compute_layout(h->capacity, h->rec.n_words, h->rec.keys_per_position,
                              h->max_accounts, h->journal_records);
    if (h->slot_size != l.slot_size)
        BAD(ENG_ECORRUPT, "slot_size", h->slot_size);
    if (h->rec_size != l.rec_size)
        BAD(ENG_ECORRUPT, "rec_size", h->rec_size);
    if (h->key_buckets != l.key_buckets)
        BAD(ENG_ECORRUPT, "key_buckets", h->key_buckets);
    if (h->tindex_buckets != l.tindex_buckets)
        BAD(ENG_ECORRUPT, "tindex_buckets", h->tindex_buckets);
    if (h->segment_size != l.size || size < l.size)
        BAD(ENG_ESIZE, "segment_size", h->segment_size);
    static const struct { const char *name; size_t hdr_off, l_off; } offs[] = {
        {"registry_off", offsetof(eng_header, registry_off), offsetof(layout, registry_off)},
        {"shards_off", offsetof(eng_header, shards_off), offsetof(layout, shards_off)},
        {"slots_off", offsetof(eng_header, slots_off), offsetof(layout, slots_off)},
        {"keyrecs_off", offsetof(eng_header, keyrecs_off), offsetof(layout, keyrecs_off)},
        {"keyidx_off", offsetof(eng_header, keyidx_off), offsetof(layout, keyidx_off)},
        {"stripes_off", offsetof(eng_header, stripes_off), offsetof(layout, stripes_off)},
        {"tindex_off", offsetof(eng_header, tindex_off), offsetof(layout, tindex_off)},
        {"accounts_off", offsetof(eng_header, accounts_off), offsetof(layout, accounts_off)},
        {"journal_off", offsetof(eng_header, journal_off), offsetof(layout, journal_off)},
        {"durable_off", offsetof(eng_header, durable_off), offsetof(layout, durable_off)}};
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        uint64_t got, want;
        memcpy(&got, (const uint8_t *)h + offs[i].hdr_off, sizeof got);
        memcpy(&want, (const uint8_t *)&l + offs[i].l_off, sizeof want);
        if (got != want)
            BAD(ENG_ESIZE, offs[i].name, got);
    }
    uint64_t v;
    const char *bad = table_problem(h->table, h->n_states, h->n_triggers, h->initial_index,
                                    h->closed_mask, &h->rec, &v);
    if (bad)
        BAD(ENG_ECORRUPT, bad, v);
    /* the controls: their C setters store only these values */
    uint32_t halted = load_relaxed_u32((uint32_t *)&h->halted);
    uint32_t metrics_on = load_relaxed_u32((uint32_t *)&h->metrics_on);
    uint32_t mask = load_relaxed_u32((uint32_t *)&h->sample_mask);
    if (halted > 1)
        BAD(ENG_ECORRUPT, "halted", halted);
    if (metrics_on > 1)
        BAD(ENG_ECORRUPT, "metrics_on", metrics_on);
    if (mask & (mask + 1))
        BAD(ENG_ECORRUPT, "sample_mask", mask);
    int rc = faults_check(h, what, value);
    if (rc)
        return rc;
    if (fingerprint && h->fingerprint != fingerprint)
        BAD(ENG_ESPEC, "fingerprint", h->fingerprint);
#undef BAD
    return 0;
}

int eng_validate(const void *base, uint64_t size, uint64_t fingerprint)
{
    return header_check(base, size, fingerprint, NULL, NULL);
}

int eng_validate_detail(const void *base, uint64_t size, uint64_t fingerprint,
                        const char **out_field, uint64_t *out_value)
{
    return header_check(base, size, fingerprint, out_field, out_value);
}

/* The views of a segment at base whose header (validated) is hc, the live
 * header at `live`: everything of s but its process-local part. */
static void seg_view(eng_seg *s, void *base, uint64_t size, eng_header *live,
                     const eng_header *hc)
{
    memset(s, 0, sizeof *s);
    s->base = base;
    s->size = size;
    s->hdr = live;   /* the live header: its controls (halted, metrics, ...) */
    s->registry = (eng_proc *)((uint8_t *)base + hc->registry_off);
    s->shards = (eng_shard *)((uint8_t *)base + hc->shards_off);
    s->slots = (uint8_t *)base + hc->slots_off;
    s->keyrecs = (eng_keyrec *)((uint8_t *)base + hc->keyrecs_off);
    s->keyidx = (uint64_t *)((uint8_t *)base + hc->keyidx_off);
    s->stripes = (uint32_t *)((uint8_t *)base + hc->stripes_off);
    s->tindex = (uint64_t *)((uint8_t *)base + hc->tindex_off);
    s->tindex_buckets = hc->tindex_buckets;
    s->accounts = (eng_account *)((uint8_t *)base + hc->accounts_off);
    s->max_accounts = hc->max_accounts;
    if (hc->journal_records) {
        s->journal = (eng_journal *)((uint8_t *)base + hc->journal_off);
        s->jring = (eng_jrec *)((uint8_t *)s->journal + sizeof(eng_journal));
        s->jrecords = hc->journal_records;
        s->jprices = (hc->journal_flags & ENG_JOURNAL_PRICES) != 0;
        if (hc->journal_flags & ENG_JOURNAL_DURABLE)
            s->durable = (eng_durable *)((uint8_t *)base + hc->durable_off);
    }
    s->slot_size = hc->slot_size;
    s->rec_size = hc->rec_size;
    s->n_words = hc->rec.n_words;
    s->kpp = hc->rec.keys_per_position;
    s->key_buckets = hc->key_buckets;
    s->key_seed = hc->key_seed;
    memcpy(s->roles, hc->rec.roles, sizeof s->roles);
    s->acct_role = s->roles[ENG_ROLE_ACCOUNT];
    s->pnl = s->roles[ENG_ROLE_ENTRY_PRICE] != ENG_ROLE_NONE &&
             s->roles[ENG_ROLE_AMOUNT] != ENG_ROLE_NONE &&
             s->roles[ENG_ROLE_SIDE] != ENG_ROLE_NONE;
    s->exit_armed = hc->rec.exit_state == ENG_EXITS_NONE ? 0 : 1u << hc->rec.exit_state;
    s->exit_trigger = hc->rec.exit_trigger;
    s->reopens = (uint32_t)table_reopens(hc->table, hc->n_states, hc->initial_index,
                                         hc->closed_mask);
    s->capacity = hc->capacity;
    s->n_triggers = hc->n_triggers;
}

/*
 * Registry protocol.  Claim: take entry i's liveness lock (F_OFD_SETLK on its
 * first byte), then CAS pid -> our pid (CLAIMED), bump the incarnation (never
 * 0) with release, write start time, clear the shard, state ACTIVE with
 * release.  The Engine's token is (incarnation << 7) | i.  An entry whose
 * lock we get while its pid is set belongs to a process that is gone: when
 * no entry is free, attach takes such an entry over (its shard is folded
 * into the retired shard first; its old token now reads as dead).  Free:
 * fold the shard, start time 0, FREE, pid 0 with release, then drop the lock.
 */
static void retire_shard(eng_seg *s, eng_shard *src);
static void sweep_dead(eng_seg *s, eng_recover_report *out);
static uint32_t keys_sweep(eng_seg *s);
static uint32_t tindex_release_dead(eng_seg *s);

static int claim_entry(eng_seg *s, uint32_t i, uint32_t pid, uint64_t start, int take_dead)
{
    eng_proc *e = &s->registry[i];
    uint32_t old = load_relaxed_u32(&e->pid);
    if ((old != 0) != take_dead)
        return 0;
    off_t off = entry_lock_offset(s, i);
    if (ofd_setlk(s->fd, off, F_WRLCK) != 0)
        return 0;                          /* a live Engine (or a recoverer) has it */
    if (!cas_acq_rel_u32(&e->pid, &old, pid)) {
        ofd_setlk(s->fd, off, F_UNLCK);
        return 0;
    }
    store_relaxed_u32(&e->state, ENG_PROC_CLAIMED);
    if (take_dead) {
        /* resolve what the gone owner still holds before its entry gets a
         * new incarnation: a wrapped incarnation must never meet its locks */
        eng_recover_report ignored;
        memset(&ignored, 0, sizeof ignored);
        sweep_dead(s, &ignored);
        keys_sweep(s);   /* its stripe locks and key records, too */
        tindex_release_dead(s);   /* and its bucket locks (see the token index) */
        uint32_t gone = (load_relaxed_u32(&e->incarnation) << ENG_TOKEN_ENTRY_BITS) | i;
        cas_acq_rel_u32(&s->hdr->recovering, &gone, 0);
        retire_shard(s, &s->shards[i]);
    }
    uint32_t inc = (load_relaxed_u32(&e->incarnation) + 1) & ENG_TOKEN_INC_MASK;
    if (inc == 0)
        inc = 1;
    store_release_u32(&e->incarnation, inc);   /* pairs with token_dead */
    store_relaxed_u64(&e->start_time, start);
    store_relaxed_u64(&e->attached_ns, (uint64_t)now_ns(CLOCK_REALTIME));
    /* a fresh shard: the previous owner's counts are in the retired shard */
    memset(&s->shards[i], 0, sizeof(eng_shard));
    fence_release();
    store_release_u32(&e->state, ENG_PROC_ACTIVE);
    s->proc_index = i;
    s->token = (inc << ENG_TOKEN_ENTRY_BITS) | i;
    s->me = &s->shards[i];
    return 1;
}

int eng_attach(eng_seg *s, void *base, uint64_t size, uint64_t fingerprint, int fd)
{
    if (!s || fd < 0)
        return ENG_EBADARG;
    if (!base || size < sizeof(eng_header))
        return eng_validate(base, size, fingerprint);   /* its code for these */
    /* Check a private copy of the header and place the views by that copy
     * alone: another process writing the segment cannot change a word
     * between its check and its use (a crafted offset or capacity read
     * twice would place a view outside the mapping).  ready is read first,
     * with acquire (pairs with eng_format), and the copy taken after it. */
    eng_header *h = base;
    static __thread eng_header hc;   /* 8 KiB: off the stack */
    uint32_t ready = load_acquire_u32(&h->ready);
    memcpy(&hc, base, sizeof hc);
    hc.ready = ready;
    int rc = eng_validate(&hc, size, fingerprint);
    if (rc)
        return rc;
    pthread_once(&fork_hook_once, install_fork_hook);
    seg_view(s, base, size, h, &hc);
    s->fd = fd;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        memset(s, 0, sizeof *s);
        return ENG_EBADARG;
    }
    s->fd_dev = (uint64_t)st.st_dev;
    s->fd_ino = (uint64_t)st.st_ino;
    s->pid = (uint32_t)getpid();
    s->fork_epoch = load_relaxed_u32(&fork_epoch);
    int added;
    rc = local_fd_attach(fd, &added);   /* before the fd holds any lock */
    if (rc) {
        memset(s, 0, sizeof *s);
        return rc;
    }
    uint64_t start = eng_proc_start_time(s->pid);
    for (int take_dead = 0; take_dead < 2; take_dead++)
        for (uint32_t i = 0; i < ENG_MAX_PROCS; i++)
            if (claim_entry(s, i, s->pid, start, take_dead))
                return 0;
    local_fd_unattach(fd, added);
    memset(s, 0, sizeof *s);
    return ENG_ENOPROC;
}

/* eng_attach with a liveness descriptor it opens itself on path (the file
 * with dev/ino, the one mapped at base): the descriptor is in the fork
 * table from birth and never exists outside this call unless attached.  0,
 * a negative code, or a positive errno when path cannot be opened (ESTALE:
 * it names another file now). */
int eng_attach_path(eng_seg *s, void *base, uint64_t size, uint64_t fingerprint,
                    const char *path, uint64_t dev, uint64_t ino)
{
    if (!s || !path)
        return ENG_EBADARG;
    int rc = eng_validate(base, size, fingerprint);   /* before any descriptor */
    if (rc)
        return rc;
    int fd;
    rc = local_fd_open(path, dev, ino, &fd);
    if (rc)
        return rc;
    rc = eng_attach(s, base, size, fingerprint, fd);
    if (rc)
        local_fd_close(fd);
    return rc;
}

/* Add one shard's counts to the retired shard (shared by every process that
 * retires a shard, hence RMW atomics) and clear it. */
static void retire_shard(eng_seg *s, eng_shard *src)
{
    eng_shard *dst = &s->shards[ENG_MAX_PROCS];
    uint64_t *d = (uint64_t *)dst, *p = (uint64_t *)src;
    size_t n = sizeof(eng_shard) / sizeof(uint64_t);
    for (size_t i = 0; i < n; i++) {
        uint64_t v = load_relaxed_u64(&p[i]);
        size_t in_op = i % (sizeof(eng_op_metrics) / sizeof(uint64_t));
        if (in_op == offsetof(eng_op_metrics, max_ns) / sizeof(uint64_t)) {
            uint64_t cur = load_relaxed_u64(&d[i]);
            while (v > cur && !cas_relaxed_u64(&d[i], &cur, v))
                ;
        } else if (v) {
            fetch_add_relaxed_u64(&d[i], v);
        }
        store_relaxed_u64(&p[i], 0);
    }
}

/* Free entry i; the caller holds its liveness lock (its own, or a dead
 * owner's that recover took). */
static void release_entry(eng_seg *s, uint32_t i)
{
    eng_proc *e = &s->registry[i];
    retire_shard(s, &s->shards[i]);
    store_relaxed_u64(&e->start_time, 0);
    store_relaxed_u32(&e->state, ENG_PROC_FREE);
    store_release_u32(&e->pid, 0);   /* entry free only after its shard is folded */
    ofd_setlk(s->fd, entry_lock_offset(s, i), F_UNLCK);
}

void eng_detach(eng_seg *s)
{
    if (!s)
        return;
    /* a view inherited through fork() is forgotten, never released: the
     * entry is the parent's, and the fork hook closed our copy of its fd */
    if (s->hdr && s->me && s->fork_epoch == load_relaxed_u32(&fork_epoch)) {
        release_entry(s, s->proc_index);
        local_fd_close(s->fd);
    }
    memset(s, 0, sizeof *s);
}

int eng_check(eng_seg *s)
{
    CHECK_SEG(s);
    return 0;
}

/* ==== the close gate: close() against calls in flight in other threads ========== */
/*
 * An eng_seg belongs to one thread.  But a binding that lets other threads
 * run while a long call is in C (Python: the calls cffi runs with the GIL
 * released) lets a second thread detach and unmap the segment under that
 * call: a crash.  The gate makes close wait instead.  Each such call enters
 * before it touches the segment and leaves after; close shuts the gate, then
 * waits until no call is in, then detaches:
 *
 *   call (any thread):                           close:
 *     E1 gate_calls += 1       (seq_cst)           C1 gate_shut = 1 (seq_cst)
 *     E2 gate_shut? leave, ENG_ECLOSED (seq_cst)   C2 gate_calls == 0? (seq_cst)
 *        ... the call ...                             else wait, look again
 *     E3 gate_calls -= 1       (release)           C3 detach, unmap
 *
 * E1-E2 against C1-C2 (each side stores, then loads the other's word; all
 * seq_cst): a call that C2 did not count saw the gate shut at E2 and never
 * touched the segment.  E3's release pairs with C2 (an acquire too): the call's
 * last access is before the unmap.  eng_wait_change looks at gate_shut at
 * every slice and returns ENG_ECLOSED, so a wait in flight leaves within
 * ENG_WAIT_SLICE_NS of C1.  The binding bounds C2 (ENG_CLOSE_WAIT_NS) and
 * opens the gate again if it gives up, nothing closed.
 *
 * Does not guarantee: anything for calls that do not enter (the binding's
 * calls that keep the GIL cannot overlap a close that holds it), nor for
 * an eng_seg inherited through fork() (its calls say ENG_EFORKED; the
 * threads counted in it were not copied, so shutting reports none).
 */
int eng_gate_enter(eng_seg *s)
{
    if (!s)
        return ENG_ECLOSED;
    fetch_add_seq_cst_u32(&s->gate_calls, 1);          /* E1 */
    if (load_seq_cst_u32(&s->gate_shut)) {             /* E2, against C1 */
        fetch_sub_release_u32(&s->gate_calls, 1);
        return ENG_ECLOSED;
    }
    return 0;
}

void eng_gate_leave(eng_seg *s)
{
    if (s)
        fetch_sub_release_u32(&s->gate_calls, 1);      /* E3: pairs with C2 */
}

/* Shut the gate; returns how many calls are still in (0: close may detach). */
uint32_t eng_gate_shut(eng_seg *s)
{
    if (seg_error(s))
        return 0;   /* closed, or a fork child's copy: nothing in flight here */
    store_seq_cst_u32(&s->gate_shut, 1);               /* C1 */
    return load_seq_cst_u32(&s->gate_calls);           /* C2: against E1; acquires E3 */
}

void eng_gate_open(eng_seg *s)
{
    if (s)
        store_seq_cst_u32(&s->gate_shut, 0);
}
