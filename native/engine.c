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
#include <float.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/random.h>
#include <sys/stat.h>
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

/* on failure *expected receives the current value */
static inline int cas_relaxed_u64(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static inline int cas_relaxed_u32(uint32_t *p, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static inline uint64_t fetch_add_relaxed_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline uint32_t fetch_add_relaxed_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline uint64_t fetch_add_seq_cst_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t fetch_add_seq_cst_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t fetch_sub_release_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELEASE); }
static inline uint32_t exchange_seq_cst_u32(uint32_t *p, uint32_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t exchange_relaxed_u32(uint32_t *p, uint32_t v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
static inline void store_seq_cst_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline void fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline void fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

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

/* A double's bits and back (records and PnL inputs store doubles as words). */
static inline double as_f8(uint64_t w)
{
    double d;
    memcpy(&d, &w, sizeof d);
    return d;
}

static inline uint64_t f8_bits(double d)
{
    uint64_t w;
    memcpy(&w, &d, sizeof w);
    return w;
}

/* Inlined whatever the compiler's estimate: hot-loop helpers (update_prices),
 * and prefetch hints (a call whose only effect is a hint is deemed pure and
 * dropped unless inlined first). */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* A hint: fetch p's line for writing (no access, never faults). */
ALWAYS_INLINE void prefetch_write(const void *p) { __builtin_prefetch(p, 1, 3); }

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ==== bounded back-off (the steps and limits are in the header) ============ */

#define SPIN_STEPS      ENG_SPIN_STEPS
#define YIELD_STEPS     ENG_YIELD_STEPS
#define MAX_WAIT_STEPS  ENG_MAX_WAIT_STEPS
#define LIVENESS_EVERY  ENG_LIVENESS_EVERY
#define CAS_RETRIES     ENG_CAS_RETRIES
#define READ_RETRIES    ENG_READ_RETRIES

static void backoff_step(uint32_t step)
{
    if (step < SPIN_STEPS) {
        for (uint32_t i = 0; i < (1u << step); i++)
            cpu_relax();
    } else if (step < YIELD_STEPS) {
        sched_yield();
    } else {
        struct timespec ts = {0, ENG_BACKOFF_SLEEP_NS};
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

/*
 * Price timestamps: CLOCK_REALTIME through the TSC (see "price timestamps"
 * in engine.h).  Each thread keeps its own anchors and rate, so nothing here
 * is shared or locked; a forked child goes on with its parent's (same TSC).
 * The fast read is one RDTSC, a subtraction, a compare, a multiply and the
 * floor (a compare and a store).
 *
 * Two anchors, two jobs.  The offset anchor is renewed once it has lived
 * ENG_CLOCK_ANCHOR_NS (a few microseconds): a fresh anchor pair always
 * replaces it, so a step of CLOCK_REALTIME is taken in whole at the first
 * renewal after it, either way, and a change of the clock's rate (a slew)
 * runs the extrapolation off by at most the rate change times one short
 * anchor life.  The rate anchor is the pair the rate is measured from: once
 * a renewal's pair is ENG_CLOCK_RATE_NS or more after it, the slope between
 * the two is measured and the pair becomes the new rate anchor.  The slope
 * is the rate only if it agrees (within 2^-ENG_CLOCK_RATE_TOL_SHIFT) with
 * the rate in use, or with the slope before it; a slope across a step
 * disagrees with both and is only kept as the candidate, and the next slope,
 * clean, agrees with the rate in use.  Two slopes in a row that agree with
 * each other and not with the rate (the first measurement, or a rate that
 * really moved) replace it.  A rate off by any fraction f costs f times one
 * anchor life (1% of 6 us: 60 ns), so a slope held back for a baseline or
 * two under a slew costs no more than the slew itself.
 *
 * The floor: a thread's timestamps never go back.  A timestamp below the last
 * one this thread returned is raised to it, when it is at most
 * ENG_CLOCK_BACK_NS below (the extrapolation ran ahead of a slowing clock, or
 * the anchor pairs' own width); further below means CLOCK_REALTIME itself
 * went back, and the timestamps follow it.
 *
 *   reader (any price write):  d = rdtsc - anchor.tsc
 *                              d < span ? max(last, anchor.ns + d*rate) : renew()
 * Does not guarantee: order between threads, or anything before the first
 * renewal after a step (up to ENG_CLOCK_ANCHOR_NS, off by the step).
 */
#if defined(__x86_64__)
#include <x86intrin.h>
#define HAVE_TSC 1
#else
#define HAVE_TSC 0
#endif

typedef struct tsc_clock {
    uint64_t tsc;      /* offset anchor: the TSC at ... */
    int64_t  ns;       /* ... this CLOCK_REALTIME (0: no anchor yet) */
    uint64_t mult;     /* ns per tick, 32.32: the rate in use; 0 until measured */
    uint64_t span;     /* ticks of ENG_CLOCK_ANCHOR_NS at mult: the anchor's life (0: renew) */
    uint64_t life;     /* ticks of ENG_CLOCK_ANCHOR_NS at mult (worked out when mult changes) */
    uint64_t pair;     /* ticks of ENG_CLOCK_PAIR_NS at mult; ENG_CLOCK_PAIR_TICKS without one */
    int64_t  last;     /* the last timestamp this thread returned (the floor) */
    uint64_t cand;     /* the last slope that disagreed with mult; 0: none */
    uint64_t rtsc;     /* rate anchor: the TSC at ... */
    int64_t  rns;      /* ... this CLOCK_REALTIME (0: none yet) */
} tsc_clock;

static __thread tsc_clock tclk;
/* "The numbers" in engine.h: the most a renewal falls below the last
 * timestamp under the fastest slew (plus 100 ns for an unfenced RDTSC) is
 * within the floor, so only a step back of the clock takes timestamps back. */
_Static_assert((2LL * ENG_CLOCK_SLEW_PPM + (1000000 >> ENG_CLOCK_RATE_TOL_SHIFT) + 1) *
               ENG_CLOCK_ANCHOR_NS * (1000000 + ENG_CLOCK_SLEW_PPM) /
               (1000000 - ENG_CLOCK_SLEW_PPM) / 1000000 + ENG_CLOCK_PAIR_NS + 100
               <= ENG_CLOCK_BACK_NS, "a slew within an anchor life stays within the floor");
static int price_clock_mode = -1;   /* ENG_CLOCK_*; -1 until the first price write decides */

/* The TSC usable as a clock: x86-64, and the kernel keeps time with it. */
static int tsc_usable(void)
{
    if (!HAVE_TSC)
        return 0;
    char name[16] = {0};
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "re");
    if (!f)
        return 0;
    int ok = fgets(name, sizeof name, f) && strcmp(name, "tsc\n") == 0;
    fclose(f);
    return ok;
}

int eng_price_clock(int mode)
{
    if (mode >= 0) {
        int m = mode == ENG_CLOCK_TSC && tsc_usable() ? ENG_CLOCK_TSC : ENG_CLOCK_REALTIME;
        __atomic_store_n(&price_clock_mode, m, __ATOMIC_RELAXED);
        memset(&tclk, 0, sizeof tclk);   /* this thread measures again; the others on their next anchor */
        return m;
    }
    int m = __atomic_load_n(&price_clock_mode, __ATOMIC_RELAXED);
    if (m < 0) {
        const char *env = getenv("ENGINE_PRICE_CLOCK");
        m = env && strcmp(env, "realtime") == 0 ? ENG_CLOCK_REALTIME
                                                 : eng_price_clock(ENG_CLOCK_TSC);
        __atomic_store_n(&price_clock_mode, m, __ATOMIC_RELAXED);
    }
    return m;
}

#if HAVE_TSC
static inline uint64_t tsc_ordered(void)
{
    _mm_lfence();   /* not before the reads ahead of it */
    return __rdtsc();
}

/* ns as this thread's next timestamp: held at the last one when at most
 * ENG_CLOCK_BACK_NS below it, followed when further below (a step back). */
static inline int64_t clock_floor(tsc_clock *c, int64_t ns)
{
    if (ns < c->last && c->last - ns <= ENG_CLOCK_BACK_NS)
        ns = c->last;
    c->last = ns;
    return ns;
}

/* a and b agree as rates: within 2^-ENG_CLOCK_RATE_TOL_SHIFT of b */
static inline int rates_agree(uint64_t a, uint64_t b)
{
    return b && (a > b ? a - b : b - a) <= b >> ENG_CLOCK_RATE_TOL_SHIFT;
}

/* The slow read: a new offset anchor when the old one is ENG_CLOCK_ANCHOR_NS
 * old, and a new rate when the rate anchor is ENG_CLOCK_RATE_NS old (see
 * "Two anchors" above); CLOCK_REALTIME itself while the rate is unknown. */
static __attribute__((noinline)) int64_t price_clock_anchor(void)
{
    if (eng_price_clock(-1) != ENG_CLOCK_TSC)
        return now_ns(CLOCK_REALTIME);
    tsc_clock *c = &tclk;   /* one look-up of this thread's clock (TLS in a shared object: */
    __asm__("" : "+r"(c));  /* a call each time the compiler would work the address out again) */
    int64_t ns = 0;
    if (!c->mult && c->rns) {
        ns = now_ns(CLOCK_REALTIME);
        if (ns - c->rns >= 0 && ns - c->rns < ENG_CLOCK_RATE_NS)
            return clock_floor(c, ns);   /* measuring: the rate anchor is too young to give a rate */
    }
    /* the anchor pair: CLOCK_REALTIME between two TSC reads, taken at their middle;
     * no wider than ENG_CLOCK_PAIR_NS at the rate in use (ENG_CLOCK_PAIR_TICKS before) */
    uint64_t limit = c->mult ? c->pair : ENG_CLOCK_PAIR_TICKS;
    uint64_t width = UINT64_MAX, mid = 0;
    for (int i = 0; i < ENG_CLOCK_PAIR_TRIES && width > limit; i++) {
        uint64_t a = tsc_ordered();
        int64_t t = now_ns(CLOCK_REALTIME);
        uint64_t b = tsc_ordered();
        if (b - a < width) {
            width = b - a;
            mid = a + width / 2;
            ns = t;
        }
    }
    if (width > limit) {
        c->span = 0;            /* preempted every time: renew on the next call */
        return clock_floor(c, ns);
    }
    if (!c->rns || ns - c->rns < 0 || ns - c->rns >= ENG_CLOCK_RATE_NS) {
        uint64_t slope = 0;   /* 0: none (no rate anchor, a step back, a TSC gone back, out of range) */
        if (c->rns && ns > c->rns && (int64_t)(mid - c->rtsc) > 0) {
            unsigned __int128 m = ((unsigned __int128)(uint64_t)(ns - c->rns) << 32) /
                                  (mid - c->rtsc);
            if (m >= ENG_CLOCK_MIN_MULT && m <= ENG_CLOCK_MAX_MULT)
                slope = (uint64_t)m;
        }
        if (slope && (rates_agree(slope, c->mult) || rates_agree(slope, c->cand))) {
            c->mult = slope;
            c->cand = 0;
            c->life = ((uint64_t)ENG_CLOCK_ANCHOR_NS << 32) / slope;
            c->pair = ((uint64_t)ENG_CLOCK_PAIR_NS << 32) / slope;
        } else {
            c->cand = slope;   /* across a step, or a rate seen once: keep the rate in use */
        }
        c->rtsc = mid;
        c->rns = ns;
    }
    c->tsc = mid;
    c->ns = ns;
    /* a pair taken before the rate was known may be wider than ENG_CLOCK_PAIR_NS:
     * not an anchor to extrapolate from, the next call renews */
    c->span = c->mult && width <= c->pair ? c->life : 0;
    return clock_floor(c, ns);
}
#endif

/* CLOCK_REALTIME for a price write.  The product stays below
 * ENG_CLOCK_ANCHOR_NS << 32 because d < span. */
static inline int64_t price_clock(void)
{
#if HAVE_TSC
    uint64_t d = __rdtsc() - tclk.tsc;
    if (__builtin_expect(d < tclk.span, 1)) {
        int64_t t = tclk.ns + (int64_t)((d * tclk.mult) >> 32);
        t = t < tclk.last ? tclk.last : t;   /* the floor: by at most ENG_CLOCK_BACK_NS here */
        tclk.last = t;
        return t;
    }
    return price_clock_anchor();
#else
    return now_ns(CLOCK_REALTIME);
#endif
}

int64_t eng_price_clock_ns(void) { return price_clock(); }

/* ==== state word ============================================================== */

#define SW_KEEP      (ENG_SW_STATE_MASK | ENG_SW_ERROR | ENG_SW_CTX | \
                      (ENG_SW_GEN_MASK << ENG_SW_GEN_SHIFT))
/* the bits a commit changes: what waiters and consistent readers watch */
#define SW_COMMITTED (ENG_SW_STATE_MASK | ENG_SW_CTX | (ENG_SW_GEN_MASK << ENG_SW_GEN_SHIFT))

static inline uint32_t sw_state(uint64_t w) { return (uint32_t)(w & ENG_SW_STATE_MASK); }
static inline int sw_locked(uint64_t w) { return (w & ENG_SW_LOCK) != 0; }
static inline uint32_t sw_gen(uint64_t w) { return (uint32_t)((w >> ENG_SW_GEN_SHIFT) & ENG_SW_GEN_MASK); }
static inline uint32_t sw_owner(uint64_t w) { return (uint32_t)((w >> ENG_SW_OWNER_SHIFT) & ENG_TOKEN_MASK); }
static inline uint32_t sw_target(uint64_t w) { return (uint32_t)((w >> ENG_SW_TARGET_SHIFT) & ENG_SW_TARGET_MASK); }
static inline uint32_t sw_ctx(uint64_t w) { return (w & ENG_SW_CTX) ? 1u : 0u; }

/* An unlocked word: state, generation and published context copy. */
static inline uint64_t sw_make(uint32_t onehot, uint32_t gen, uint32_t ctx)
{
    return (uint64_t)onehot | ((uint64_t)(gen & ENG_SW_GEN_MASK) << ENG_SW_GEN_SHIFT)
         | (ctx ? ENG_SW_CTX : 0);
}

/* w locked by token for a move to target; unlocking restores w exactly. */
static inline uint64_t sw_make_locked(uint64_t w, uint32_t target, uint32_t token)
{
    return (w & SW_KEEP) | ENG_SW_LOCK | ((uint64_t)target << ENG_SW_TARGET_SHIFT)
         | ((uint64_t)token << ENG_SW_OWNER_SHIFT);
}

static inline uint64_t sw_unlocked(uint64_t locked) { return locked & SW_KEEP; }

static inline uint32_t onehot_index(uint32_t onehot) { return (uint32_t)__builtin_ctz(onehot); }

/* ==== ids ======================================================================= */

static inline uint32_t id_opening(uint64_t id) { return (uint32_t)(id >> ENG_ID_SLOT_BITS); }
static inline uint64_t make_id(uint32_t opening, uint32_t slot)
{
    return ((uint64_t)opening << ENG_ID_SLOT_BITS) | slot;
}

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
#define OP_FORWARDS(t, v)  op_count((t), offsetof(eng_op_metrics, rolled_forward), (v))
#define OP_BACKS(t, v)     op_count((t), offsetof(eng_op_metrics, rolled_back), (v))

/* ==== liveness: dead means proven dead ========================================= */
/*
 * An Engine holds an OFD write lock on its registry entry's first byte of the
 * segment file from before it claims the entry until it detaches.  The kernel
 * drops an OFD lock only when the last descriptor of its open file
 * description closes: the holder detached, or its process died (a zombie has
 * closed its files).  So "nobody holds entry i's lock" proves that whoever
 * claimed entry i is gone, in any pid namespace and however fast pids are
 * reused.  Any failure to ask the kernel means "alive": the caller keeps
 * waiting within its bound and reports CONFLICT or BUSY, which is always
 * safe; taking a live owner's lock never is.  Pid and start time stay in the
 * entry for people and tools (eng_proc_alive).
 */

static inline off_t entry_lock_offset(const eng_seg *s, uint32_t i)
{
    return (off_t)((const uint8_t *)&s->registry[i] - s->base);
}

static struct flock one_byte(short type, off_t off)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);   /* l_pid must be 0 for OFD locks */
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = off;
    fl.l_len = 1;
    return fl;
}

