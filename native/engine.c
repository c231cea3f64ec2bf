/*
 * engine.c - atomics, transitions, latch-seqlock records, futex waits,
 * liveness and recovery for the shared-memory state engine.
 *
 * This file is the only place in the project with atomics.  Every atomic
 * access names its memory order; every ordered access says what it pairs with.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ==== atomics: memory order is in the name ================================= */

static inline uint64_t load_relaxed_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint64_t load_acquire_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t load_relaxed_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint32_t load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t load_seq_cst_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void store_relaxed_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void store_release_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void store_relaxed_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void store_release_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* On failure *expected receives the current value (acquire). */
static inline int cas_acq_rel_u64(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static inline int cas_acq_rel_u32(uint32_t *p, uint32_t *expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static inline uint64_t fetch_add_relaxed_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline uint32_t fetch_add_relaxed_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline uint32_t fetch_add_seq_cst_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t fetch_add_seq_cst_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t fetch_sub_seq_cst_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
static inline void fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* Counter bump owned by one Engine: no RMW, never contends (see metrics). */
static inline void bump_relaxed_u64(uint64_t *p, uint64_t v)
{
    store_relaxed_u64(p, load_relaxed_u64(p) + v);
}

/* Records are copied one 8-byte word at a time with relaxed atomics, so a
 * reader racing a writer gets stale words, never undefined behaviour; the
 * seqlock sequence tells it whether the copy is usable. */
#define REC_WORDS(T) (sizeof(T) / sizeof(uint64_t))

static inline void copy_words_relaxed(void *dst, const void *src, size_t nwords)
{
    uint64_t *d = dst;
    const uint64_t *s = src;
    for (size_t i = 0; i < nwords; i++)
        store_relaxed_u64(&d[i], load_relaxed_u64(&s[i]));
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ==== bounded back-off ====================================================== */
/*
 * Every wait in this file is a loop of backoff_step calls with a hard step
 * limit.  The steps escalate: a few spins, then sched_yield (a lock holder
 * may be descheduled: more workers than cores is normal), then 50 us sleeps.
 * LIVENESS_EVERY steps into the sleeping phase, the caller checks whether the
 * holder is still alive.
 */
#define SPIN_STEPS      6
#define YIELD_STEPS     24
#define MAX_WAIT_STEPS  160     /* about 7 ms of sleeping after the yields */
#define LIVENESS_EVERY  8
#define CAS_RETRIES     64      /* fast-path CAS failures before CONFLICT */
#define READ_RETRIES    4096    /* seqlock reads that saw the sequence move */

static void backoff_step(uint32_t step)
{
    if (step < SPIN_STEPS) {
        for (uint32_t i = 0; i < (1u << step); i++)
            cpu_relax();
    } else if (step < YIELD_STEPS) {
        sched_yield();
    } else {
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
}

static inline int time_to_check_owner(uint32_t step)
{
    return step >= YIELD_STEPS && (step - YIELD_STEPS) % LIVENESS_EVERY == 0;
}

/* ==== clocks ================================================================= */

static inline int64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ==== state word ============================================================== */

static inline uint32_t sw_state(uint64_t w) { return (uint32_t)(w & ENG_SW_STATE_MASK); }
static inline int sw_locked(uint64_t w) { return (w & ENG_SW_LOCK) != 0; }
static inline uint32_t sw_gen(uint64_t w) { return (uint32_t)((w >> ENG_SW_GEN_SHIFT) & ENG_SW_GEN_MASK); }
static inline uint32_t sw_owner(uint64_t w) { return (uint32_t)((w >> ENG_SW_OWNER_SHIFT) & ENG_SW_OWNER_MASK); }
static inline uint32_t sw_target(uint64_t w) { return (uint32_t)((w >> ENG_SW_TARGET_SHIFT) & ENG_SW_TARGET_MASK); }

static inline uint64_t sw_make(uint32_t onehot, uint32_t gen)
{
    return (uint64_t)onehot | ((uint64_t)(gen & ENG_SW_GEN_MASK) << ENG_SW_GEN_SHIFT);
}

static inline uint64_t sw_make_locked(uint64_t w, uint32_t target, uint32_t pid)
{
    uint64_t keep = w & (ENG_SW_STATE_MASK | (ENG_SW_GEN_MASK << ENG_SW_GEN_SHIFT));
    return keep | ENG_SW_LOCK | ((uint64_t)target << ENG_SW_TARGET_SHIFT)
         | ((uint64_t)pid << ENG_SW_OWNER_SHIFT);
}

static inline uint32_t onehot_index(uint32_t onehot) { return (uint32_t)__builtin_ctz(onehot); }

/* ==== metrics ================================================================== */
/*
 * Each Engine object owns one shard; only its own process writes it, with
 * relaxed load + store (no RMW, no contention).  Readers in other processes
 * load relaxed and may see a count one behind.  Two threads sharing one
 * Engine object may lose increments: give each thread its own Engine.
 */
typedef struct op_timer {
    eng_op_metrics *m;
    int64_t t0;             /* 0: not sampled */
} op_timer;

static inline op_timer op_begin(eng_seg *s, int op)
{
    op_timer t = {NULL, 0};
    if (!load_relaxed_u32(&s->hdr->metrics_on))
        return t;
    t.m = &s->me->op[op];
    uint64_t n = load_relaxed_u64(&t.m->attempts);
    store_relaxed_u64(&t.m->attempts, n + 1);
    if ((n & load_relaxed_u32(&s->hdr->sample_mask)) == 0)
        t.t0 = now_ns(CLOCK_MONOTONIC);
    return t;
}

static inline void op_end(op_timer t, int rc)
{
    if (!t.m)
        return;
    if (rc == ENG_EGUARDED) {
        /* not an outcome: the caller retries on the guarded path, which
         * counts the transition once; take this attempt back */
        store_relaxed_u64(&t.m->attempts, load_relaxed_u64(&t.m->attempts) - 1);
        return;
    }
    uint64_t *counter;
    switch (rc) {
    case ENG_APPLIED: counter = &t.m->applied; break;
    case ENG_INVALID: counter = &t.m->invalid; break;
    case ENG_CONFLICT: counter = &t.m->conflicts; break;
    case ENG_REJECTED: counter = &t.m->rejected; break;
    case ENG_HALTED: counter = &t.m->halted; break;
    default: counter = rc > 0 ? &t.m->applied : &t.m->errors; break;
    }
    bump_relaxed_u64(counter, 1);
    if (t.t0) {
        uint64_t ns = (uint64_t)(now_ns(CLOCK_MONOTONIC) - t.t0);
        uint32_t b = ns ? 64u - (uint32_t)__builtin_clzll(ns) : 0;
        if (b >= ENG_HIST_BUCKETS)
            b = ENG_HIST_BUCKETS - 1;
        bump_relaxed_u64(&t.m->hist[b], 1);
        bump_relaxed_u64(&t.m->samples, 1);
        if (ns > load_relaxed_u64(&t.m->max_ns))
            store_relaxed_u64(&t.m->max_ns, ns);
    }
}

static inline void op_count(op_timer t, size_t field_offset, uint64_t v)
{
    if (t.m && v)
        bump_relaxed_u64((uint64_t *)((uint8_t *)t.m + field_offset), v);
}

#define OP_RETRIES(t, v)   op_count((t), offsetof(eng_op_metrics, retries), (v))
#define OP_TAKEOVERS(t, v) op_count((t), offsetof(eng_op_metrics, takeovers), (v))

/* ==== liveness ================================================================= */

/* Field 22 of /proc/<pid>/stat (start time in clock ticks after boot) and
 * field 3 (state letter).  Returns 0 on success. */
static int read_proc_stat(uint32_t pid, uint64_t *start_time, char *state)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');          /* comm may contain spaces and ')' */
    if (!p || p[1] != ' ')
        return -1;
    p += 2;
    *state = *p;
    /* after ')' come fields 3..: skip 19 separators to reach field 22 */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return -1;
        p++;
    }
    *start_time = strtoull(p, NULL, 10);
    return 0;
}

uint64_t eng_proc_start_time(uint32_t pid)
{
    uint64_t st = 0;
    char state;
    if (read_proc_stat(pid, &st, &state) != 0)
        return 0;
    return st;
}

/* 1 if pid runs and (when start_time != 0) started at start_time; zombies
 * count as dead. */
int eng_proc_alive(uint32_t pid, uint64_t start_time)
{
    if (pid == 0)
        return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
        return 0;
    uint64_t st;
    char state;
    if (read_proc_stat(pid, &st, &state) != 0)
        return 0;
    if (state == 'Z' || state == 'X')
        return 0;
    return start_time == 0 || st == start_time;
}

/* An owner is alive if some registry entry names its pid and that process
 * (same start time) still runs.  A pid in no entry cannot own anything: every
 * Engine registers before it takes a lock, and recover() removes an entry only
 * after releasing what its process held. */
int eng_owner_alive(eng_seg *s, uint32_t pid)
{
    for (uint32_t i = 0; i < ENG_MAX_PROCS; i++) {
        eng_proc *e = &s->registry[i];
        if (load_acquire_u32(&e->pid) != pid)
            continue;
        uint64_t st = load_relaxed_u64(&e->start_time);   /* 0 while CLAIMED */
        if (eng_proc_alive(pid, st))
            return 1;
    }
    return 0;
}

/* ==== futex ==================================================================== */

/* The futex word is the low 32 bits of the slot's transition counter
 * (little-endian is asserted in the header): one RMW per commit serves both. */
static inline uint32_t *futex_word(eng_slot *sl) { return (uint32_t *)&sl->transitions; }

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    /* shared (non-private) ops: the word lives in memory mapped by many processes */
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* ==== layout ==================================================================== */

static inline uint64_t align_line(uint64_t x)
{
    return (x + ENG_CACHE_LINE - 1) & ~(uint64_t)(ENG_CACHE_LINE - 1);
}

typedef struct layout {
    uint64_t registry_off, shards_off, slots_off, size;
} layout;

static layout compute_layout(uint32_t capacity)
{
    layout l;
    l.registry_off = align_line(sizeof(eng_header));
    l.shards_off = align_line(l.registry_off + sizeof(eng_proc) * ENG_MAX_PROCS);
    l.slots_off = align_line(l.shards_off + sizeof(eng_shard) * (ENG_MAX_PROCS + 1));
    l.size = l.slots_off + (uint64_t)sizeof(eng_slot) * capacity;
    return l;
}

uint64_t eng_segment_size(uint32_t capacity)
{
    if (capacity == 0 || capacity > ENG_MAX_CAPACITY)
        return 0;
    return compute_layout(capacity).size;
}

int eng_noop(void) { return 0; }

/* ==== format, validate, attach ================================================== */

int eng_format(void *base, uint64_t size, uint32_t capacity,
               const uint8_t *table, uint32_t n_states, uint32_t n_triggers,
               uint32_t initial_index, uint32_t closed_mask,
               uint64_t fingerprint, uint32_t creator_pid)
{
    if (!base || !table || capacity == 0 || capacity > ENG_MAX_CAPACITY)
        return ENG_EBADARG;
    if (n_states == 0 || n_states > ENG_MAX_STATES || n_triggers == 0 ||
        n_triggers > ENG_MAX_TRIGGERS || initial_index >= n_states ||
        (closed_mask >> n_states) != 0)
        return ENG_EBADARG;
    layout l = compute_layout(capacity);
    if (size < l.size)
        return ENG_ESIZE;
    for (uint32_t i = 0; i < ENG_MAX_STATES * ENG_MAX_TRIGGERS; i++) {
        uint32_t st = i / ENG_MAX_TRIGGERS, tr = i % ENG_MAX_TRIGGERS;
        uint32_t tgt = table[i] & ENG_RULE_TARGET_MASK;
        if (table[i] & ~(ENG_RULE_TARGET_MASK | ENG_RULE_GUARDED))
            return ENG_EBADARG;
        if (tgt && (st >= n_states || tr >= n_triggers || tgt > n_states))
            return ENG_EBADARG;
    }
    /* A fresh segment is zero-filled; the header goes in field by field and
     * ready last. */
    eng_header *h = base;
    memcpy(h->table, table, sizeof h->table);
    h->layout_version = ENG_LAYOUT_VERSION;
    h->segment_size = l.size;
    h->capacity = capacity;
    h->slot_size = sizeof(eng_slot);
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
    h->sample_mask = 63;
    h->magic = ENG_MAGIC;
    store_release_u32(&h->ready, 1);   /* pairs with the acquire in eng_validate */
    return 0;
}

int eng_validate(const void *base, uint64_t size, uint64_t fingerprint)
{
    if (!base || size < sizeof(eng_header))
        return size < sizeof(uint64_t) ? ENG_EMAGIC : ENG_ESIZE;
    const eng_header *h = base;
    if (h->magic != ENG_MAGIC)
        return ENG_EMAGIC;
    if (!load_acquire_u32((uint32_t *)&h->ready))   /* pairs with eng_format */
        return ENG_ENOTREADY;
    if (h->layout_version != ENG_LAYOUT_VERSION)
        return ENG_ELAYOUT;
    if (h->capacity == 0 || h->capacity > ENG_MAX_CAPACITY ||
        h->slot_size != sizeof(eng_slot))
        return ENG_ECORRUPT;
    layout l = compute_layout(h->capacity);
    if (h->segment_size != l.size || size < l.size || h->registry_off != l.registry_off ||
        h->shards_off != l.shards_off || h->slots_off != l.slots_off)
        return ENG_ESIZE;
    if (h->n_states == 0 || h->n_states > ENG_MAX_STATES || h->n_triggers == 0 ||
        h->n_triggers > ENG_MAX_TRIGGERS || h->initial_index >= h->n_states)
        return ENG_ECORRUPT;
    for (uint32_t st = 0; st < ENG_MAX_STATES; st++)
        for (uint32_t tr = 0; tr < ENG_MAX_TRIGGERS; tr++) {
            uint32_t tgt = h->table[st * ENG_MAX_TRIGGERS + tr] & ENG_RULE_TARGET_MASK;
            if (tgt && (st >= h->n_states || tr >= h->n_triggers || tgt > h->n_states))
                return ENG_ECORRUPT;
        }
    if (fingerprint && h->fingerprint != fingerprint)
        return ENG_ESPEC;
    return 0;
}

int eng_attach(eng_seg *s, void *base, uint64_t size, uint64_t fingerprint)
{
    int rc = eng_validate(base, size, fingerprint);
    if (rc)
        return rc;
    uint32_t pid = (uint32_t)getpid();
    if (pid > ENG_MAX_PID)
        return ENG_EBADARG;
    eng_header *h = base;
    memset(s, 0, sizeof *s);
    s->base = base;
    s->size = size;
    s->hdr = h;
    s->registry = (eng_proc *)((uint8_t *)base + h->registry_off);
    s->shards = (eng_shard *)((uint8_t *)base + h->shards_off);
    s->slots = (eng_slot *)((uint8_t *)base + h->slots_off);
    s->capacity = h->capacity;
    s->n_triggers = h->n_triggers;
    s->pid = pid;
    uint64_t start = eng_proc_start_time(pid);
    for (uint32_t i = 0; i < ENG_MAX_PROCS; i++) {
        eng_proc *e = &s->registry[i];
        uint32_t expected = 0;
        if (load_relaxed_u32(&e->pid) != 0 || !cas_acq_rel_u32(&e->pid, &expected, pid))
            continue;
        store_relaxed_u32(&e->state, ENG_PROC_CLAIMED);
        store_relaxed_u64(&e->start_time, start);
        store_relaxed_u64(&e->attached_ns, (uint64_t)now_ns(CLOCK_REALTIME));
        /* a fresh shard: the previous owner's counts were folded into the
         * retired shard when it left */
        memset(&s->shards[i], 0, sizeof(eng_shard));
        fence_release();
        store_release_u32(&e->state, ENG_PROC_ACTIVE);  /* pairs with readers of the registry */
        s->proc_index = i;
        s->me = &s->shards[i];
        return 0;
    }
    return ENG_ENOPROC;
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
            while (v > cur && !__atomic_compare_exchange_n(&d[i], &cur, v, 0,
                                                           __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
        } else if (v) {
            fetch_add_relaxed_u64(&d[i], v);
        }
        store_relaxed_u64(&p[i], 0);
    }
}

static void release_entry(eng_seg *s, uint32_t i)
{
    eng_proc *e = &s->registry[i];
    retire_shard(s, &s->shards[i]);
    store_relaxed_u64(&e->start_time, 0);
    store_relaxed_u32(&e->state, ENG_PROC_FREE);
    store_release_u32(&e->pid, 0);   /* entry free only after its shard is folded */
}

void eng_detach(eng_seg *s)
{
    if (!s->hdr || !s->me)
        return;
    release_entry(s, s->proc_index);
    s->me = NULL;
    s->hdr = NULL;
}

/* ==== seqlock records: the latch variant ======================================= */
/*
 * Each record (price, context) has a sequence word and two copies.
 *
 * Guarantees: a reader never waits for a writer, not even one killed mid-write,
 * and never returns a torn record; the version it returns is the sequence,
 * which never goes backwards.  Writers are serialised by a latch (the price
 * writer word, or for contexts the transition lock) and write the copy readers
 * are NOT using, then publish it by incrementing the sequence with release.
 *
 *   writer (holds latch):              reader:
 *     q = seq (relaxed)                  q1 = seq (acquire)       [pairs with W3]
 *     W0 fence (release)                 R1 copy copy[q1&1] (relaxed words)
 *     W1 write copy[(q+1)&1] (relaxed)   R2 fence (acquire)       [pairs with W0]
 *     W3 seq = q+1 (release)             q2 = seq (relaxed)
 *                                        retry if q1 != q2
 *
 * If q2 == q1, no writer published since the read began, so no writer can
 * have started on copy[q1&1] (the next writer writes copy[(q1+1)&1]; the one
 * after that only starts once seq is q1+1).  W0/R2 make that hold on weakly
 * ordered CPUs too: a reader that saw any word of a later writer's W1 also
 * sees the sequence that writer advanced from, so its q2 != q1.
 *
 * Does not guarantee: progress for a reader while writers publish back to back
 * forever; it gives up after READ_RETRIES attempts with ENG_EBUSY.
 */

static int read_ctx(const eng_slot *sl, eng_ctx_rec *out, uint64_t *version)
{
    for (uint32_t i = 0; i < READ_RETRIES; i++) {
        uint64_t q1 = load_acquire_u64(&sl->cseq);
        copy_words_relaxed(out, &sl->ctx[q1 & 1], REC_WORDS(eng_ctx_rec));
        fence_acquire();
        if (load_relaxed_u64(&sl->cseq) == q1) {
            if (version)
                *version = q1;
            return 0;
        }
        if (i > SPIN_STEPS)
            sched_yield();
    }
    return ENG_EBUSY;
}

/* Caller holds the slot's transition lock (the context latch). */
static void publish_ctx(eng_slot *sl, const eng_ctx_rec *rec)
{
    uint64_t q = load_relaxed_u64(&sl->cseq);
    fence_release();   /* W0: pairs with the reader's acquire fence, see above */
    copy_words_relaxed(&sl->ctx[(q + 1) & 1], rec, REC_WORDS(eng_ctx_rec));
    store_release_u64(&sl->cseq, q + 1);   /* pairs with the acquire in read_ctx */
}

static int read_price_rec(const eng_slot *sl, eng_price_rec *out, uint64_t *version)
{
    for (uint32_t i = 0; i < READ_RETRIES; i++) {
        uint64_t q1 = load_acquire_u64(&sl->pseq);
        copy_words_relaxed(out, &sl->price[q1 & 1], REC_WORDS(eng_price_rec));
        fence_acquire();
        if (load_relaxed_u64(&sl->pseq) == q1) {
            *version = q1;
            return 0;
        }
        if (i > SPIN_STEPS)
            sched_yield();
    }
    return ENG_EBUSY;
}

/* ---- the price writer latch ---- */
/* CAS pwriter 0 -> pid.  A holder that keeps it past the bound is checked:
 * if dead, the latch is taken over (its half-written copy was never
 * published, so nothing needs repair). */
static int price_latch(eng_seg *s, eng_slot *sl, op_timer t)
{
    for (uint32_t step = 0; step < MAX_WAIT_STEPS; step++) {
        uint32_t cur = 0;
        if (cas_acq_rel_u32(&sl->pwriter, &cur, s->pid))
            return 0;
        OP_RETRIES(t, 1);
        if (time_to_check_owner(step) && !eng_owner_alive(s, cur)) {
            if (cas_acq_rel_u32(&sl->pwriter, &cur, s->pid)) {
                OP_TAKEOVERS(t, 1);
                return 0;
            }
        }
        backoff_step(step);
    }
    return ENG_EBUSY;
}

static inline void price_unlatch(eng_slot *sl)
{
    store_release_u32(&sl->pwriter, 0);   /* pairs with the next writer's CAS */
}

static inline int price_ok(double p) { return isfinite(p) && p > 0.0; }

/* Write one price, latch held.  PnL from the context read consistently. */
static int write_price(eng_slot *sl, double price, int64_t ts)
{
    eng_ctx_rec c;
    int rc = read_ctx(sl, &c, NULL);
    if (rc)
        return rc;
    eng_price_rec r;
    double diff = price - c.entry_price;
    r.price = price;
    r.ts_ns = ts;
    r.pnl_pct = diff / c.entry_price * 100.0 * (double)c.side;
    r.pnl_usd = diff * c.amount * (double)c.side;
    uint64_t q = load_relaxed_u64(&sl->pseq);
    fence_release();   /* W0: pairs with the reader's acquire fence, see above */
    copy_words_relaxed(&sl->price[(q + 1) & 1], &r, REC_WORDS(eng_price_rec));
    store_release_u64(&sl->pseq, q + 1);   /* pairs with the acquire in read_price_rec */
    return 0;
}

/* Every exported function taking an eng_seg starts here: a detached (or
 * never attached) view has no header. */
#define CHECK_SEG(s) do { if (!(s) || !(s)->hdr) return ENG_ECLOSED; } while (0)

/* ==== transitions ================================================================ */
/*
 * Protocol.  Fast path (no context change, no guard): load the word, look the
 * rule up, CAS old -> new with generation + 1.  Slow path: CAS old -> locked
 * (lock bit, owner pid, target index; state and generation unchanged), write
 * the context copy carrying generation + 1 and publish it, then publish the
 * new state unlocked with generation + 1.  After any commit: bump the slot's
 * transition counter (whose low half is the futex word) and wake waiters if any.
 *
 *   locker:                               takeover (owner found dead):
 *     CAS w -> L(w, target, pid)            if published ctx.gen == gen(w)+1:
 *     publish ctx (gen + 1)                   CAS L -> target, gen + 1  (forward)
 *     CAS L -> target, gen + 1              else:
 *                                             CAS L -> w | E            (back)
 *
 * Guarantees: every transition is applied exactly once or not at all, even if
 * its process dies between any two steps; generations grow by one per commit.
 * Does not guarantee: fairness between contending writers (a loser gets
 * ENG_CONFLICT after its bounded retries).
 */

static void commit_after(eng_seg *s, eng_slot *sl, uint64_t old_w, uint64_t new_w)
{
    s->last_old_word = old_w;
    s->last_new_word = new_w;
    /* seq_cst pair: increment the counter, then read waiters; a waiter
     * increments waiters, then reads the counter.  One sees the other. */
    fetch_add_seq_cst_u64(&sl->transitions, 1);
    if (load_seq_cst_u32(&sl->waiters))
        futex(futex_word(sl), FUTEX_WAKE, INT_MAX, NULL);
}

static inline uint32_t next_gen(eng_seg *s, uint32_t gen)
{
    if (__builtin_expect(load_relaxed_u32(&s->hdr->fault_flags) & ENG_FAULT_SKIP_GEN, 0))
        return gen;
    return (gen + 1) & ENG_SW_GEN_MASK;
}

/* Resolve a lock whose owner is dead.  Returns 1 if this call resolved it
 * (the word changed from w), 0 if someone else changed the word first. */
static int takeover(eng_seg *s, eng_slot *sl, uint64_t w, op_timer t)
{
    eng_ctx_rec c;
    uint32_t gen = sw_gen(w);
    uint32_t new_gen = (gen + 1) & ENG_SW_GEN_MASK;
    int forward = read_ctx(sl, &c, NULL) == 0 && c.gen == new_gen;
    uint64_t resolved = forward ? sw_make(1u << sw_target(w), new_gen)
                                : sw_make(sw_state(w), gen) | (sw_state(w) ? ENG_SW_ERROR : 0);
    uint64_t expected = w;
    if (!cas_acq_rel_u64(&sl->word, &expected, resolved))
        return 0;
    OP_TAKEOVERS(t, 1);
    if (forward)
        commit_after(s, sl, sw_make(sw_state(w), gen), resolved);
    return 1;
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
        if (time_to_check_owner(step) && !eng_owner_alive(s, sw_owner(w)))
            takeover(s, sl, w, t);
        else
            backoff_step(step);
        w = load_acquire_u64(&sl->word);
    }
    *locked = sw_locked(w);
    return w;
}


