/* ==== the journal on disk: the file writer, flush, checkpoints ==================== */
/*
 * Protocol.  The files' format is engine.h's ("The journal on disk").  A
 * durable segment has a durable area (eng_durable) after its journal ring.
 * Every attached Engine runs a writer (eng_durable_run in a thread of its
 * own); the one holding the lease writes, the others watch the holder.
 *
 *   lease word: the holder's token (0: none).  Taken by CAS when free or when
 *     its holder is proven dead (token_dead: its process is gone, so no write
 *     of it is still in flight); given back (store 0, wake) at close.
 *   written_seq: every record <= it is in the files.  Only the holder moves
 *     it, after its pwrite returned (release; pairs with journal_room's and
 *     a flusher's acquire).  The frame of seq k sits at a fixed place:
 *     file first(k) = 1 + ((k - 1) / file_records) * file_records, offset
 *     ENG_DJ_FILE_HDR + (k - first(k)) * ENG_DJ_FRAME_BYTES.  So a new holder
 *     resumes at written_seq + 1 with nothing else to trust: a predecessor
 *     killed mid-write left at most frames after written_seq (whole and
 *     equal to what it rewrites, or torn), which it writes over.
 *   durable_seq: every record <= it is fdatasynced.  Raised (max, CAS) by
 *     whoever fdatasyncs the file of a written_seq it read; a file is
 *     fdatasynced whole before the first frame of the next is written, so
 *     only the file of written_seq can hold unsynced frames (gone when
 *     fdatasynced: a checkpoint's prune, after it made the journal durable
 *     past it; durable_seq >= the W read tells).  It may stop
 *     inside a commit (a batch, a file or another process's fdatasync ends
 *     anywhere), and a restore cuts a commit whose riders are missing.
 *   written_commit_seq, durable_commit_seq: the same two, kept at commit
 *     ends.  A writer that wrote up to a published journal seq (J4 publishes
 *     a commit's records together, so it ends one) raises written_commit_seq
 *     to it after written_seq; an fdatasync raises durable_commit_seq to the
 *     written_commit_seq it read before written_seq.  durable_commit_seq is
 *     what eng.durable_seq reports: every change <= it survives a power cut.
 *   journal_room (every commit, before its records are filled; seq: its
 *     last possible one, n + ENG_JOURNAL_MAX_FILL with riders): seq <=
 *     written_seq + ring records and seq <= reserved_seq (its frame has a
 *     place in a preallocated file: the writer reserves the next file half a
 *     file ahead, so a full disk refuses commits before one lacks a place),
 *     or a bounded wait, then ENG_EJOURNALFULL;
 *     a writer failure (reservation, I/O) refuses at once (ENG_EDURABLE,
 *     fail-stop): the ring never overwrites a record the files lack, and
 *     nothing commits that cannot be journaled.  failure > 0: a reservation
 *     failed (whichever Engine holds the lease retries it every
 *     ENG_DJ_RETRY_NS and clears it); < 0: a write or an fdatasync failed
 *     (never retried: what the kernel dropped is unknown; restore).
 *
 *   writer (holder)                              committer (journal_room)
 *     n = journal seq; read (written, n]            W = written_seq (acquire)
 *     pwrite frames at their places                 seq <= W + records: go
 *     written_seq = last (release); wake            else sleep on written_seq, bounded
 *     every sync_ns: fdatasync, durable_seq = W
 *
 * Checkpoints (eng_durable_checkpoint, any process; one at a time under
 * ckpt_lock, a dead holder's lock taken over): S = the journal seq read
 * before the scan, then one frame per object read consistently (each under
 * its own seqlock or from its published copy), written to a .tmp, fsynced,
 * renamed.  The scan is fuzzy -- objects change while it runs -- and that is
 * fine: every change after S has its record with a seq > S, restore applies
 * the checkpoint and then every record after S in order, and the last record
 * of each object wins; an object the scan saw after such a change is set
 * again to the same value by the record.  Before the rename the journal is
 * made durable past the scan's end, so no change the scan saw is missing from
 * the journal after a power failure (cross-object invariants, the books, hold
 * after the replay).  A lease holder's scan keeps writing the ring every
 * ENG_DJ_CKPT_WRITE_EVERY objects.  Journal files wholly before the
 * previous checkpoint's S are removed (two checkpoints stay restorable).
 *
 * Does not guarantee: progress while a live lease holder is stopped
 * (SIGSTOP): commits wait ENG_DJ_ROOM_WAIT_NS once the ring is full, then
 * ENG_EJOURNALFULL; durability of what is not yet fdatasynced against a
 * power failure (at most sync_ns of records, plus one fdatasync); writing
 * anything for a segment whose creator died before eng_durable_setup (commits
 * stop once the ring is full); a journal that starts again at seq 1 in a
 * directory holding one (the frame of seq k has one place: a restored engine
 * continues the seqs, or journals into a fresh directory).
 */

#include <sys/uio.h>
#include <dirent.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

static inline void store_seq_cst_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t load_seq_cst_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline int32_t load_acquire_i32(const int32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_release_i32(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* ---- CRC-32C (Castagnoli): the crc32 instruction where there is one ------------ */

static uint32_t crc32c_table[8][256];
static int crc32c_mode = -1;   /* -1 undecided, 0 table, 1 hardware */

static void crc32c_init_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc32c_table[t][i] = (crc32c_table[t - 1][i] >> 8) ^
                                 crc32c_table[0][crc32c_table[t - 1][i] & 0xFF];
}

static uint32_t crc32c_sw(uint32_t c, const uint8_t *p, uint64_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = crc32c_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= c;
        c = crc32c_table[7][v & 0xFF] ^ crc32c_table[6][(v >> 8) & 0xFF] ^
            crc32c_table[5][(v >> 16) & 0xFF] ^ crc32c_table[4][(v >> 24) & 0xFF] ^
            crc32c_table[3][(v >> 32) & 0xFF] ^ crc32c_table[2][(v >> 40) & 0xFF] ^
            crc32c_table[1][(v >> 48) & 0xFF] ^ crc32c_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = crc32c_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t c, const uint8_t *p,
                                                           uint64_t n)
{
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}
#endif

/* Decide once: the hardware instruction if the CPU has it and it gives the
 * known answer for "123456789" (0xE3069283), else the table. */
static int crc32c_decide(void)
{
    int m = __atomic_load_n(&crc32c_mode, __ATOMIC_ACQUIRE);
    if (m >= 0)
        return m;
    crc32c_init_table();
    static const uint8_t vec[] = "123456789";
    m = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && ~crc32c_hw(~0u, vec, 9) == 0xE3069283u)
        m = 1;
#endif
    if (!m && ~crc32c_sw(~0u, vec, 9) != 0xE3069283u)
        abort();   /* the table itself is wrong: never write a frame with it */
    __atomic_store_n(&crc32c_mode, m, __ATOMIC_RELEASE);   /* after the table */
    return m;
}