/* F_OFD_SETLK on one byte: 0, or -1 if another description holds it. */
static int ofd_setlk(int fd, off_t off, short type)
{
    struct flock fl = one_byte(type, off);
    return fcntl(fd, F_OFD_SETLK, &fl);
}

/* 1 while s->fd still names the segment file it was attached with.  Code
 * outside the engine may close that descriptor or dup2 another file over
 * it; then no answer about locks through it can be trusted. */
static int fd_is_segment(const eng_seg *s)
{
    struct stat st;
    return fstat(s->fd, &st) == 0 && (uint64_t)st.st_dev == s->fd_dev &&
           (uint64_t)st.st_ino == s->fd_ino;
}

/* 1 if another open file description holds the byte, 0 if none does,
 * -1 if the kernel could not say. */
static int ofd_held(int fd, off_t off)
{
    struct flock fl = one_byte(F_WRLCK, off);
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0)
        return -1;
    return fl.l_type != F_UNLCK;
}

/* Field 22 of /proc/<pid>/stat (start time in clock ticks after boot) and
 * field 3 (state letter).  Returns 0, or the errno that stopped the read
 * (EIO for a line it could not parse). */
static int read_proc_stat(uint32_t pid, uint64_t *start_time, char *state)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno ? errno : EIO;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int err = n < 0 ? errno : 0;
    close(fd);
    if (n <= 0)
        return err ? err : EIO;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');          /* comm may contain spaces and ')' */
    if (!p || p[1] != ' ')
        return EIO;
    p += 2;
    *state = *p;
    /* after ')' come fields 3..: skip 19 separators to reach field 22 */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return EIO;
        p++;
    }
    *start_time = strtoull(p, NULL, 10);
    return 0;
}