/* Find the rule for trigger in word w.  Returns >= 0 target index, or an
 * outcome / error code as a negative-encoded value via *rc. */
static inline int lookup(eng_seg *s, uint64_t w, uint32_t trigger, int *rc)
{
    uint32_t st = sw_state(w);
    if (st == 0) {
        *rc = ENG_ENOTOPEN;
        return -1;
    }
    uint8_t e = s->hdr->table[onehot_index(st) * ENG_MAX_TRIGGERS + trigger];
    if (!(e & ENG_RULE_TARGET_MASK)) {
        *rc = ENG_INVALID;
        return -1;
    }
    *rc = (e & ENG_RULE_GUARDED) ? ENG_EGUARDED : 0;
    return (int)(e & ENG_RULE_TARGET_MASK) - 1;
}

int eng_transition(eng_seg *s, uint32_t slot, uint32_t trigger)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    if (trigger >= s->n_triggers)
        return ENG_EBADTRIGGER;
    op_timer t = op_begin(s, ENG_OP_TRANSITION);
    eng_slot *sl = &s->slots[slot];
    int rc;
    uint64_t retries = 0;
    uint64_t w = load_acquire_u64(&sl->word);
    for (;;) {
        if (load_relaxed_u32(&s->hdr->halted)) {
            rc = sw_state(w) ? ENG_HALTED : ENG_ENOTOPEN;   /* a free slot is bad input */
            break;
        }
        if (sw_locked(w)) {
            int locked;
            w = wait_unlocked(s, sl, w, t, &locked);
            if (locked) {
                rc = ENG_CONFLICT;
                break;
            }
        }
        int target = lookup(s, w, trigger, &rc);
        if (target < 0 || rc)
            break;
        uint64_t nw = sw_make(1u << target, next_gen(s, sw_gen(w)));
        if (__builtin_expect(load_relaxed_u32(&s->hdr->fault_flags) & ENG_FAULT_BLIND_STORE, 0)) {
            store_release_u64(&sl->word, nw);   /* deliberately broken: tests only */
            commit_after(s, sl, w, nw);
            rc = ENG_APPLIED;
            break;
        }
        uint64_t old = w;
        if (cas_acq_rel_u64(&sl->word, &w, nw)) {   /* on failure w is reloaded */
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
    op_end(t, rc);
    return rc;
}

/* Just after locking: a published context left over from 2^16 commits ago
 * could carry new_gen by coincidence and mislead a takeover (during a guard,
 * or before our own context is out) into rolling forward.  Republish it with
 * a generation that cannot match. */
static void disown_stale_ctx(eng_slot *sl, uint32_t new_gen)
{
    eng_ctx_rec cur;
    if (read_ctx(sl, &cur, NULL) == 0 && cur.gen == new_gen) {
        cur.gen = new_gen ^ 0x8000u;
        publish_ctx(sl, &cur);
    }
}

/* Take the slot's transition lock for (trigger -> target).  On success *out_w
 * is the word before locking and *out_target the target index.  guarded says
 * whether guarded rules are allowed. */
static int lock_slot(eng_seg *s, eng_slot *sl, uint32_t trigger, int guarded,
                     op_timer t, uint64_t *out_w, uint32_t *out_target)
{
    uint64_t retries = 0;
    uint64_t w = load_acquire_u64(&sl->word);
    int rc;
    for (;;) {
        if (load_relaxed_u32(&s->hdr->halted)) {
            rc = sw_state(w) ? ENG_HALTED : ENG_ENOTOPEN;   /* a free slot is bad input */
            break;
        }
        if (sw_locked(w)) {
            int locked;
            w = wait_unlocked(s, sl, w, t, &locked);
            if (locked) {
                rc = ENG_CONFLICT;
                break;
            }
        }
        int target = lookup(s, w, trigger, &rc);
        if (target < 0 || (rc && !(rc == ENG_EGUARDED && guarded)))
            break;
        uint64_t old = w;
        if (cas_acq_rel_u64(&sl->word, &w, sw_make_locked(w, (uint32_t)target, s->pid))) {
            disown_stale_ctx(sl, next_gen(s, sw_gen(old)));
            *out_w = old;
            *out_target = (uint32_t)target;
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

static void test_pause(eng_seg *s)
{
    uint64_t ns = load_relaxed_u64(&s->hdr->test_pause_ns);
    if (__builtin_expect(ns != 0, 0)) {
        struct timespec ts = {(time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL)};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
}

/* Slot locked by us from old_w; publish the context (if any), then the state. */
static int finish_locked(eng_seg *s, eng_slot *sl, uint64_t old_w, uint32_t target,
                         const eng_ctx_rec *ctx)
{
    uint32_t new_gen = next_gen(s, sw_gen(old_w));
    if (ctx) {
        eng_ctx_rec c = *ctx;
        c.gen = new_gen;
        publish_ctx(sl, &c);
    }
    test_pause(s);
    uint64_t locked = sw_make_locked(old_w, target, s->pid);
    uint64_t nw = sw_make(1u << target, new_gen);
    if (!cas_acq_rel_u64(&sl->word, &locked, nw))
        return ENG_CONFLICT;   /* taken over: only if we were judged dead */
    commit_after(s, sl, sw_make(sw_state(old_w), sw_gen(old_w)), nw);
    return ENG_APPLIED;
}

static void apply_update(eng_ctx_rec *c, const eng_ctx_update *u)
{
    if (!u)
        return;
    if (u->mask & ENG_CTX_EXIT_REASON)
        c->exit_reason = u->exit_reason;
    if (u->mask & ENG_CTX_STOP_LOSS)
        c->stop_loss = u->stop_loss;
    if (u->mask & ENG_CTX_TAKE_PROFIT)
        c->take_profit = u->take_profit;
}

static int check_update(const eng_ctx_update *u)
{
    if (!u)
        return 0;
    if (u->mask & ~(uint32_t)(ENG_CTX_EXIT_REASON | ENG_CTX_STOP_LOSS | ENG_CTX_TAKE_PROFIT))
        return ENG_EBADARG;
    if ((u->mask & ENG_CTX_STOP_LOSS) && !(isfinite(u->stop_loss) && u->stop_loss >= 0.0))
        return ENG_EBADARG;
    if ((u->mask & ENG_CTX_TAKE_PROFIT) && !(isfinite(u->take_profit) && u->take_profit >= 0.0))
        return ENG_EBADARG;
    return 0;
}

/* Under the lock: read the context, apply the update, publish context and
 * state. */
static int commit_with_update(eng_seg *s, eng_slot *sl, uint64_t old_w, uint32_t target,
                              const eng_ctx_update *u)
{
    eng_ctx_rec c;
    if (!u || !u->mask)
        return finish_locked(s, sl, old_w, target, NULL);
    if (read_ctx(sl, &c, NULL) != 0) {   /* we hold the latch: cannot move */
        store_release_u64(&sl->word, old_w);
        return ENG_EBUSY;
    }
    apply_update(&c, u);
    return finish_locked(s, sl, old_w, target, &c);
}

int eng_transition_ctx(eng_seg *s, uint32_t slot, uint32_t trigger, const eng_ctx_update *u)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    if (trigger >= s->n_triggers)
        return ENG_EBADTRIGGER;
    int rc = check_update(u);
    if (rc)
        return rc;
    op_timer t = op_begin(s, ENG_OP_TRANSITION_CTX);
    eng_slot *sl = &s->slots[slot];
    uint64_t old_w;
    uint32_t target;
    rc = lock_slot(s, sl, trigger, 0, t, &old_w, &target);
    if (rc == ENG_APPLIED)
        rc = commit_with_update(s, sl, old_w, target, u);
    op_end(t, rc);
    return rc;
}

/*
 * Guarded transitions run a Python guard between two calls: eng_guard_lock
 * takes the lock (guarded rules allowed); the caller reads the context and
 * price, runs the guard, then eng_guard_finish commits (with the update) or
 * restores the word (ENG_REJECTED).  If the process dies in between, a
 * takeover rolls the transition back: the context was not published.
 */
int eng_guard_lock(eng_seg *s, uint32_t slot, uint32_t trigger)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    if (trigger >= s->n_triggers)
        return ENG_EBADTRIGGER;
    op_timer t = op_begin(s, ENG_OP_TRANSITION_CTX);
    uint64_t old_w;
    uint32_t target;
    int rc = lock_slot(s, &s->slots[slot], trigger, 1, t, &old_w, &target);
    if (rc != ENG_APPLIED)
        op_end(t, rc);   /* a successful lock is counted by eng_guard_finish */
    return rc;
}

int eng_guard_finish(eng_seg *s, uint32_t slot, int commit, const eng_ctx_update *u)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    eng_slot *sl = &s->slots[slot];
    uint64_t w = load_acquire_u64(&sl->word);
    if (!sw_locked(w) || sw_owner(w) != s->pid)
        return ENG_ENOTLOCKED;
    op_timer t = {s->hdr->metrics_on ? &s->me->op[ENG_OP_TRANSITION_CTX] : NULL, 0};
    uint64_t old_w = sw_make(sw_state(w), sw_gen(w));
    int rc = commit ? check_update(u) : 0;
    if (!commit || rc) {
        uint64_t expected = w;
        cas_acq_rel_u64(&sl->word, &expected, old_w);   /* unlock, nothing changed */
        rc = rc ? rc : ENG_REJECTED;
    } else {
        rc = commit_with_update(s, sl, old_w, sw_target(w), u);
    }
    op_end(t, rc);
    return rc;
}

int eng_state(eng_seg *s, uint32_t slot)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    uint32_t st = sw_state(load_acquire_u64(&s->slots[slot].word));
    return st ? (int)st : ENG_ENOTOPEN;
}

int eng_state_word(eng_seg *s, uint32_t slot, uint64_t *out_word)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    *out_word = load_acquire_u64(&s->slots[slot].word);
    return 0;
}