/* The CRC-32C of n bytes at p, continuing crc (0 to start): zlib's convention. */
uint32_t eng_crc32c(uint32_t crc, const void *p, uint64_t n)
{
    int hw = crc32c_decide();
#if defined(__x86_64__)
    if (hw)
        return ~crc32c_hw(~crc, p, n);
#endif
    (void)hw;
    return ~crc32c_sw(~crc, p, n);
}

/* 1: the crc32 instruction is used. */
int eng_crc32c_hw(void) { return crc32c_decide(); }

/* ---- process-local writer state --------------------------------------------------- */

struct eng_dw {
    pthread_mutex_t mu;      /* one writer step of this Engine at a time (thread, flush, close) */
    uint32_t stop;           /* 1: eng_durable_run returns */
    int32_t  fd;             /* the journal file open for writing (-1: none) */
    uint64_t fd_first;       /* ... and its first seq */
    int64_t  last_sync_ns;   /* CLOCK_MONOTONIC of this writer's last fdatasync */
    int64_t  last_fail_ns;   /* when this writer last failed (a reservation's retry) */
    char     dir[ENG_DJ_PATH_MAX];
    eng_jrec recs[ENG_DJ_BATCH];
    uint8_t  frames[ENG_DJ_BATCH * ENG_DJ_FRAME_BYTES];
};

eng_dw *eng_dw_new(void)
{
    eng_dw *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    pthread_mutex_init(&w->mu, NULL);
    w->fd = -1;
    return w;
}

void eng_dw_free(eng_dw *w)
{
    if (!w)
        return;
    if (w->fd >= 0)
        close(w->fd);
    free(w);
}

void eng_dw_stop(eng_dw *w, uint32_t stop)
{
    if (w)
        __atomic_store_n(&w->stop, stop, __ATOMIC_RELEASE);   /* pairs with the run loop's acquire */
}

static inline int dw_stopped(eng_dw *w) { return __atomic_load_n(&w->stop, __ATOMIC_ACQUIRE) != 0; }

/* ---- the room hook: called before a record is appended ------------------------- */

static __thread eng_durable_info durable_refused;   /* what the last refusal saw */

static void durable_fill_info(eng_seg *s, eng_durable_info *o)
{
    eng_durable *d = s->durable;
    memset(o, 0, sizeof *o);
    o->journal_seq = eng_journal_seq(s);
    o->written_seq = load_acquire_u64(&d->written_seq);
    o->durable_seq = load_acquire_u64(&d->durable_commit_seq);
    o->ckpt_start = load_acquire_u64(&d->ckpt_start);
    o->checkpoints = load_relaxed_u64(&d->checkpoints);
    o->failure = load_acquire_i32(&d->failure);
    o->lease = load_acquire_u32(&d->lease);
    o->writer_pid = load_relaxed_u32(&d->writer_pid);
    o->holder = o->lease != 0 && o->lease == s->token;
}

void eng_durable_refusal(eng_durable_info *out)
{
    if (out)
        *out = durable_refused;
}

static inline uint32_t *written_futex(eng_durable *d) { return (uint32_t *)&d->written_seq; }

/* Wake committers and flushers sleeping on written_seq (after it moved or the
 * writer failed).  The seq_cst load pairs with their seq_cst store of room_waiting. */
static inline void durable_wake_room(eng_durable *d)
{
    if (load_seq_cst_u32(&d->room_waiting) && exchange_seq_cst_u32(&d->room_waiting, 0))
        futex(written_futex(d), FUTEX_WAKE, INT_MAX, NULL);
}

/* Sleep on written_seq while it is still `seen_w` (at most ns). */
static void durable_sleep_written(eng_durable *d, uint64_t seen_w, int64_t ns)
{
    store_seq_cst_u32(&d->room_waiting, 1);
    uint32_t seen = load_seq_cst_u32(written_futex(d));
    if (load_seq_cst_u64(&d->written_seq) != seen_w || load_acquire_i32(&d->failure))
        return;
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    futex(written_futex(d), FUTEX_WAIT, seen, &ts);
}

static __attribute__((noinline)) int durable_room_wait(eng_seg *s, uint64_t seq)
{
    eng_durable *d = s->durable;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + ENG_DJ_ROOM_WAIT_NS;
    for (uint32_t step = 0;; step++) {
        if (load_acquire_i32(&d->failure)) {
            durable_fill_info(s, &durable_refused);
            return ENG_EDURABLE;
        }
        uint64_t w = load_acquire_u64(&d->written_seq);   /* pairs with the writer's release */
        if (seq <= w + s->jrecords && seq <= load_acquire_u64(&d->reserved_seq))
            return 0;
        if (step < YIELD_STEPS) {
            backoff_step(step);
            continue;
        }
        int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0) {
            durable_fill_info(s, &durable_refused);
            return ENG_EJOURNALFULL;
        }
        durable_sleep_written(d, w, left < 1000000 ? left : 1000000);
    }
}

/* The hook (journal.c's J1 calls it before taking the latch for record seq):
 * 0 when the record seq may be filled -- it overwrites seq - ring records,
 * which the files must already hold -- else ENG_EJOURNALFULL past a bounded
 * wait, or ENG_EDURABLE when the writer failed.  Nothing is changed either way. */
static inline int journal_room(eng_seg *s, uint64_t seq)
{
    eng_durable *d = s->durable;
    if (!d)
        return 0;
    if (__builtin_expect(seq <= load_acquire_u64(&d->written_seq) + s->jrecords &&
                         seq <= load_acquire_u64(&d->reserved_seq) &&
                         !load_relaxed_u32((const uint32_t *)&d->failure), 1))
        return 0;
    return durable_room_wait(s, seq);
}

/* ---- files -------------------------------------------------------------------------- */

static inline uint64_t dj_file_first(const eng_durable *d, uint64_t seq)
{
    uint64_t fr = load_relaxed_u64(&d->file_records);
    return 1 + ((seq - 1) / fr) * fr;
}

static inline off_t dj_offset(uint64_t first, uint64_t seq)
{
    return (off_t)(ENG_DJ_FILE_HDR + (seq - first) * (uint64_t)ENG_DJ_FRAME_BYTES);
}