uint64_t eng_proc_start_time(uint32_t pid)
{
    uint64_t st = 0;
    char state;
    if (pid == 0 || read_proc_stat(pid, &st, &state) != 0)
        return 0;
    return st;
}

/* For tools: 0 only when pid is proven not to be the process that started at
 * start_time (0: any), as seen from this pid namespace. */
int eng_proc_alive(uint32_t pid, uint64_t start_time)
{
    if (pid == 0 || pid > (uint32_t)INT_MAX)
        return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
        return 0;
    uint64_t st = 0;
    char state = '?';
    int err = read_proc_stat(pid, &st, &state);
    if (err == ENOENT || err == ESRCH)
        return 0;
    if (err)
        return 1;                          /* could not tell: alive */
    if (state == 'Z' || state == 'X')
        return 0;
    return start_time == 0 || st == start_time;
}

/* For tools, through any descriptor of the segment file: 1 if registry
 * entry `entry`'s liveness lock is held (its Engine is attached), 0 if not,
 * < 0 if the kernel could not say. */
int eng_entry_held(int fd, uint64_t registry_off, uint32_t entry)
{
    if (fd < 0 || entry >= ENG_MAX_PROCS || registry_off > (uint64_t)INT64_MAX / 2)
        return ENG_EBADARG;
    return ofd_held(fd, (off_t)(registry_off + (uint64_t)entry * sizeof(eng_proc)));
}