/* ==== open and release ============================================================ */
/*
 * Opening uses the slow path from state 0 (free) to the initial state: lock a
 * free word, write the price record and the context, publish the state.  A
 * takeover of a dead opener rolls forward (context published) or back to free.
 */
int eng_open_position(eng_seg *s, double entry_price, double amount,
                      int32_t side, int64_t token, uint32_t *out_slot)
{
    CHECK_SEG(s);
    if (!price_ok(entry_price))
        return ENG_EBADPRICE;
    if (!(isfinite(amount) && amount > 0.0) || (side != 1 && side != -1) || !out_slot)
        return ENG_EBADARG;
    op_timer t = op_begin(s, ENG_OP_OPEN);
    uint32_t cap = s->capacity;
    uint32_t start = fetch_add_relaxed_u32(&s->hdr->alloc_hint, 1) % cap;
    uint32_t target = s->hdr->initial_index;
    int rc = ENG_EFULL;
    for (uint32_t k = 0; k < cap; k++) {
        uint32_t slot = (start + k) % cap;
        eng_slot *sl = &s->slots[slot];
        uint64_t w = load_relaxed_u64(&sl->word);
        if (sw_state(w) != 0 || sw_locked(w))
            continue;
        if (!cas_acq_rel_u64(&sl->word, &w, sw_make_locked(w, target, s->pid)))
            continue;
        /* slot locked and free: write the records */
        int64_t ts = now_ns(CLOCK_REALTIME);
        eng_ctx_rec c;
        memset(&c, 0, sizeof c);
        c.entry_price = entry_price;
        c.amount = amount;
        c.side = side;
        c.token = token;
        c.opened_ns = ts;
        __atomic_store_n(&sl->token, token, __ATOMIC_RELAXED);
        /* publish the context first so the opening price uses it */
        uint32_t new_gen = next_gen(s, sw_gen(w));
        c.gen = new_gen ^ 0x8000u;   /* not yet "ours": a takeover rolls back */
        publish_ctx(sl, &c);
        rc = price_latch(s, sl, t);
        if (rc == 0) {
            rc = write_price(sl, entry_price, ts);
            price_unlatch(sl);
        }
        if (rc) {
            store_release_u64(&sl->word, w);   /* back to free */
            break;
        }
        rc = finish_locked(s, sl, w, target, &c);
        if (rc == ENG_APPLIED)
            *out_slot = slot;
        break;
    }
    op_end(t, rc);
    return rc;
}