static int dw_path(eng_dw *w, char *out, size_t n, const char *what, uint64_t seq,
                   const char *ext)
{
    int k = snprintf(out, n, "%s/%s-%020llu%s", w->dir, what, (unsigned long long)seq, ext);
    return k > 0 && (size_t)k < n ? 0 : ENAMETOOLONG;
}

static int fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int rc = fsync(fd) ? errno : 0;
    close(fd);
    return rc;
}

static int pwrite_all(int fd, const uint8_t *p, size_t n, off_t off)
{
    while (n) {
        ssize_t k = pwrite(fd, p, n, off);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        p += k;
        n -= (size_t)k;
        off += k;
    }
    return 0;
}

static inline int dj_fault(eng_seg *s, uint32_t f)
{
    return __builtin_expect(load_relaxed_u32(&s->durable->fault) & f, 0) && faults_allowed();
}

/* The directory, copied once from the segment (bounded: NUL-terminated here). */
static int dw_dir(eng_seg *s, eng_dw *w)
{
    if (w->dir[0])
        return 0;
    if (load_acquire_u32(&s->durable->state) != 1)   /* pairs with setup's release */
        return EAGAIN;
    memcpy(w->dir, s->durable->dir, sizeof w->dir);
    w->dir[sizeof w->dir - 1] = 0;
    return w->dir[0] ? 0 : ENOENT;
}

/* Reserve journal file `first`: a .tmp preallocated to its whole size (a
 * full disk fails here), its header, fdatasync, rename, the directory fsynced. */
static int dj_reserve(eng_seg *s, eng_dw *w, uint64_t first, int *out_fd)
{
    char path[ENG_DJ_PATH_MAX + 64], tmp[ENG_DJ_PATH_MAX + 64];
    int rc = dw_path(w, path, sizeof path, "journal", first, ".log");
    if (!rc)
        rc = dw_path(w, tmp, sizeof tmp, "journal", first, ".log.tmp");
    if (rc)
        return rc;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {   /* reserved before (by us or a predecessor): whole, header and all */
        rc = fsync_dir(w->dir);   /* a predecessor may have died before its directory fsync */
        if (rc) {
            close(fd);
            return rc;
        }
        *out_fd = fd;
        return 0;
    }
    if (errno != ENOENT)
        return errno;
    if (dj_fault(s, ENG_DJ_FAULT_NOSPACE))
        return ENOSPC;
    fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return errno;
    uint64_t fr = load_relaxed_u64(&s->durable->file_records);
    rc = posix_fallocate(fd, 0, (off_t)(ENG_DJ_FILE_HDR + fr * ENG_DJ_FRAME_BYTES));
    if (!rc) {
        uint8_t hdr[ENG_DJ_FILE_HDR] = {0};
        uint32_t h32[4] = {ENG_DJ_FILE_MAGIC, ENG_DJ_FORMAT, ENG_DJ_FRAME_BYTES, 0};
        memcpy(hdr, h32, sizeof h32);
        memcpy(hdr + 16, &first, 8);
        rc = pwrite_all(fd, hdr, sizeof hdr, 0);
    }
    if (!rc && fdatasync(fd))
        rc = errno;
    if (!rc && rename(tmp, path))
        rc = errno;
    if (!rc)
        rc = fsync_dir(w->dir);
    if (rc) {
        close(fd);
        unlink(tmp);
        return rc;
    }
    *out_fd = fd;
    return 0;
}

/* fdatasync journal file `first` (w->fd if it is that one). */
static int dj_sync_file(eng_dw *w, uint64_t first)
{
    if (w->fd >= 0 && w->fd_first == first)
        return fdatasync(w->fd) ? errno : 0;
    char path[ENG_DJ_PATH_MAX + 64];
    int rc = dw_path(w, path, sizeof path, "journal", first, ".log");
    if (rc)
        return rc;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return errno;
    rc = fdatasync(fd) ? errno : 0;
    close(fd);
    return rc;
}

static void durable_raise_to(uint64_t *p, uint64_t v)
{
    uint64_t cur = load_acquire_u64(p);
    while (cur < v && !cas_acq_rel_u64(p, &cur, v))
        ;
}

/* The writer failed with errno e (fail-stop: commits are refused from now).
 * failure > 0: a reservation failed (any holder retries it every
 * ENG_DJ_RETRY_NS); < 0: a write or an fdatasync failed (never retried: what
 * it lost is unknown). */