/* 1 only when the owner named by token is proven gone: its registry entry
 * moved to another incarnation or was freed, or nobody holds the entry's
 * liveness lock. */
static int token_dead(eng_seg *s, uint32_t token)
{
    if (token == s->token)
        return 0;
    uint32_t i = token & ENG_TOKEN_ENTRY_MASK;
    uint32_t inc = token >> ENG_TOKEN_ENTRY_BITS;
    eng_proc *e = &s->registry[i];
    if (load_acquire_u32(&e->incarnation) != inc)   /* pairs with the claim in eng_attach */
        return 1;
    int freed = load_acquire_u32(&e->pid) == 0;
    int held = freed ? 0 : ofd_held(s->fd, entry_lock_offset(s, i));
    fence_acquire();
    if (load_relaxed_u32(&e->incarnation) != inc)
        return 1;                          /* claimed again while we looked */
    return freed || (held == 0 && fd_is_segment(s));
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
    uint64_t tindex_off, accounts_off, size;
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
                             uint32_t max_accounts)
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
    return l;
}

uint64_t eng_segment_size(uint32_t capacity, uint32_t n_words, uint32_t keys_per_position,
                          uint32_t max_accounts)
{
    if (capacity == 0 || capacity > ENG_MAX_CAPACITY || n_words > ENG_MAX_FIELD_WORDS ||
        keys_per_position > ENG_MAX_KEYS_PER_POSITION || max_accounts > ENG_MAX_ACCOUNTS)
        return 0;
    return compute_layout(capacity, n_words, keys_per_position, max_accounts).size;
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
                           ENG_FAULT_DIE_IN_TINDEX_DEL | ENG_FAULT_DIE_IN_EXIT)

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
               uint32_t max_accounts)
{
    if (!base || !table || !rec || capacity == 0 || capacity > ENG_MAX_CAPACITY ||
        !rec_layout_ok(rec) || max_accounts > ENG_MAX_ACCOUNTS)
        return ENG_EBADARG;
    layout l = compute_layout(capacity, rec->n_words, rec->keys_per_position, max_accounts);
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
    layout l = compute_layout(h->capacity, h->rec.n_words, h->rec.keys_per_position,
                              h->max_accounts);
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
        {"accounts_off", offsetof(eng_header, accounts_off), offsetof(layout, accounts_off)}};
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
    memset(s, 0, sizeof *s);
    s->base = base;
    s->size = size;
    s->hdr = h;   /* the live header: its controls (halted, metrics, ...) */
    s->registry = (eng_proc *)((uint8_t *)base + hc.registry_off);
    s->shards = (eng_shard *)((uint8_t *)base + hc.shards_off);
    s->slots = (uint8_t *)base + hc.slots_off;
    s->keyrecs = (eng_keyrec *)((uint8_t *)base + hc.keyrecs_off);
    s->keyidx = (uint64_t *)((uint8_t *)base + hc.keyidx_off);
    s->stripes = (uint32_t *)((uint8_t *)base + hc.stripes_off);
    s->tindex = (uint64_t *)((uint8_t *)base + hc.tindex_off);
    s->tindex_buckets = hc.tindex_buckets;
    s->accounts = (eng_account *)((uint8_t *)base + hc.accounts_off);
    s->max_accounts = hc.max_accounts;
    s->slot_size = hc.slot_size;
    s->rec_size = hc.rec_size;
    s->n_words = hc.rec.n_words;
    s->kpp = hc.rec.keys_per_position;
    s->key_buckets = hc.key_buckets;
    s->key_seed = hc.key_seed;
    memcpy(s->roles, hc.rec.roles, sizeof s->roles);
    s->acct_role = s->roles[ENG_ROLE_ACCOUNT];
    s->pnl = s->roles[ENG_ROLE_ENTRY_PRICE] != ENG_ROLE_NONE &&
             s->roles[ENG_ROLE_AMOUNT] != ENG_ROLE_NONE &&
             s->roles[ENG_ROLE_SIDE] != ENG_ROLE_NONE;
    s->exit_armed = hc.rec.exit_state == ENG_EXITS_NONE ? 0 : 1u << hc.rec.exit_state;
    s->exit_trigger = hc.rec.exit_trigger;
    s->reopens = (uint32_t)table_reopens(hc.table, hc.n_states, hc.initial_index,
                                         hc.closed_mask);
    s->capacity = hc.capacity;
    s->n_triggers = hc.n_triggers;
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

/* ==== the latch-seqlock: two copies and a word ================================== */
/*
 * Every versioned record in the segment -- a slot's price, a slot's context,
 * an account's books -- is two copies and one 64-bit word that names the
 * published copy and moves with every publish.  A writer first owns the word
 * (the price latch, the slot's transition lock, the account latch: each puts
 * the owner's token in it; their own sections say how they are taken), then:
 *
 *   writer (owns the word: L):                  reader (never waits):
 *     W0 fence (release)                          w1 = word (acquire)      [pairs with W3]
 *     W1 fill the copy L does NOT name            R1 copy the copy w1 names (relaxed words)
 *        (relaxed words)                          R2 fence (acquire)       [pairs with W0]
 *     W2 seal = L (release), if it has a seal     w2 = word (relaxed)
 *     W3 CAS L -> next, which names W1's copy     retry unless w1 and w2 agree on
 *                                                 the bits every publish moves
 *
 * If w1 and w2 agree, nobody published while the read ran, so nobody wrote
 * the copy read: the owner of the word writes the other copy, and a later
 * owner starts only after a publish, which moves the word.  W0/R2 make this
 * hold on weakly ordered CPUs too: a reader that saw any word of a later
 * writer's W1 also sees the word that writer advanced from, so its w2
 * differs.  W3 is one CAS from exactly L: it publishes and gives the word up
 * in one step, so a writer whose word was taken over (its owner proven dead)
 * never makes its copy visible.  The seal (W2, written last) is what a
 * takeover decides by: a copy sealed with the exact owned word was whole
 * before its owner stopped.
 *
 *   seq_read_acquire(s, &word, watch, copy_fn, obj, out, &w1)   the reader
 *   seq_fill_release(dst, src, nwords, seal, L)                  W0-W2
 *   seq_publish_acq_rel(&word, L, next)                          W3
 *
 * Guarantees: a reader never waits for a writer, not even one killed
 * mid-write, and never returns a torn copy; versions never go backwards;
 * nothing a taken-over writer wrote becomes visible.
 * Does not guarantee: progress for a reader while writers publish back to
 * back forever (ENG_EBUSY after READ_RETRIES tries); telling apart two
 * words that agree on every watched bit (a 16-bit generation that wrapped
 * during one read).
 */