/* A closed position's slot goes back to the free pool (generation + 1). */
int eng_release_position(eng_seg *s, uint32_t slot)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    eng_slot *sl = &s->slots[slot];
    uint64_t w = load_acquire_u64(&sl->word);
    for (uint32_t retries = 0; retries < CAS_RETRIES; retries++) {
        uint32_t st = sw_state(w);   /* housekeeping: allowed while halted */
        if (st == 0)
            return ENG_ENOTOPEN;
        if (sw_locked(w) || !(st & s->hdr->closed_mask))
            return ENG_INVALID;
        uint64_t nw = sw_make(0, sw_gen(w) + 1);
        uint64_t old = w;
        if (cas_acq_rel_u64(&sl->word, &w, nw)) {
            commit_after(s, sl, old, nw);
            return ENG_APPLIED;
        }
        backoff_step(retries / 4);
    }
    return ENG_CONFLICT;
}

/* ==== prices ======================================================================= */

int eng_update_price(eng_seg *s, uint32_t slot, double price)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    if (!price_ok(price))
        return ENG_EBADPRICE;
    eng_slot *sl = &s->slots[slot];
    if (sw_state(load_acquire_u64(&sl->word)) == 0)
        return ENG_ENOTOPEN;
    op_timer t = op_begin(s, ENG_OP_PRICE);
    int rc = price_latch(s, sl, t);
    if (rc == 0) {
        rc = write_price(sl, price, now_ns(CLOCK_REALTIME));
        price_unlatch(sl);
    }
    op_end(t, rc);
    return rc;
}