static void durable_fail(eng_seg *s, eng_dw *w, int e, int reservation)
{
    eng_durable *d = s->durable;
    w->last_fail_ns = now_ns(CLOCK_MONOTONIC);
    int32_t cur = load_acquire_i32(&d->failure), code = e ? e : EIO;
    /* a write or sync failure replaces a reservation's (it is never retried);
     * a CAS is lost only to another failure or a retry's clear: bounded */
    while ((cur == 0 || (cur > 0 && !reservation)) &&
           !__atomic_compare_exchange_n(&d->failure, &cur, reservation ? code : -code, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    durable_wake_room(d);
}

/* Open (reserving if need be) the file of seq `next`; when next starts it,
 * the file before is fdatasynced first (only the newest file holds unsynced frames). */
static int dw_file_for(eng_seg *s, eng_dw *w, uint64_t next, int *reservation)
{
    uint64_t first = dj_file_first(s->durable, next);
    if (w->fd >= 0 && w->fd_first == first)
        return 0;
    *reservation = 0;
    if (next == first && first > 1) {
        uint64_t prev = dj_file_first(s->durable, first - 1);
        int rc = dj_sync_file(w, prev);
        if (rc && rc != ENOENT)   /* ENOENT: removed after a checkpoint, hence synced */
            return rc;
        durable_raise_to(&s->durable->durable_seq, first - 1);
    }
    int fd = -1;
    int rc = dj_reserve(s, w, first, &fd);
    if (rc) {
        *reservation = 1;
        return rc;
    }
    if (w->fd >= 0)
        close(w->fd);
    w->fd = fd;
    w->fd_first = first;
    durable_raise_to(&s->durable->reserved_seq, first + s->durable->file_records - 1);
    durable_wake_room(s->durable);
    return 0;
}

/* Reserve the file after the one of seq `next` once next is half way
 * through its own: commits are admitted only up to reserved_seq, so a full
 * disk is met by a reservation a half file ahead, never by a commit whose
 * record has no place.  0 or the errno of the reservation. */
static int dw_reserve_ahead(eng_seg *s, eng_dw *w, uint64_t next)
{
    eng_durable *d = s->durable;
    uint64_t fr = load_relaxed_u64(&d->file_records);
    uint64_t first = dj_file_first(d, next), after = first + fr;
    if (next - first < fr / 2 || load_acquire_u64(&d->reserved_seq) >= after + fr - 1)
        return 0;
    int fd = -1;
    int rc = dj_reserve(s, w, after, &fd);
    if (rc)
        return rc;
    close(fd);
    durable_raise_to(&d->reserved_seq, after + fr - 1);
    durable_wake_room(d);
    return 0;
}

/* Write every record in (written_seq, upto] to the files (the lease and w->mu
 * held); `published`: upto is a published journal seq (it ends a commit).
 * 0, or an errno (*reservation: 1 if reserving a file failed). */
static int dw_write_upto(eng_seg *s, eng_dw *w, uint64_t upto, int published,
                         int *reservation, int reserve_ahead)
{
    eng_durable *d = s->durable;
    *reservation = 0;
    int rc = dw_dir(s, w);
    if (rc)
        return rc;
    uint64_t W = load_acquire_u64(&d->written_seq);
    uint64_t fr = load_relaxed_u64(&d->file_records);
    rc = dw_file_for(s, w, W + 1, reservation);   /* reserved before any record needs it */
    if (rc)
        return rc;
    int ahead = reserve_ahead ? dw_reserve_ahead(s, w, W + 1) : 0;
    while (W < upto) {
        rc = dw_file_for(s, w, W + 1, reservation);
        if (rc)
            return rc;
        if (!ahead && reserve_ahead)
            ahead = dw_reserve_ahead(s, w, W + 1);
        uint64_t first = w->fd_first, room = first + fr - (W + 1), n = upto - W;
        if (n > ENG_DJ_BATCH)
            n = ENG_DJ_BATCH;
        if (n > room)
            n = room;
        uint32_t got = 0;
        uint64_t resume = 0;
        int jr = eng_journal_read(s, W, w->recs, (uint32_t)n, &got, &resume);
        if (jr == ENG_ELAPPED)
            return EOVERFLOW;   /* not reached: journal_room keeps unwritten records */
        if (jr)
            return EIO;
        if (!got)
            break;
        for (uint32_t i = 0; i < got; i++) {
            uint8_t *f = w->frames + (size_t)i * ENG_DJ_FRAME_BYTES;
            uint32_t h[2] = {ENG_DJ_FRAME_MAGIC, eng_crc32c(0, &w->recs[i], ENG_JREC_SIZE)};
            memcpy(f, h, 8);
            memcpy(f + 8, &w->recs[i], ENG_JREC_SIZE);
        }
        size_t bytes = (size_t)got * ENG_DJ_FRAME_BYTES;
        if (dj_fault(s, ENG_DJ_FAULT_DIE_MIDWRITE)) {   /* a torn batch, then death */
            pwrite_all(w->fd, w->frames, bytes / 2 + 3, dj_offset(first, W + 1));
            kill(getpid(), SIGKILL);
        }
        rc = pwrite_all(w->fd, w->frames, bytes, dj_offset(first, W + 1));
        if (rc)
            return rc;
        W += got;
        store_seq_cst_u64(&d->written_seq, W);   /* after the pwrite: pairs with the acquires */
        durable_wake_room(d);
    }
    if (published && W >= upto) {
        if (dj_fault(s, ENG_DJ_FAULT_DIE_BEFORE_COMMIT_END))
            kill(getpid(), SIGKILL);   /* written_seq stored, written_commit_seq not raised */
        durable_raise_to(&d->written_commit_seq, upto);   /* after written_seq: <= it */
    }
    if (ahead) {   /* every record with a place is written: now the failure */
        *reservation = 1;
        return ahead;
    }
    return 0;
}

/* fdatasync what is written: durable_seq = the written_seq read first, and
 * durable_commit_seq = the written_commit_seq read before it (so <= it). */
static int dw_sync(eng_seg *s, eng_dw *w)
{
    eng_durable *d = s->durable;
    int rc = dw_dir(s, w);
    if (rc)
        return rc;
    uint64_t C = load_acquire_u64(&d->written_commit_seq);
    uint64_t W = load_acquire_u64(&d->written_seq);
    if (W > load_acquire_u64(&d->durable_seq)) {
        if (dj_fault(s, ENG_DJ_FAULT_DIE_IN_SYNC))
            kill(getpid(), SIGKILL);   /* W and C read, the file of W not synced yet */
        rc = dj_sync_file(w, dj_file_first(d, W));
        w->last_sync_ns = now_ns(CLOCK_MONOTONIC);
        /* gone: a checkpoint's prune removed it while this caller was
         * descheduled after reading W, and a checkpoint makes its journal
         * durable before it prunes -- durable_seq tells (a stale flusher
         * failed the engine for good here, -ENOENT) */
        if (rc == ENOENT && load_acquire_u64(&d->durable_seq) >= W)
            rc = 0;
        if (rc)
            return rc;
        durable_raise_to(&d->durable_seq, W);
    }
    durable_raise_to(&d->durable_commit_seq, C);
    return 0;
}

/* ---- the lease ------------------------------------------------------------------------ */

/* 1 if this Engine holds the lease (taking it when free or its holder is proven dead). */
static int lease_take(eng_seg *s)
{
    eng_durable *d = s->durable;
    uint32_t cur = load_acquire_u32(&d->lease);
    if (cur == s->token)
        return 1;
    if (cur && !token_dead(s, cur))
        return 0;
    if (!cas_acq_rel_u32(&d->lease, &cur, s->token))
        return 0;
    store_relaxed_u32(&d->writer_pid, s->pid);
    return 1;
}

static void lease_give_back(eng_seg *s)
{
    eng_durable *d = s->durable;
    uint32_t me = s->token;
    if (cas_acq_rel_u32(&d->lease, &me, 0))
        futex(&d->lease, FUTEX_WAKE, INT_MAX, NULL);   /* watchers take it at once */
}

static int durable_check(eng_seg *s)
{
    CHECK_SEG(s);
    if (!s->durable)
        return ENG_ENOJOURNAL;
    return 0;
}

/* One writer step, the lease held: write what is published, fdatasync when
 * due (or `sync_now`), and a checkpoint when due.  0 or ENG_EDURABLE. */
static int durable_checkpoint_locked(eng_seg *s, eng_dw *w, uint64_t *out_start);

static int dw_step(eng_seg *s, eng_dw *w, int sync_now, uint64_t upto)
{
    eng_durable *d = s->durable;
    int reservation = 0;
    int32_t failed = load_acquire_i32(&d->failure);
    if (failed < 0)
        return ENG_EDURABLE;   /* a write or an fdatasync failed: never retried */
    if (failed && now_ns(CLOCK_MONOTONIC) - w->last_fail_ns < ENG_DJ_RETRY_NS) {
        /* a reservation failed, its retry not due: what has its place is still written */
        uint64_t R = load_acquire_u64(&d->reserved_seq);
        int wr = load_acquire_u64(&d->written_seq) < R
                     ? dw_write_upto(s, w, upto < R ? upto : R, upto <= R, &reservation, 0)
                     : 0;
        if (wr == 0) {   /* also with every place written (written_seq == R): the
                          * failed retry wrote them and did not sync, nothing else would */
            int sr = dw_sync(s, w);
            if (sr)   /* never retried, as anywhere: a later fdatasync that
                       * succeeds says nothing of what this one dropped */
                durable_fail(s, w, sr, 0);
        }
        return ENG_EDURABLE;
    }
    int rc = dw_write_upto(s, w, upto, 1, &reservation, 1);
    if (rc) {
        if (rc != EAGAIN)
            durable_fail(s, w, rc, reservation);
        return rc == EAGAIN ? 0 : ENG_EDURABLE;
    }
    if (failed > 0) {   /* the reservation worked this time: go on */
        int32_t f = failed;
        __atomic_compare_exchange_n(&d->failure, &f, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    int64_t now = now_ns(CLOCK_MONOTONIC);
    if (sync_now || now - w->last_sync_ns >= (int64_t)load_relaxed_u64((uint64_t *)&d->sync_ns)) {
        rc = dw_sync(s, w);
        if (rc) {
            durable_fail(s, w, rc, 0);   /* a failed fdatasync is never retried */
            return ENG_EDURABLE;
        }
    }
    uint64_t cr = load_relaxed_u64(&d->ckpt_records);
    int64_t cn = (int64_t)load_relaxed_u64((uint64_t *)&d->ckpt_ns);
    uint64_t W = load_acquire_u64(&d->written_seq), last = load_acquire_u64(&d->ckpt_seq);
    if (W > last && ((cr && W - last >= cr) ||
                     (cn && now - (int64_t)load_relaxed_u64((uint64_t *)&d->ckpt_mono_ns) >= cn))) {
        uint64_t start;
        durable_checkpoint_locked(s, w, &start);   /* a failed checkpoint is retried next time */
    }
    return 0;
}

/* ---- exported calls ------------------------------------------------------------------- */

/* The creator, once, before anything is written: the directory and the settings. */
int eng_durable_setup(eng_seg *s, const char *dir, int64_t sync_ns, uint64_t file_records,
                      uint64_t ckpt_records, int64_t ckpt_ns)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (!dir || !dir[0] || strnlen(dir, ENG_DJ_PATH_MAX) >= ENG_DJ_PATH_MAX ||
        sync_ns < ENG_DJ_SYNC_MIN_NS || sync_ns > ENG_DJ_SYNC_MAX_NS ||
        file_records < ENG_DJ_FILE_RECORDS_MIN || file_records > ENG_DJ_FILE_RECORDS_MAX ||
        (file_records & (file_records - 1)) || ckpt_ns < 0)
        return ENG_EBADARG;
    eng_durable *d = s->durable;
    if (load_acquire_u32(&d->state) != 0)
        return ENG_EBADARG;
    strcpy(d->dir, dir);
    store_relaxed_u64((uint64_t *)&d->sync_ns, (uint64_t)sync_ns);
    store_relaxed_u64(&d->file_records, file_records);
    store_relaxed_u64(&d->ckpt_records, ckpt_records);
    store_relaxed_u64((uint64_t *)&d->ckpt_ns, (uint64_t)ckpt_ns);
    store_relaxed_u64((uint64_t *)&d->ckpt_mono_ns, (uint64_t)now_ns(CLOCK_MONOTONIC));
    store_release_u32(&d->state, 1);   /* last: pairs with dw_dir's acquire */
    return 0;
}

/* A restored engine's files already hold every record <= seq (restore read
 * them back and fsynced them: restore.py's _sync_read_files): the writer
 * continues after it.  Before
 * eng_durable_setup only (no writer runs yet). */
int eng_durable_continue(eng_seg *s, uint64_t seq)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    eng_durable *d = s->durable;
    if (load_acquire_u32(&d->state) != 0 || seq > eng_journal_seq(s))
        return ENG_EBADARG;
    store_release_u64(&d->written_seq, seq);
    store_release_u64(&d->durable_seq, seq);
    store_release_u64(&d->written_commit_seq, seq);   /* a restore keeps whole commits */
    store_release_u64(&d->durable_commit_seq, seq);
    store_release_u64(&d->ckpt_seq, seq);
    return 0;
}

/* The writer thread's body: until eng_dw_stop or close(), write while holding
 * the lease, else watch the holder.  0 (stopped), ENG_ECLOSED. */
int eng_durable_run(eng_seg *s, eng_dw *w)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (!w)
        return ENG_EBADARG;
    eng_durable *d = s->durable;
    for (;;) {
        if (dw_stopped(w))
            return 0;
        if (load_acquire_u32(&s->gate_shut))
            return ENG_ECLOSED;
        if (load_acquire_u32(&d->state) != 1 || !lease_take(s)) {
            uint32_t cur = load_acquire_u32(&d->lease);
            if (cur) {
                struct timespec ts = {0, ENG_DJ_WATCH_NS};
                futex(&d->lease, FUTEX_WAIT, cur, &ts);   /* woken when it is given back */
            } else {
                struct timespec ts = {0, ENG_DJ_WATCH_NS / 10};
                nanosleep(&ts, NULL);
            }
            continue;
        }
        pthread_mutex_lock(&w->mu);
        int step = dw_step(s, w, 0, eng_journal_seq(s));
        pthread_mutex_unlock(&w->mu);
        if (step) {   /* failed: retry the reservation in a while (or wait for close) */
            struct timespec ts = {0, ENG_DJ_RETRY_NS / 10};
            nanosleep(&ts, NULL);
            continue;
        }
        uint64_t W = load_acquire_u64(&d->written_seq);
        int64_t wait = ENG_DJ_WATCH_NS;
        if (W > load_acquire_u64(&d->durable_seq) ||   /* or a commit end to report */
            load_acquire_u64(&d->written_commit_seq) > load_acquire_u64(&d->durable_commit_seq)) {
            int64_t due = w->last_sync_ns + (int64_t)load_relaxed_u64((uint64_t *)&d->sync_ns) -
                          now_ns(CLOCK_MONOTONIC);
            wait = due < 0 ? 0 : due < wait ? due : wait;
        }
        uint64_t seq;
        if (wait > 0 && eng_journal_seq(s) <= W) {
            /* caught up: a nap first, so a busy journal is written in batches
             * without a futex wake per commit; idle, sleep on the journal */
            struct timespec nap = {0, ENG_DJ_NAP_NS};
            nanosleep(&nap, NULL);
            if (eng_journal_seq(s) <= W)
                eng_journal_wait(s, W, wait, &seq);   /* new records, a sync due, a stop check */
        }
    }
}

/* fdatasync every record committed before the call: written first (by the
 * lease holder, or by this Engine if it can take the lease), then synced here.
 * 0 with *out_seq = the durable seq, ENG_ETIMEDOUT, ENG_EDURABLE. */
int eng_durable_flush(eng_seg *s, eng_dw *w, int64_t timeout_ns, uint64_t *out_seq)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (!w || !out_seq || timeout_ns < 0)
        return ENG_EBADARG;
    eng_durable *d = s->durable;
    if (timeout_ns > ENG_MAX_TIMEOUT_NS)
        timeout_ns = ENG_MAX_TIMEOUT_NS;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + timeout_ns;
    uint64_t target = eng_journal_seq(s);
    *out_seq = load_acquire_u64(&d->durable_commit_seq);
    for (;;) {
        if (load_acquire_u32(&s->gate_shut))
            return ENG_ECLOSED;
        int32_t failed = load_acquire_i32(&d->failure);
        uint64_t W = load_acquire_u64(&d->written_seq);
        if (failed < 0) {   /* a write or sync failed: never retried */
            durable_fill_info(s, &durable_refused);
            return ENG_EDURABLE;
        }
        if (load_acquire_u32(&d->state) != 1) {
            /* the directory is not set yet (an attach between the creator's or
             * a restore's format and its eng_durable_setup): nothing can be
             * written or synced -- wait for it (an fdatasync here failed with
             * EAGAIN, and the engine for good) */
            int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
            if (left <= 0) {
                durable_fill_info(s, &durable_refused);
                return ENG_ETIMEDOUT;
            }
            struct timespec ts = {0, left < ENG_DJ_WATCH_NS / 10 ? left : ENG_DJ_WATCH_NS / 10};
            nanosleep(&ts, NULL);
            continue;
        }
        if (W >= target && load_acquire_u64(&d->reserved_seq) > W) {
            /* written, and the next record has its place; a failed reservation
             * whose holder is gone is retried here (when due), or commits stay
             * refused with nobody left to retry it: its dead holder had written
             * every record, so the lease branch below is never reached */
            if (failed > 0 && lease_take(s)) {
                pthread_mutex_lock(&w->mu);
                (void)dw_step(s, w, 0, target);   /* what is written stays durable either way */
                pthread_mutex_unlock(&w->mu);
            }
            break;
        }
        if (lease_take(s)) {   /* writes itself (and retries a failed reservation when due) */
            pthread_mutex_lock(&w->mu);
            rc = dw_step(s, w, 0, target);
            pthread_mutex_unlock(&w->mu);
            if (rc) {
                durable_fill_info(s, &durable_refused);
                return ENG_EDURABLE;
            }
            if (load_acquire_u64(&d->written_seq) >= target)
                break;
        } else if (failed) {   /* the live holder's reservation failed */
            durable_fill_info(s, &durable_refused);
            return ENG_EDURABLE;
        }
        int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0) {
            durable_fill_info(s, &durable_refused);
            return ENG_ETIMEDOUT;
        }
        durable_sleep_written(d, W, left < ENG_DJ_WATCH_NS / 10 ? left : ENG_DJ_WATCH_NS / 10);
    }
    pthread_mutex_lock(&w->mu);
    rc = dw_sync(s, w);
    pthread_mutex_unlock(&w->mu);
    if (rc) {
        durable_fail(s, w, rc, 0);
        durable_fill_info(s, &durable_refused);
        return ENG_EDURABLE;
    }
    /* the seq the call was for (written and fdatasynced): a published seq, so
     * it ends a commit, which a restore keeps whole */
    durable_raise_to(&d->durable_commit_seq, target);
    *out_seq = target;
    return 0;
}

