/*
 * internal.h - what every concern uses, first in the unit: atomics (memory
 * order in the name), bounded back-off, clocks, the state word, ids, metrics
 * timers, liveness (dead means proven dead) and the futex: mostly the static
 * inline helpers the hot calls inline, and the few exported calls that
 * belong to them (eng_price_clock, eng_proc_start_time, eng_proc_alive,
 * eng_entry_held).
 *
 * Part of the engine's single translation unit: compiled only through
 * engine.c, which includes every part in order (see there).
 */

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
    case ENG_REJECTED:
    case ENG_ERISK_HALTED:      /* a risk limit said no: a refusal, not an error */
    case ENG_ERISK_EXPOSURE:
    case ENG_ERISK_COUNT:
    case ENG_ERISK_CASH: counter = &t.m->rejected; break;
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

/* Take lock word lk, which holds its owner's token: when it is free, or its
 * owner is proven dead (asked every few steps).  Bounded: ENG_EBUSY after
 * MAX_WAIT_STEPS back-off steps against a live owner. */
static int token_lock(eng_seg *s, uint32_t *lk, op_timer t)
{
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

/* The same for a 64-bit word whose low ENG_TOKEN_MASK bits hold its owner's
 * token (0: free) beside other fields: taken by one CAS cur -> (cur & keep) |
 * our token (keep: the fields the lock leaves as they are), from back-off
 * step `from` on; *locked receives the word taken.  The price latch
 * (records.h) and a token-index bucket's lock (token_index.c). */
static int token_lock_u64(eng_seg *s, uint64_t *word, uint64_t keep, op_timer t,
                          uint64_t *locked, uint32_t from)
{
    for (uint32_t step = from; step < MAX_WAIT_STEPS; step++) {
        uint64_t cur = load_relaxed_u64(word);
        uint32_t holder = (uint32_t)(cur & ENG_TOKEN_MASK);
        if (holder == 0 || (time_to_check_owner(step) && token_dead(s, holder))) {
            uint64_t mine = (cur & keep) | s->token;
            if (cas_acq_rel_u64(word, &cur, mine)) {   /* acquire: as the last holder left it */
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

/* ==== futex ==================================================================== */

/* The futex word is the low 32 bits of the slot's transition counter
 * (little-endian is asserted in the header): one RMW per commit serves both. */
static inline uint32_t *futex_word(eng_slot *sl) { return (uint32_t *)&sl->transitions; }

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    /* shared (non-private) ops: the word lives in memory mapped by many processes */
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}