/* The whole batch is checked before anything is written: one bad slot or
 * price refuses it all, with its index in *out_bad_index. */
int eng_update_prices(eng_seg *s, const uint32_t *slots, const double *prices,
                      uint64_t n, uint64_t *out_bad_index)
{
    CHECK_SEG(s);
    if (n && (!slots || !prices))
        return ENG_EBADARG;
    for (uint64_t i = 0; i < n; i++) {
        int rc = 0;
        if (slots[i] >= s->capacity)
            rc = ENG_EBADSLOT;
        else if (!price_ok(prices[i]))
            rc = ENG_EBADPRICE;
        else if (sw_state(load_acquire_u64(&s->slots[slots[i]].word)) == 0)
            rc = ENG_ENOTOPEN;
        if (rc) {
            if (out_bad_index)
                *out_bad_index = i;
            return rc;
        }
    }
    op_timer t = op_begin(s, ENG_OP_PRICE_BATCH);
    int64_t ts = now_ns(CLOCK_REALTIME);
    int rc = 0;
    for (uint64_t i = 0; i < n; i++) {
        eng_slot *sl = &s->slots[slots[i]];
        rc = price_latch(s, sl, t);
        if (rc == 0) {
            rc = write_price(sl, prices[i], ts);
            price_unlatch(sl);
        }
        if (rc) {
            if (out_bad_index)
                *out_bad_index = i;
            break;
        }
    }
    op_end(t, rc);
    return rc;
}