/* close() and `rm`: stop writing here.  If this Engine holds the lease or can
 * take it, write and fdatasync everything, then give the lease back (a
 * watcher elsewhere takes it); else leave it to the live holder.
 * 0 with *out_seq = the durable seq, or ENG_EDURABLE. */
int eng_durable_release(eng_seg *s, eng_dw *w, int64_t timeout_ns, uint64_t *out_seq)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (!w || !out_seq)
        return ENG_EBADARG;
    (void)timeout_ns;
    eng_durable *d = s->durable;
    rc = 0;
    if (load_acquire_u32(&d->state) == 1 && lease_take(s)) {
        /* a latch holder dead after its commit (J3) before publishing (J4)
         * left committed records above the journal seq; with every process
         * gone (rm) nobody else resolves them: roll them forward first, or
         * the files lose a committed change and its riders */
        journal_sweep(s);
        pthread_mutex_lock(&w->mu);
        rc = dw_step(s, w, 1, eng_journal_seq(s));
        pthread_mutex_unlock(&w->mu);
        lease_give_back(s);
    }
    *out_seq = load_acquire_u64(&d->durable_commit_seq);
    if (rc)
        durable_fill_info(s, &durable_refused);
    return rc;
}

int eng_durable_info_of(eng_seg *s, eng_durable_info *out)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (!out)
        return ENG_EBADARG;
    durable_fill_info(s, out);
    return 0;
}