/* R1 of a reader: copy into out what obj publishes under word value w. */
typedef void (*seq_copy_fn)(eng_seg *s, const void *obj, uint64_t w, void *out);

/* The reader (R0-R2): 0 with *out_w = the word the copy belongs to, or
 * ENG_EBUSY.  watch: the bits of the word every publish moves. */
static inline int seq_read_acquire(eng_seg *s, const uint64_t *word, uint64_t watch,
                                   seq_copy_fn copy, const void *obj, void *out,
                                   uint64_t *out_w)
{
    for (uint32_t i = 0; i < READ_RETRIES; i++) {
        uint64_t w1 = load_acquire_u64(word);                      /* pairs with W3 */
        copy(s, obj, w1, out);                                     /* R1 */
        fence_acquire();                                           /* R2: pairs with W0 */
        if (__builtin_expect(((load_relaxed_u64(word) ^ w1) & watch) == 0, 1)) {
            *out_w = w1;
            return 0;
        }
        if (i > SPIN_STEPS)
            sched_yield();
    }
    return ENG_EBUSY;
}

/* W0-W2: the owner of L fills the unpublished copy dst from src (nwords
 * words of its own, private memory: read plainly) and, if the record has a
 * seal, seals it with L, last. */
static inline void seq_fill_release(void *dst, const void *src, size_t nwords, uint64_t *seal,
                                    uint64_t L)
{
    uint64_t *d = dst;
    const uint64_t *from = src;
    fence_release();                                               /* W0 */
#pragma GCC unroll 4   /* a price copy (4 words) stays in registers */
    for (size_t i = 0; i < nwords; i++)
        store_relaxed_u64(&d[i], from[i]);                         /* W1 */
    if (seal)
        store_release_u64(seal, L);                                /* W2 */
}

/* W3: publish and give the word up, by one CAS from exactly L.  0, or
 * ENG_EBUSY if L was taken over (nothing became visible). */
static inline int seq_publish_acq_rel(uint64_t *word, uint64_t L, uint64_t next)
{
    return cas_acq_rel_u64(word, &L, next) ? 0 : ENG_EBUSY;
}

/* ==== the price word: the price latch ============================================ */
/*
 * A slot's price is a latch-seqlock (above) whose word is eng_slot.pword:
 * sequence (the version) above the writer's token; copy seq & 1 is the
 * published one.  The latch is CAS (q, 0) -> (q, token); a holder that keeps
 * it past the bound is checked, and if it is proven dead the latch is taken
 * over (its half-written copy was never published, so nothing needs repair).
 * Publishing is CAS (q, token) -> (q + 1, 0).  A price copy has no seal.
 */

#define PW_SEQ_BITS (~ENG_TOKEN_MASK)   /* what every publish moves */

static inline uint64_t pw_seq(uint64_t pw) { return pw >> ENG_PW_SEQ_SHIFT; }
static inline uint32_t pw_token(uint64_t pw) { return (uint32_t)(pw & ENG_TOKEN_MASK); }

static void copy_price(eng_seg *s, const void *obj, uint64_t pw, void *out)
{
    (void)s;
    const eng_slot *sl = obj;
    copy_words_relaxed(out, &sl->price[pw_seq(pw) & 1], REC_WORDS(eng_price_rec));
}

static int read_price_rec(const eng_slot *sl, eng_price_rec *out, uint64_t *version)
{
    uint64_t pw;
    int rc = seq_read_acquire(NULL, &sl->pword, PW_SEQ_BITS, copy_price, sl, out, &pw);
    if (rc == 0)
        *version = pw_seq(pw);
    return rc;
}

/* The latch's back-off loop, from step `from` on. */
static int price_latch_wait(eng_seg *s, eng_slot *sl, op_timer t, uint64_t *latched,
                            uint32_t from)
{
    for (uint32_t step = from; step < MAX_WAIT_STEPS; step++) {
        uint64_t cur = load_relaxed_u64(&sl->pword);
        uint32_t holder = pw_token(cur);
        if (holder == 0 || (time_to_check_owner(step) && token_dead(s, holder))) {
            uint64_t mine = (cur & ~ENG_TOKEN_MASK) | s->token;
            if (cas_acq_rel_u64(&sl->pword, &cur, mine)) {
                if (holder)
                    OP_TAKEOVERS(t, 1);
                *latched = mine;
                return 0;
            }
        }
        OP_RETRIES(t, 1);
        backoff_step(step);
    }
    return ENG_EBUSY;
}

/* Take the latch; *latched receives the latched word.  Step 0 of the loop
 * inline (a free latch: one CAS), the rest out of line. */
static inline int price_latch(eng_seg *s, eng_slot *sl, op_timer t, uint64_t *latched)
{
    uint64_t cur = load_relaxed_u64(&sl->pword);
    uint64_t mine = (cur & ~ENG_TOKEN_MASK) | s->token;
    if (pw_token(cur) == 0 && cas_acq_rel_u64(&sl->pword, &cur, mine)) {
        *latched = mine;
        return 0;
    }
    OP_RETRIES(t, 1);
    backoff_step(0);
    return price_latch_wait(s, sl, t, latched, 1);
}

/* Publish rec and unlatch (W0-W3).  ENG_EBUSY if the latch was taken over
 * meanwhile (nothing became visible). */