static inline int is_open_state(eng_seg *s, uint32_t st)
{
    return st != 0 && !(st & s->hdr->closed_mask);
}

int64_t eng_update_token_price(eng_seg *s, int64_t token, double price)
{
    CHECK_SEG(s);
    if (!price_ok(price))
        return ENG_EBADPRICE;
    op_timer t = op_begin(s, ENG_OP_PRICE_BATCH);
    int64_t ts = now_ns(CLOCK_REALTIME);
    int64_t count = 0;
    int rc = 0;
    for (uint32_t i = 0; i < s->capacity; i++) {
        eng_slot *sl = &s->slots[i];
        if (__atomic_load_n(&sl->token, __ATOMIC_RELAXED) != token ||
            !is_open_state(s, sw_state(load_acquire_u64(&sl->word))))
            continue;
        rc = price_latch(s, sl, t);
        if (rc == 0) {
            rc = write_price(sl, price, ts);
            price_unlatch(sl);
        }
        if (rc)
            break;
        count++;
    }
    op_end(t, rc ? rc : ENG_APPLIED);
    return rc ? rc : count;
}

int eng_read_price(eng_seg *s, uint32_t slot, eng_price_out *out)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    eng_slot *sl = &s->slots[slot];
    if (sw_state(load_acquire_u64(&sl->word)) == 0)
        return ENG_ENOTOPEN;
    op_timer t = op_begin(s, ENG_OP_READ);
    eng_price_rec r;
    uint64_t v;
    int rc = read_price_rec(sl, &r, &v);
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