/* Tests only: the durable fault switches (ENG_DJ_FAULT_*), where faults are allowed. */
int eng_durable_fault(eng_seg *s, uint32_t flags)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (flags & ~(uint32_t)(ENG_DJ_FAULT_NOSPACE | ENG_DJ_FAULT_DIE_MIDWRITE |
                            ENG_DJ_FAULT_DIE_IN_CKPT | ENG_DJ_FAULT_DIE_BEFORE_COMMIT_END |
                            ENG_DJ_FAULT_DIE_IN_SYNC) ||
        (flags && !faults_allowed()))
        return ENG_EBADARG;
    store_release_u32(&s->durable->fault, flags);
    return 0;
}

/* The journal directory (NUL-terminated into out[max]). */
int eng_durable_dir(eng_seg *s, char *out, uint32_t max)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (!out || max == 0)
        return ENG_EBADARG;
    if (load_acquire_u32(&s->durable->state) != 1)
        return ENG_ENOJOURNAL;
    uint32_t n = (uint32_t)strnlen(s->durable->dir, ENG_DJ_PATH_MAX - 1);
    if (n >= max)
        return ENG_EBADARG;
    memcpy(out, s->durable->dir, n);
    out[n] = 0;
    return 0;
}

/* ---- checkpoints ------------------------------------------------------------------- */