static inline int price_publish(eng_slot *sl, uint64_t latched, const eng_price_rec *rec)
{
    uint64_t q = pw_seq(latched);
    seq_fill_release(&sl->price[(q + 1) & 1], rec, REC_WORDS(eng_price_rec), NULL, 0);
    return seq_publish_acq_rel(&sl->pword, latched, (q + 1) << ENG_PW_SEQ_SHIFT);
}

/* Unlatch without publishing: 0, or ENG_EBUSY if it was not latched so. */
static int price_unlatch(eng_slot *sl, uint64_t latched)
{
    return seq_publish_acq_rel(&sl->pword, latched, latched & ~ENG_TOKEN_MASK);
}

static inline int price_ok(double p) { return isfinite(p) && p > 0.0; }

/* Open, holding the price latch: the opening's PnL inputs, beside the price
 * word (ordered before any later latch holder by our publish, W3). */
static inline void price_set_pnl(eng_slot *sl, double entry, double size)
{
    store_relaxed_u64(&sl->pnl_entry, f8_bits(entry));
    store_relaxed_u64(&sl->pnl_size, f8_bits(size));
}

/* Holder of the price latch: the record of price at ts, with PnL from the
 * inputs open left beside the price word (0 when the spec has no PnL
 * roles).  size = amount x side, and side is its sign: this is pnl_pct =
 * (price - entry) / entry * 100 * side and pnl_usd = (price - entry) *
 * amount * side, bit for bit (a product with +-1 is exact). */
static inline void price_rec_at(const eng_seg *s, const eng_slot *sl, eng_price_rec *r,
                                double price, int64_t ts)
{
    r->price = price;
    r->ts_ns = ts;
    r->pnl_pct = r->pnl_usd = 0.0;
    if (s->pnl) {
        double entry = as_f8(load_relaxed_u64(&sl->pnl_entry));
        double size = as_f8(load_relaxed_u64(&sl->pnl_size));
        double diff = price - entry;
        r->pnl_pct = diff / entry * 100.0 * copysign(1.0, size);
        r->pnl_usd = diff * size;
    }
}

/* The trailing peak pair of exits (see "exits fired by the price"): after
 * the slot's record copies; peaks[q & 1] belongs to price sequence q. */
static inline uint64_t *slot_peaks(const eng_seg *s, const eng_slot *sl)
{
    return (uint64_t *)((uint8_t *)sl + ENG_SLOT_HEAD + 2ULL * s->rec_size);
}

/* Holder of the price latch `latched`: the peak that its publish makes the
 * slot's (ordered before the publish by W3, read only by latch holders). */
static inline void exit_peak_set(const eng_seg *s, const eng_slot *sl, uint64_t latched, double peak)
{
    store_relaxed_u64(&slot_peaks(s, sl)[(pw_seq(latched) + 1) & 1], f8_bits(peak));
}

/* ==== contexts: published by the state word ===================================== */
/*
 * A slot's context is a latch-seqlock (above) whose word is the state word:
 * its C bit names the published copy, and the transition lock (see
 * transitions) is what owns it.  The copy's `commit` field is its seal: the
 * exact locked word it was written under, so a takeover rolls forward only
 * when it equals the locked word it finds.  The commit CAS flips C, so the
 * context and the state become visible in one step.  Readers watch state,
 * generation and C: a lock taken meanwhile does not move them.
 *
 * The copy a reader reads is written only by a holder that locked after the
 * commit that made it unpublished again, which moved the generation; W0/R2
 * make a reader that saw any of its words also see that generation.
 */

static inline eng_slot *slot_at(const eng_seg *s, uint32_t i)
{
    return (eng_slot *)(s->slots + (uint64_t)i * s->slot_size);
}

/* Record copy c (0 or 1) of a slot; only its first rec_size bytes exist. */
static inline eng_ctx_rec *copy_of(const eng_seg *s, const eng_slot *sl, uint32_t c)
{
    return (eng_ctx_rec *)((uint8_t *)sl + sizeof(eng_slot) + c * s->rec_size);
}

static inline uint32_t rec_words(const eng_seg *s) { return ENG_REC_META_WORDS + s->n_words; }

typedef struct ctx_view {
    eng_ctx_rec *rec;
    uint32_t opening;        /* changes only while the slot is free: inside the window */
} ctx_view;

static void copy_ctx(eng_seg *s, const void *obj, uint64_t w, void *out)
{
    const eng_slot *sl = obj;
    ctx_view *v = out;
    v->opening = load_relaxed_u32(&sl->opening);
    copy_words_relaxed(v->rec, copy_of(s, sl, sw_ctx(w)), rec_words(s));
}

/* Read the published context with the word it belongs to. */
static int read_ctx(eng_seg *s, const eng_slot *sl, eng_ctx_rec *out, uint64_t *word,
                    uint32_t *opening)
{
    ctx_view v = {out, 0};
    int rc = seq_read_acquire(s, &sl->word, SW_COMMITTED, copy_ctx, sl, &v, word);
    if (rc == 0 && opening)
        *opening = v.opening;
    return rc;
}

/* ==== id checks ================================================================== */

static inline int slot_of_id(eng_seg *s, uint64_t id, eng_slot **out)
{
    if (id > ENG_ID_MAX || (id & ENG_ID_SLOT_MASK) >= s->capacity)
        return ENG_EBADSLOT;
    *out = slot_at(s, (uint32_t)(id & ENG_ID_SLOT_MASK));
    return 0;
}

/* 0 if the slot's word w (loaded with acquire) and its opening count
 * (loaded after it) belong to the opening named by id. */
static inline int opening_check(uint64_t w, uint32_t cur, uint64_t id)
{
    uint32_t want = id_opening(id);
    if (want == cur && sw_state(w))
        return 0;
    if (want == 0 || want > cur)
        return ENG_ENOTOPEN;
    return ENG_ESTALE;
}

static inline int id_live(const eng_slot *sl, uint64_t w, uint64_t id)
{
    return opening_check(w, load_relaxed_u32(&sl->opening), id);
}

/* The id's slot and state word (acquire), and 0 if the id names the slot's
 * open opening. */
static inline int id_word(eng_seg *s, uint64_t id, eng_slot **sl, uint64_t *w)
{
    int rc = slot_of_id(s, id, sl);
    if (rc)
        return rc;
    *w = load_acquire_u64(&(*sl)->word);
    return id_live(*sl, *w, id);
}

/* ---- preambles of the exported calls ----------------------------------------
 * The view first (closed, forked), then the caller's own argument check
 * (arg_rc: 0, or the error it found), then the id, in that order: a call
 * given several bad arguments always names the same one. */