int eng_read_context(eng_seg *s, uint32_t slot, eng_ctx_out *out)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    eng_slot *sl = &s->slots[slot];
    if (sw_state(load_acquire_u64(&sl->word)) == 0)
        return ENG_ENOTOPEN;
    op_timer t = op_begin(s, ENG_OP_READ);
    int rc = read_ctx(sl, &out->rec, &out->version);
    op_end(t, rc);
    return rc;
}

/* ==== waiting for a change ========================================================= */
/*
 * Blocks until the low 32 bits of the slot's transition counter differ from `since` (or from its
 * value at entry, with since < 0), the timeout passes (ENG_ETIMEDOUT),
 * or a signal arrives (ENG_EINTR: Python runs its handlers, then calls again
 * with the same `since` and the remaining time).  Spurious wakes re-check and
 * wait again.
 */
int eng_wait_change(eng_seg *s, uint32_t slot, int64_t since, int64_t timeout_ns,
                    uint32_t *out_change)
{
    CHECK_SEG(s);
    if (slot >= s->capacity)
        return ENG_EBADSLOT;
    if (timeout_ns < 0 || !out_change)
        return ENG_EBADARG;
    eng_slot *sl = &s->slots[slot];
    if (sw_state(load_acquire_u64(&sl->word)) == 0)
        return ENG_ENOTOPEN;
    op_timer t = op_begin(s, ENG_OP_WAIT);
    uint32_t base = since < 0 ? (uint32_t)load_acquire_u64(&sl->transitions) : (uint32_t)since;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + timeout_ns;
    int rc = ENG_ETIMEDOUT;
    fetch_add_seq_cst_u32(&sl->waiters, 1);   /* then read the counter: see commit_after */
    for (;;) {
        uint32_t cur = (uint32_t)__atomic_load_n(&sl->transitions, __ATOMIC_SEQ_CST);
        if (cur != base) {
            *out_change = cur;
            rc = ENG_APPLIED;
            break;
        }
        int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0)
            break;
        struct timespec ts = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
        if (futex(futex_word(sl), FUTEX_WAIT, base, &ts) != 0 && errno == EINTR) {
            rc = ENG_EINTR;
            *out_change = base;
            break;
        }
        /* woken, value changed (EAGAIN), timed out or spurious: re-check */
    }
    fetch_sub_seq_cst_u32(&sl->waiters, 1);
    op_end(t, rc == ENG_ETIMEDOUT ? ENG_CONFLICT : rc);
    return rc;
}