/* defined further on in the unit (accounts.c, keys.c): the consistent readers */
static int acct_read(eng_seg *s, const eng_account *a, eng_books *out, uint64_t *version,
                     uint32_t *latched);
static inline uint64_t aw_make(uint64_t v);
static int keyrec_read(const eng_keyrec *kr, uint64_t *tag, eng_key *out);

typedef struct ckpt_out {
    eng_dw  *w;
    uint8_t *buf;        /* ENG_DJ_BATCH frames (not w->frames: the writer's, see ckpt_scan) */
    int      fd;
    uint32_t n;          /* frames in w->frames not written yet */
    uint64_t frames;     /* frames in the file */
    off_t    off;
    int      err;
    int64_t  ts;
} ckpt_out;

static void ckpt_flush(ckpt_out *o)
{
    if (!o->n || o->err)
        return;
    size_t bytes = (size_t)o->n * ENG_DJ_FRAME_BYTES;
    o->err = pwrite_all(o->fd, o->buf, bytes, o->off);
    o->off += (off_t)bytes;
    o->n = 0;
}

/* One frame (seq 0) as the journal would record it. */
static void ckpt_frame(ckpt_out *o, uint32_t kind, uint32_t trigger, uint64_t id, uint64_t word,
                       const uint64_t *words, uint32_t nwords, uint64_t version)
{
    eng_jrec r;
    memset(&r, 0, sizeof r);
    r.ts_ns = o->ts;
    r.id = id;
    r.word = word;
    r.kind = kind;
    r.trigger = trigger;
    if (nwords > ENG_MAX_FIELD_WORDS)
        nwords = ENG_MAX_FIELD_WORDS;
    if (words)
        memcpy(r.w, words, nwords * sizeof(uint64_t));
    r.version = version;
    uint8_t *f = o->buf + (size_t)o->n * ENG_DJ_FRAME_BYTES;
    uint32_t h[2] = {ENG_DJ_FRAME_MAGIC, eng_crc32c(0, &r, ENG_JREC_SIZE)};
    memcpy(f, h, 8);
    memcpy(f + 8, &r, ENG_JREC_SIZE);
    o->frames++;
    if (++o->n == ENG_DJ_BATCH)
        ckpt_flush(o);
}

/* A long scan by the lease holder keeps the ring draining (w->mu is held):
 * commits do not wait for the checkpoint. */
static void ckpt_keep_writing(eng_seg *s, ckpt_out *o)
{
    if (load_acquire_u32(&s->durable->lease) != s->token || load_acquire_i32(&s->durable->failure))
        return;
    int reservation = 0;
    int rc = dw_write_upto(s, o->w, eng_journal_seq(s), 1, &reservation, 1);
    if (rc && rc != EAGAIN)
        durable_fail(s, o->w, rc, reservation);
}

/* The scan: every object read consistently on its own (see the protocol). */
static void ckpt_scan(eng_seg *s, ckpt_out *o)
{
    static __thread eng_ctx_rec ctx;   /* the largest record copy: off the stack */
    for (uint32_t i = 0; i < s->capacity && !o->err; i++) {
        if ((i & (ENG_DJ_CKPT_WRITE_EVERY - 1)) == ENG_DJ_CKPT_WRITE_EVERY - 1)
            ckpt_keep_writing(s, o);
        eng_slot *sl = slot_at(s, i);
        uint64_t w;
        uint32_t opening;
        if (read_ctx(s, sl, &ctx, &w, &opening) != 0)
            continue;   /* it kept changing: changes after the start seq have records */
        if (opening == 0)
            continue;   /* never opened */
        uint64_t id = make_id(opening, i), word = sw_unlocked(w);
        if (!sw_state(w)) {   /* released (or being opened): its id stays stale */
            ckpt_frame(o, ENG_JK_RELEASE, 0, id, word, ctx.w, s->n_words,
                       load_relaxed_u64(&ctx.version));
            continue;
        }
        ckpt_frame(o, ENG_JK_OPEN, 0, id, word, ctx.w, s->n_words, load_relaxed_u64(&ctx.version));
        eng_price_rec pr;
        uint64_t pv;
        if (read_price_rec(sl, &pr, &pv) == 0 && pv) {
            uint64_t words[REC_WORDS(eng_price_rec)];
            memcpy(words, &pr, sizeof words);
            ckpt_frame(o, ENG_JK_PRICE, 0, id, pv << ENG_PW_SEQ_SHIFT, words,
                       REC_WORDS(eng_price_rec), pv);
        }
        for (uint32_t r = 0; r < s->kpp; r++) {
            uint64_t tag;
            eng_key k;
            if (keyrec_read(&s->keyrecs[(uint64_t)i * s->kpp + r], &tag, &k) != 0 ||
                tag != ((id << 8) | ENG_KR_HELD) || !k.len)
                continue;
            uint64_t words[ENG_KEY_MAX / 8];
            memcpy(words, k.key, sizeof words);
            ckpt_frame(o, ENG_JK_KEY, 0, id, r, words, ENG_KEY_MAX / 8, k.len);
        }
    }
    for (uint32_t i = 0; i < s->max_accounts && !o->err; i++) {
        if ((i & (ENG_DJ_CKPT_WRITE_EVERY - 1)) == ENG_DJ_CKPT_WRITE_EVERY - 1)
            ckpt_keep_writing(s, o);
        eng_account *a = &s->accounts[i];
        uint64_t words[ENG_MAX_FIELD_WORDS] = {0};
        eng_books b;
        uint64_t version;
        /* a closed account too: its opening count keeps its ids stale */
        if (acct_read(s, a, &b, &version, NULL) != 0 || !b.opening)
            continue;
        memcpy(words, &b, sizeof b);
        uint32_t klen = load_relaxed_u32(&a->key_len);   /* stable while the account is open */
        if (klen > ENG_KEY_MAX || !b.open)
            klen = 0;
        memcpy(&words[ENG_DJ_ACCT_KEY_WORD], a->key, klen);
        words[ENG_DJ_ACCT_KEYLEN_WORD] = klen;   /* as an account's journal record has it */
        ckpt_frame(o, ENG_JK_ACCOUNT, 0, make_id(b.opening, i), aw_make(version), words,
                   ENG_MAX_FIELD_WORDS, version);
    }
    ckpt_frame(o, ENG_JK_HALT, 0, 0, load_acquire_u32(&s->hdr->halted), NULL, 0, 0);
    ckpt_flush(o);
}