/* A call by id that needs the opening open now: its slot and state word. */
static inline int enter_id(eng_seg *s, uint64_t id, int arg_rc, eng_slot **sl, uint64_t *w)
{
    int rc = seg_error(s);
    if (rc == 0)
        rc = arg_rc;
    return rc ? rc : id_word(s, id, sl, w);
}

/* A call by id that checks the opening itself, where it reads: the slot. */
static inline int enter_slot(eng_seg *s, uint64_t id, eng_slot **sl)
{
    int rc = seg_error(s);
    return rc ? rc : slot_of_id(s, id, sl);
}

/* A transition: the slot, then the trigger. */
static inline int enter_transition(eng_seg *s, uint64_t id, uint32_t trigger, eng_slot **sl)
{
    int rc = enter_slot(s, id, sl);
    return rc == 0 && trigger >= s->n_triggers ? ENG_EBADTRIGGER : rc;
}

/* A call by slot index (tools): the index, then its output pointer. */
static inline int enter_index(eng_seg *s, uint32_t slot, int out_ok)
{
    int rc = seg_error(s);
    if (rc == 0 && slot >= s->capacity)
        rc = ENG_EBADSLOT;
    return rc == 0 && !out_ok ? ENG_EBADARG : rc;
}

/* A vector call: its output pointers (outs_ok), then its arrays (arrays_ok)
 * unless it has no element. */
static inline int enter_vector(eng_seg *s, int outs_ok, uint64_t n, int arrays_ok)
{
    int rc = seg_error(s);
    return rc == 0 && (!outs_ok || (n && !arrays_ok)) ? ENG_EBADARG : rc;
}

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
    if (__builtin_expect(load_relaxed_u32(&s->hdr->fault_flags) & fault, 0) && faults_allowed())
        kill(getpid(), SIGKILL);
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
    int forward = load_acquire_u64(&copy_of(s, sl, pending)->commit) == L;   /* pairs with W2 */
    uint32_t st = sw_state(L);
    uint64_t resolved = forward ? sw_make(1u << sw_target(L), sw_gen(L) + 1, pending)
                                : sw_unlocked(L) | (st ? ENG_SW_ERROR : 0);
    uint64_t expected = L;
    if (!cas_acq_rel_u64(&sl->word, &expected, resolved))
        return 0;
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
    if (ctx) {
        eng_ctx_rec *dst = copy_of(s, sl, c ^ 1);
        ctx->version = load_relaxed_u64(&copy_of(s, sl, c)->version) + 1;
        seq_fill_release((uint64_t *)dst + 1, (uint64_t *)ctx + 1, rec_words(s) - 1,
                         &dst->commit, L);
        c ^= 1;
    }
    test_pause(s);
    *nw = sw_make(1u << sw_target(L), next_gen(s, sw_gen(L)), c);
    return seq_publish_acq_rel(&sl->word, L, *nw);
}

/* Holder of L: publish (ctx_publish), then count the commit and wake. */
static int finish_locked(eng_seg *s, eng_slot *sl, uint64_t L, eng_ctx_rec *ctx)
{
    uint64_t nw;
    if (ctx_publish(s, sl, L, ctx, &nw) != 0)
        return ENG_CONFLICT;   /* taken over: only if we were proven dead */
    commit_after(s, sl, sw_unlocked(L), nw);
    return ENG_APPLIED;
}