/* ==== snapshot ======================================================================= */

int eng_snapshot(eng_seg *s, eng_row *rows, uint32_t max_rows, uint32_t *out_n)
{
    CHECK_SEG(s);
    if (!rows || !out_n)
        return ENG_EBADARG;
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->capacity && n < max_rows; i++) {
        eng_slot *sl = &s->slots[i];
        uint64_t w = load_acquire_u64(&sl->word);
        if (sw_state(w) == 0)
            continue;
        eng_price_rec p;
        eng_ctx_rec c;
        uint64_t pv, cv;
        if (read_price_rec(sl, &p, &pv) || read_ctx(sl, &c, &cv))
            return ENG_EBUSY;
        eng_row *r = &rows[n++];
        r->slot = i;
        r->state = sw_state(w);
        r->generation = sw_gen(w);
        r->locked = sw_locked(w);
        r->transitions = load_relaxed_u64(&sl->transitions);
        r->price = p.price;
        r->price_ts_ns = p.ts_ns;
        r->pnl_pct = p.pnl_pct;
        r->pnl_usd = p.pnl_usd;
        r->price_version = pv;
        r->entry_price = c.entry_price;
        r->amount = c.amount;
        r->stop_loss = c.stop_loss;
        r->take_profit = c.take_profit;
        r->token = c.token;
        r->opened_ns = c.opened_ns;
        r->side = c.side;
        r->exit_reason = c.exit_reason;
        r->context_version = cv;
    }
    *out_n = n;
    return 0;
}

/* ==== recovery ========================================================================= */
/*
 * One recovery at a time: header.recovering is a CAS flag naming its owner,
 * taken over if that owner is dead.  The sweep resolves every transition lock
 * and price latch whose owner is dead, then removes dead registry entries
 * (their shards are folded into the retired shard first).  Live processes
 * keep working throughout: every change is a CAS against the exact word seen.
 */
int eng_recover(eng_seg *s, eng_recover_report *out)
{
    CHECK_SEG(s);
    if (!out)
        return ENG_EBADARG;
    memset(out, 0, sizeof *out);
    op_timer t = op_begin(s, ENG_OP_RECOVER);
    int rc = ENG_EBUSY;
    for (uint32_t step = 0; step < MAX_WAIT_STEPS * 4; step++) {
        uint32_t cur = 0;
        if (cas_acq_rel_u32(&s->hdr->recovering, &cur, s->pid)) {
            rc = 0;
            break;
        }
        if (time_to_check_owner(step) && !eng_proc_alive(cur, 0) &&
            cas_acq_rel_u32(&s->hdr->recovering, &cur, s->pid)) {
            rc = 0;
            break;
        }
        backoff_step(step);
    }
    if (rc) {
        op_end(t, rc);
        return rc;
    }
    for (uint32_t i = 0; i < s->capacity; i++) {
        eng_slot *sl = &s->slots[i];
        uint64_t w = load_acquire_u64(&sl->word);
        if (sw_locked(w) && sw_owner(w) != s->pid && !eng_owner_alive(s, sw_owner(w))) {
            eng_ctx_rec c;
            int forward = read_ctx(sl, &c, NULL) == 0 &&
                          c.gen == ((sw_gen(w) + 1) & ENG_SW_GEN_MASK);
            if (takeover(s, sl, w, t)) {
                if (forward)
                    out->rolled_forward++;
                else
                    out->rolled_back++;
            }
        }
        uint32_t pw = load_acquire_u32(&sl->pwriter);
        if (pw && pw != s->pid && !eng_owner_alive(s, pw) &&
            cas_acq_rel_u32(&sl->pwriter, &pw, 0))
            out->price_latches++;
    }
    for (uint32_t i = 0; i < ENG_MAX_PROCS; i++) {
        eng_proc *e = &s->registry[i];
        uint32_t pid = load_acquire_u32(&e->pid);
        if (pid == 0 || pid == s->pid)
            continue;
        if (eng_proc_alive(pid, load_relaxed_u64(&e->start_time)))
            continue;
        /* a CLAIMED entry may be mid-attach by a live process whose start
         * time is not written yet: eng_proc_alive(pid, 0) covers that */
        if (load_acquire_u32(&e->state) != ENG_PROC_ACTIVE && eng_proc_alive(pid, 0))
            continue;
        out->removed_pids[out->procs_removed++] = pid;
        release_entry(s, i);
    }
    store_release_u32(&s->hdr->recovering, 0);
    op_end(t, ENG_APPLIED);
    return 0;
}