/* Records up to seq `upto` written and fdatasynced (w->mu held): by us if we
 * can take the lease, else waited for (bounded).  0 or an ENG_ code. */
static int durable_upto(eng_seg *s, eng_dw *w, uint64_t upto)
{
    eng_durable *d = s->durable;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + ENG_DJ_ROOM_WAIT_NS;
    for (;;) {
        if (load_acquire_i32(&d->failure))
            return ENG_EDURABLE;
        uint64_t W = load_acquire_u64(&d->written_seq);
        if (W >= upto)
            break;
        if (lease_take(s)) {
            int reservation = 0;
            int rc = dw_write_upto(s, w, upto, 1, &reservation, 1);
            if (rc) {
                durable_fail(s, w, rc, reservation);
                return ENG_EDURABLE;
            }
            continue;
        }
        int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0)
            return ENG_ETIMEDOUT;
        durable_sleep_written(d, W, left < 1000000 ? left : 1000000);
    }
    int rc = dw_sync(s, w);
    if (rc) {
        durable_fail(s, w, rc, 0);
        return ENG_EDURABLE;
    }
    return 0;
}

/* Remove what the newest two checkpoints make unneeded: older checkpoints,
 * and journal files whose every record is <= the second newest's start seq. */
static void ckpt_prune(eng_seg *s, eng_dw *w)
{
    DIR *dir = opendir(w->dir);
    if (!dir)
        return;
    uint64_t newest = 0, second = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        unsigned long long v;
        char tail[8];
        if (sscanf(e->d_name, "checkpoint-%20llu.ck%7s", &v, tail) == 2 && !strcmp(tail, "pt")) {
            if (v > newest) {
                second = newest;
                newest = v;
            } else if (v > second && v != newest) {
                second = v;
            }
        }
    }
    if (second) {
        uint64_t fr = load_relaxed_u64(&s->durable->file_records);
        rewinddir(dir);
        while ((e = readdir(dir)) != NULL) {
            unsigned long long v;
            char tail[8];
            char path[ENG_DJ_PATH_MAX + 300];
            int k = snprintf(path, sizeof path, "%s/%s", w->dir, e->d_name);
            if (k <= 0 || (size_t)k >= sizeof path)
                continue;
            if (sscanf(e->d_name, "checkpoint-%20llu.ck%7s", &v, tail) == 2 &&
                (!strcmp(tail, "pt") || !strcmp(tail, "pt.tmp")) && v < second)
                unlink(path);   /* older checkpoints, and a dead checkpointer's .tmp */
            else if (sscanf(e->d_name, "journal-%20llu.lo%7s", &v, tail) == 2 &&
                     !strcmp(tail, "g") && v + fr - 1 <= second)
                unlink(path);
        }
    }
    closedir(dir);
}

static int durable_checkpoint_locked(eng_seg *s, eng_dw *w, uint64_t *out_start)
{
    eng_durable *d = s->durable;
    *out_start = 0;
    if (load_acquire_u32(&d->state) != 1 || dw_dir(s, w))
        return ENG_ENOJOURNAL;
    op_timer none = {NULL, 0};
    if (token_lock(s, &d->ckpt_lock, none) != 0)   /* one checkpoint at a time */
        return ENG_EBUSY;
    uint64_t S = eng_journal_seq(s);   /* before the scan: see the protocol */
    char path[ENG_DJ_PATH_MAX + 64], tmp[ENG_DJ_PATH_MAX + 64];
    int rc = 0, err = dw_path(w, path, sizeof path, "checkpoint", S, ".ckpt");
    if (!err)
        err = dw_path(w, tmp, sizeof tmp, "checkpoint", S, ".ckpt.tmp");
    int fd = err ? -1 : open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (!err && fd < 0)
        err = errno;
    uint8_t *buf = err ? NULL : malloc((size_t)ENG_DJ_BATCH * ENG_DJ_FRAME_BYTES);
    if (!err && !buf)
        err = ENOMEM;
    if (!err) {
        ckpt_out o = {w, buf, fd, 0, 0, ENG_DJ_FILE_HDR, 0, price_clock()};
        ckpt_scan(s, &o);
        err = o.err;
        if (!err) {
            uint8_t hdr[ENG_DJ_FILE_HDR] = {0};
            uint32_t h32[4] = {ENG_DJ_CKPT_MAGIC, ENG_DJ_FORMAT, ENG_DJ_FRAME_BYTES, 0};
            memcpy(hdr, h32, sizeof h32);
            memcpy(hdr + 16, &S, 8);
            memcpy(hdr + 24, &o.frames, 8);
            err = pwrite_all(fd, hdr, sizeof hdr, 0);
        }
        if (!err && fdatasync(fd))
            err = errno;
    }
    /* every change the fuzzy scan saw is journaled and on disk before the
     * checkpoint is: a restore never holds a change its journal lost */
    if (!err)
        rc = durable_upto(s, w, eng_journal_seq(s));
    if (!err && !rc && dj_fault(s, ENG_DJ_FAULT_DIE_IN_CKPT))
        kill(getpid(), SIGKILL);   /* holding ckpt_lock, the .tmp whole */
    if (!err && !rc && rename(tmp, path))
        err = errno;
    if (!err && !rc)
        err = fsync_dir(w->dir);
    if (fd >= 0)
        close(fd);
    free(buf);
    if (err || rc) {
        unlink(tmp);
        store_release_u32(&d->ckpt_lock, 0);
        durable_fill_info(s, &durable_refused);
        if (!rc)   /* the checkpoint's own write failed: the journal goes on */
            durable_refused.failure = err;
        return rc ? rc : ENG_EDURABLE;
    }
    store_relaxed_u64(&d->ckpt_prev, load_relaxed_u64(&d->ckpt_start));
    store_release_u64(&d->ckpt_start, S);
    store_release_u64(&d->ckpt_seq, load_acquire_u64(&d->written_seq));
    store_relaxed_u64((uint64_t *)&d->ckpt_mono_ns, (uint64_t)now_ns(CLOCK_MONOTONIC));
    fetch_add_relaxed_u64(&d->checkpoints, 1);
    ckpt_prune(s, w);
    store_release_u32(&d->ckpt_lock, 0);
    *out_start = S;
    return 0;
}

int eng_durable_checkpoint(eng_seg *s, eng_dw *w, uint64_t *out_start)
{
    int rc = durable_check(s);
    if (rc)
        return rc;
    if (!w || !out_start)
        return ENG_EBADARG;
    pthread_mutex_lock(&w->mu);
    rc = durable_checkpoint_locked(s, w, out_start);
    pthread_mutex_unlock(&w->mu);
    return rc;
}