/* Holder of L gives up: restore the word exactly. */
static void unlock_unchanged(eng_slot *sl, uint64_t L)
{
    seq_publish_acq_rel(&sl->word, L, sw_unlocked(L));
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

/* Resolve latch AL by its evidence (its holder is proven dead, or is us
 * after our slot commit failed).  1 forward, 2 back, 0 word moved / undecided. */
static int acct_resolve(eng_seg *s, eng_account *a, uint64_t AL, op_timer t)
{
    uint64_t v = aw_version(AL);
    eng_books *pend = &a->books[(v + 1) & 1];
    int forward = 0;
    if (load_acquire_u64(&pend->seal) == AL) {                     /* pairs with B3 */
        uint64_t ref = load_relaxed_u64(&pend->seal_slot);
        int d = ref ? slot_decision(s, ref, load_relaxed_u64(&pend->seal_word), t, 1) : 1;
        if (d < 0)
            return 0;
        forward = d;
    }
    uint64_t expected = AL;
    if (!cas_acq_rel_u64(&a->word, &expected, aw_make(forward ? v + 1 : v)))
        return 0;
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

typedef struct books_view {
    eng_books *b;
    uint64_t version;
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
}

/* A consistent read of the books (see the reader above); never waits. */
static int acct_read(eng_seg *s, const eng_account *a, eng_books *out, uint64_t *version,
                     uint32_t *latched)
{
    books_view v = {out, 0};
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
    if (ctx_publish(s, sl, L, c, &nw) != 0) {                      /* B4, B5 */
        acct_resolve(s, a, AL, t);   /* we were judged gone: the evidence decides */
        return ENG_CONFLICT;
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
        if (rc) {
            acct_unlatch(a, AL);
        } else {
            acct_write_pending(a, AL, &b, 0, 0);
            acct_publish(a, AL);   /* taken: a resolver rolled the sealed copy forward */
        }
    }
    op_end(t, rc == ENG_EVERSION ? ENG_CONFLICT : rc);
    return rc;
}

static inline int money_ok(int64_t m) { return m >= 0; }

int eng_open_account(eng_seg *s, int64_t cash, int64_t max_exposure, uint32_t max_positions,
                     int64_t max_loss, uint64_t *out_id)
{
    CHECK_SEG(s);
    if (!out_id)
        return ENG_EBADARG;
    if (!money_ok(cash) || !money_ok(max_exposure) || !money_ok(max_loss))
        return ENG_EBADMONEY;
    if (s->max_accounts == 0)
        return ENG_EACCTFULL;
    op_timer t = op_begin(s, ENG_OP_ACCOUNT);
    uint32_t n = s->max_accounts;
    uint32_t start = fetch_add_relaxed_u32(&s->hdr->account_hint, 1) % n;
    int rc = ENG_EACCTFULL;
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
        acct_write_pending(a, AL, &b, 0, 0);
        acct_publish(a, AL);
        *out_id = make_id(opening, i);
        rc = 0;
        break;
    }
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
    int rc = acct_read(s, &s->accounts[i], &r->b, &r->version, &r->latched);
    if (rc)
        return rc;
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
    uint32_t *lk = &s->stripes[b];
    for (uint32_t step = 0; step < MAX_WAIT_STEPS; step++) {
        uint32_t cur = load_relaxed_u32(lk);
        if (cur == 0 || (time_to_check_owner(step) && token_dead(s, cur))) {
            if (cas_acq_rel_u32(lk, &cur, s->token)) {
                if (cur)
                    OP_TAKEOVERS(t, 1);
                return 0;
            }
        }
        OP_RETRIES(t, 1);
        backoff_step(step);
    }
    return ENG_EBUSY;
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

/* A key argument (len bytes at key) as an eng_key, or ENG_EBADKEY. */
static int key_from(const char *key, uint32_t len, eng_key *k)
{
    if (!key || len < 1 || len > ENG_KEY_MAX)
        return ENG_EBADKEY;
    memset(k, 0, sizeof *k);
    k->len = (uint16_t)len;
    memcpy(k->key, key, len);
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

/* Insert key k for opening id (I1-I7). */
static int key_insert(eng_seg *s, uint64_t id, const eng_key *k, op_timer t)
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
        if (rc == 0) {
            die_if(s, ENG_FAULT_DIE_IN_KEY);
            uint64_t busy = kr_tag(ENG_KR_BUSY, s->token);
            if (!cas_acq_rel_u64(&kr->tag, &busy, kr_held(id)))    /* I6 */
                rc = ENG_EBUSY;   /* revoked: we were proven gone */
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
    rc = key_insert(s, id, &k, t);
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

static int tb_lock(eng_seg *s, uint32_t b, op_timer t, uint64_t *locked)
{
    uint64_t *p = &s->tindex[b];
    for (uint32_t step = 0; step < MAX_WAIT_STEPS; step++) {
        uint64_t cur = load_relaxed_u64(p);
        uint32_t holder = tb_holder(cur);
        if (holder == 0 || (time_to_check_owner(step) && token_dead(s, holder))) {
            uint64_t mine = tb_make(tb_head(cur), s->token);
            if (cas_acq_rel_u64(p, &cur, mine)) {   /* acquire: the chain as the last holder left it */
                if (holder)
                    OP_TAKEOVERS(t, 1);
                *locked = mine;
                return 0;
            }
        }
        OP_RETRIES(t, 1);
        backoff_step(step);
    }
    return ENG_EBUSY;
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
        if (key) {
            rc = key_insert(s, id, &kbuf, t);   /* visible once the opening commits */
            if (rc) {
                unlock_unchanged(sl, L);
                break;
            }
        }
        if (s->roles[ENG_ROLE_TOKEN] != ENG_ROLE_NONE) {
            if ((rc = tindex_place(s, slot, token_of(s, c.w), t, &tb_busy)) != 0) {
                unlock_unchanged(sl, L);
                if (key)
                    keys_drop(s, id);
                if (rc != TB_SKIP)
                    break;   /* the token's chain busy (every slot needs it), or corrupt */
                rc = ENG_EBUSY;
                continue;   /* a live holder sits on this slot's old chain: try another */
            }
            placed = slot;   /* a refused open unlinks it again, below */
        }
        uint64_t latched;
        if (price_latch(s, sl, t, &latched) != 0) {
            unlock_unchanged(sl, L);   /* a live writer sits on this slot's price */
            if (key)
                keys_drop(s, id);
            if (placed == slot)
                tindex_drop(s, slot);
            rc = ENG_EBUSY;
            continue;
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
        if (price_publish(sl, latched, &r) != 0) {
            unlock_unchanged(sl, L);   /* our latch was taken: we were judged gone */
            rc = ENG_EBUSY;
            break;
        }
        if (acct) {
            eng_account *a;
            uint64_t AL;
            rc = book_position(s, sl, L, &c, BOOK_OPEN, 0.0, t, &a, &AL);   /* reserve */
            if (rc) {
                unlock_unchanged(sl, L);
                if (key)
                    keys_drop(s, id);
                break;
            }
            rc = finish_booked(s, sl, L, &c, a, AL, t);
        } else {
            rc = finish_locked(s, sl, L, &c);
        }
        if (rc == ENG_APPLIED) {
            *out_id = id;
            *out_word = s->last_new_word;
        }
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
    if (!cas_acq_rel_u64(&sl->word, &w, nw))
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
        if (cas_acq_rel_u64(&sl->word, &w, nw)) {
            commit_after(s, sl, old, nw);
            keys_drop(s, id);   /* already stale; clear them for the next inserts */
            tindex_drop(s, (uint32_t)(id & ENG_ID_SLOT_MASK));
            return ENG_APPLIED;
        }
        backoff_step(retries / 4);
    }
    return ENG_CONFLICT;
}

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

/* Copy for a writer's check: the opening, the token and, if w is in the
 * armed state, the levels of the copy w publishes. */
static inline double level_of(const eng_seg *s, const eng_ctx_rec *c, uint32_t role)
{
    uint8_t wi = s->roles[role];
    return wi == ENG_ROLE_NONE ? 0.0 : as_f8(load_relaxed_u64(&c->w[wi]));
}

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

/* Write price at ts into sl if, under its latch, it holds the open opening
 * the id `key` names (BY_ID) or an open position on token `key` (BY_TOKEN).
 * Returns 0, ENG_ESTALE (nothing written), or ENG_EBUSY. */
ALWAYS_INLINE int write_price_checked(eng_seg *s, eng_slot *sl, double price, int64_t ts,
                                      op_timer t, int by, uint64_t key)
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
    rc = write_price_checked(s, sl, price, price_clock(), t, BY_ID, id);
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
    uint64_t written = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (i + ENG_BATCH_PREFETCH < n)
            prefetch_slot(s, ids[i + ENG_BATCH_PREFETCH]);
        uint64_t id = ids[i];   /* checked again: the caller's arrays may change under us */
        double price = prices[i];
        rc = batch_arg_check(s, id, price);
        if (rc == 0)
            rc = write_price_checked(s, slot_at(s, (uint32_t)(id & ENG_ID_SLOT_MASK)), price, ts,
                                     t, BY_ID, id);
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
        rc = write_price_checked(s, sl, price, ts, t, BY_TOKEN, (uint64_t)token);
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
