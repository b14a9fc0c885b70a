/* Block copies: kvwire/blockcopy.py copy_blocks, a gather/scatter memcpy over (source, offset, length)
 * -> (destination, offset), each block's xxh3-64 taken while its bytes are still in cache.
 *
 * In Python a get of 512 blocks of 64 KiB out of the shared pool spent ~10 us a block in slicing,
 * np.copyto and the hash call, twice the copy itself. Here one call copies every block of a request
 * with the GIL released, each block hashed while it is in cache (a get's after its copy, a put's
 * before it, whose copy into the pool then streams past the cache), on up to `threads` threads once
 * a call moves MIN_THREAD_BYTES per thread. The threads
 * claim pieces of the call one at a time (a block, or without a hash a part of one, so a block
 * larger than a thread's share is split too): on a busy machine a helper that is not scheduled
 * leaves its share to the caller instead of holding the call up (with halves fixed up front, a
 * 2-thread copy ran at a third of one thread's speed while the other core was taken).
 *
 * Anything the C cannot take as given (a buffer that is not C-contiguous, a read-only destination,
 * an offset out of range, an argument of another type) is the reference's to copy or refuse, with
 * its one error message: NotImplemented, before any byte moved.
 */
#include "kvnative.h"

#include <pthread.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
/* xxh3's AVX2 kernels besides the baseline build's SSE2 ones, chosen at run time (as xxhash's own
 * xxh_x86dispatch.c does): on AVX2 machines the hash of a block costs about half. */
#include <immintrin.h>
#define XXH_DISPATCH_AVX2 1
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#endif
#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "../third_party/xxhash/xxhash.h"

#if defined(XXH_DISPATCH_AVX2)
XXH_TARGET_AVX2 static XXH64_hash_t xxh3_avx2(const void *p, size_t len) {
    if (len <= XXH3_MIDSIZE_MAX) return XXH3_64bits(p, len);
    return XXH3_hashLong_64b_internal(p, len, XXH3_kSecret, sizeof(XXH3_kSecret), XXH3_accumulate_avx2, XXH3_scrambleAcc_avx2);
}

static int use_avx2(void) {
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("avx2") ? 1 : 0;
    return known;
}

static XXH64_hash_t xxh3(const void *p, size_t len) { return use_avx2() ? xxh3_avx2(p, len) : XXH3_64bits(p, len); }

#else
static XXH64_hash_t xxh3(const void *p, size_t len) { return XXH3_64bits(p, len); }
#endif

#define HASH_NONE 0
#define HASH_SOURCE 1
#define HASH_DEST 2
#define MAX_THREADS 16
#define MIN_PIECE_BYTES (64 * 1024)
#define MIN_THREAD_BYTES (2 * 1024 * 1024)

typedef struct {
    const unsigned char *src;
    unsigned char *dst; /* NULL: hash only */
    size_t len;
} job_t;

/* A piece of work: part of one block without a hash, a whole block with one (a block's hash is sequential). */
typedef struct {
    size_t job;
    size_t at;
    size_t len;
} piece_t;

/* One call's work, shared by the calling thread and its helpers. Pieces are claimed one at a time, so a
 * helper the scheduler does not run (a busy machine) leaves its share to the others instead of holding the
 * call up; the caller returns once every piece is done, never waiting for a helper that has not started
 * (it will find nothing left and touch no buffer). Freed by whoever leaves last. */
typedef struct {
    const job_t *jobs;
    const piece_t *pieces;
    uint64_t *digests;
    size_t npieces;
    int hash;
    size_t next;      /* atomic: the next piece to claim */
    size_t done;      /* atomic: pieces finished */
    int refs;         /* atomic: threads still holding this */
    pthread_mutex_t lock;
    pthread_cond_t all_done;
    void *owned;      /* the one allocation holding this, the jobs and the pieces */
} work_t;

#if defined(__SSE2__)
#include <emmintrin.h>
/* A copy whose destination this thread will not read again (a put into the pool: the source is what gets hashed)
 * with non-temporal stores: no read-for-ownership of each destination line and no eviction of the cache for it,
 * two memory transfers a byte instead of three. The caller fences once its pieces are done. */
static void copy_streaming(unsigned char *dst, const unsigned char *src, size_t n) {
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (n < 4096 || head > n) {
        memcpy(dst, src, n);
        return;
    }
    memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i)), b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32)), d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, n - i);
}
#define STORE_FENCE() _mm_sfence()
#else
static void copy_streaming(unsigned char *dst, const unsigned char *src, size_t n) { memcpy(dst, src, n); }
#define STORE_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif


static void do_piece(const work_t *w, const piece_t *p) {
    const job_t *job = &w->jobs[p->job];
    if (w->hash == HASH_NONE) {
        if (p->len) memcpy(job->dst + p->at, job->src + p->at, p->len);
        return;
    }
    /* Whole blocks, each hashed in one call: xxh3's streaming form, fed a block in cache-sized pieces as it was
     * copied, cost twice the one-shot hash. A put hashes its source first, so the streamed copy then reads it from
     * cache; a get copies first, so the hash reads what landed from cache. */
    if (w->hash == HASH_SOURCE) {
        w->digests[p->job] = xxh3(job->src, job->len);
        if (job->dst != NULL && job->len) copy_streaming(job->dst, job->src, job->len);
    } else {
        if (job->len) memcpy(job->dst, job->src, job->len);
        w->digests[p->job] = xxh3(job->dst, job->len);
    }
}

static void release_work(work_t *w) {
    if (__atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->all_done);
        free(w->owned);
    }
}

static void claim_pieces(work_t *w) {
    for (;;) {
        size_t i = __atomic_fetch_add(&w->next, 1, __ATOMIC_ACQ_REL);
        if (i >= w->npieces) return;
        do_piece(w, &w->pieces[i]);
        STORE_FENCE(); /* streamed stores land before the piece counts as done */
        if (__atomic_add_fetch(&w->done, 1, __ATOMIC_ACQ_REL) == w->npieces) {
            pthread_mutex_lock(&w->lock);
            pthread_cond_signal(&w->all_done);
            pthread_mutex_unlock(&w->lock);
        }
    }
}

static void *helper(void *arg) {
    work_t *w = arg;
    claim_pieces(w);
    release_work(w);
    return NULL;
}

/* The pieces of a call: one per block with a hash; without, blocks cut into pieces of about total / (4 * nthreads). */
static size_t cut(const job_t *jobs, size_t n, size_t total, int hash, int nthreads, piece_t *pieces) {
    size_t made = 0;
    size_t piece_bytes = nthreads > 1 ? total / (4 * (size_t)nthreads) + 1 : (size_t)-1;
    if (piece_bytes < MIN_PIECE_BYTES) piece_bytes = MIN_PIECE_BYTES;
    for (size_t i = 0; i < n; i++) {
        if (hash != HASH_NONE || jobs[i].len <= piece_bytes) {
            pieces[made++] = (piece_t){i, 0, jobs[i].len};
            continue;
        }
        for (size_t at = 0; at < jobs[i].len; at += piece_bytes)
            pieces[made++] = (piece_t){i, at, jobs[i].len - at < piece_bytes ? jobs[i].len - at : piece_bytes};
    }
    return made;
}

/* Count the pieces cut() makes, to size the allocation. */
static size_t count_pieces(const job_t *jobs, size_t n, size_t total, int hash, int nthreads) {
    size_t piece_bytes = nthreads > 1 ? total / (4 * (size_t)nthreads) + 1 : (size_t)-1;
    if (piece_bytes < MIN_PIECE_BYTES) piece_bytes = MIN_PIECE_BYTES;
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += (hash != HASH_NONE || jobs[i].len <= piece_bytes) ? 1 : (jobs[i].len + piece_bytes - 1) / piece_bytes;
    return count;
}

/* Run every job on this thread and up to nthreads - 1 helpers; 0, or -1 out of memory (nothing copied). */
static int run_jobs(const job_t *jobs, size_t n, size_t total, int hash, int nthreads, uint64_t *digests) {
    if (nthreads <= 1) {
        piece_t whole;
        work_t w = {.jobs = jobs, .digests = digests, .hash = hash};
        for (size_t i = 0; i < n; i++) {
            whole = (piece_t){i, 0, jobs[i].len};
            do_piece(&w, &whole);
        }
        STORE_FENCE();
        return 0;
    }
    size_t npieces = count_pieces(jobs, n, total, hash, nthreads);
    /* Helpers may outlive this call (one not yet run finds nothing to do): they get their own copy of the jobs. */
    char *mem = malloc(sizeof(work_t) + n * sizeof(job_t) + npieces * sizeof(piece_t) + n * sizeof(uint64_t));
    if (mem == NULL) return -1;
    work_t *w = (work_t *)mem;
    job_t *own_jobs = (job_t *)(mem + sizeof(work_t));
    piece_t *pieces = (piece_t *)(own_jobs + n);
    uint64_t *own_digests = (uint64_t *)(pieces + npieces);
    memcpy(own_jobs, jobs, n * sizeof(job_t));
    *w = (work_t){.jobs = own_jobs, .pieces = pieces, .digests = own_digests, .npieces = cut(jobs, n, total, hash, nthreads, pieces),
                  .hash = hash, .refs = 1, .owned = mem};
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->all_done, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int t = 1; t < nthreads; t++) {
        pthread_t tid;
        __atomic_add_fetch(&w->refs, 1, __ATOMIC_ACQ_REL);
        if (pthread_create(&tid, &attr, helper, w) != 0) {
            __atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL); /* no thread to be had: fewer helpers */
            break;
        }
    }
    pthread_attr_destroy(&attr);
    claim_pieces(w);
    pthread_mutex_lock(&w->lock);
    while (__atomic_load_n(&w->done, __ATOMIC_ACQUIRE) < w->npieces) pthread_cond_wait(&w->all_done, &w->lock);
    pthread_mutex_unlock(&w->lock);
    if (hash != HASH_NONE) memcpy(digests, own_digests, n * sizeof(uint64_t));
    release_work(w);
    return 0;
}

/* One side of the copy: a buffer for every block, or one buffer all blocks' offsets point into. */
typedef struct {
    Py_buffer *views;
    Py_ssize_t nviews;
    PyObject *seq; /* the list or tuple of buffers, or NULL */
} side_t;

static void release_side(side_t *s) {
    for (Py_ssize_t i = 0; i < s->nviews; i++) PyBuffer_Release(&s->views[i]);
    PyMem_Free(s->views);
    s->views = NULL;
    s->nviews = 0;
}

/* 1 taken, 0 the reference's (nothing held), -1 error set (nothing held). */
static int take_side(PyObject *obj, Py_ssize_t n, int writable, side_t *s) {
    s->seq = (PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) ? obj : NULL;
    Py_ssize_t count = s->seq != NULL ? PySequence_Fast_GET_SIZE(obj) : 1;
    if (s->seq != NULL && count != n) return 0;
    s->views = PyMem_Calloc(count > 0 ? (size_t)count : 1, sizeof(Py_buffer));
    s->nviews = 0;
    if (s->views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int flags = writable ? PyBUF_WRITABLE : PyBUF_SIMPLE;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = s->seq != NULL ? PySequence_Fast_ITEMS(obj)[i] : obj;
        if (PyObject_GetBuffer(item, &s->views[i], flags) < 0) {
            PyErr_Clear();
            release_side(s);
            return 0;
        }
        s->nviews++;
    }
    return 1;
}

/* Offsets of n blocks into offs: 1, or 0 when they are not plain ints >= 0 in a list or tuple of n. */
static int take_offsets(PyObject *obj, Py_ssize_t n, size_t *offs) {
    if (obj == Py_None) {
        memset(offs, 0, (size_t)n * sizeof(size_t));
        return 1;
    }
    if (!(PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) || PySequence_Fast_GET_SIZE(obj) != n) return 0;
    PyObject **items = PySequence_Fast_ITEMS(obj);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyLong_CheckExact(items[i])) return 0; /* bool and numpy ints: the reference decides */
        Py_ssize_t v = PyLong_AsSsize_t(items[i]);
        if (v < 0) {
            PyErr_Clear();
            return 0;
        }
        offs[i] = (size_t)v;
    }
    return 1;
}

/* copy_blocks(src, src_offsets, dst, dst_offsets, lengths, hash, threads) -> list[int] | None | NotImplemented
 *
 * src, dst: a buffer, or a list/tuple of one buffer per block; dst None hashes the sources only.
 * offsets: None (all 0) or a list/tuple of ints; lengths: a list/tuple of ints. hash: 0 none,
 * 1 each block's source, 2 each block's destination (after its copy). threads: the most to use.
 */
PyObject *kvn_copy_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "copy_blocks(src, src_offsets, dst, dst_offsets, lengths, hash, threads)");
        return NULL;
    }
    PyObject *src = args[0], *dst = args[2], *lengths = args[4];
    if (!PyLong_CheckExact(args[5]) || !PyLong_CheckExact(args[6])) KVN_RETURN_NOT_IMPLEMENTED;
    long hash = PyLong_AsLong(args[5]), threads = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    if (hash < HASH_NONE || hash > HASH_DEST || threads < 1 || (dst == Py_None && hash != HASH_SOURCE))
        KVN_RETURN_NOT_IMPLEMENTED;
    if (!(PyList_CheckExact(lengths) || PyTuple_CheckExact(lengths))) KVN_RETURN_NOT_IMPLEMENTED;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(lengths);

    PyObject *result = NULL;
    size_t *cols = PyMem_Malloc((n > 0 ? (size_t)n : 1) * 3 * sizeof(size_t));
    job_t *jobs = PyMem_Malloc((n > 0 ? (size_t)n : 1) * sizeof(job_t));
    uint64_t *digests = PyMem_Malloc((n > 0 ? (size_t)n : 1) * sizeof(uint64_t));
    side_t in = {0}, out = {0};
    int have_in = 0, have_out = 0;
    if (cols == NULL || jobs == NULL || digests == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t *src_offs = cols, *dst_offs = cols + n, *lens = cols + 2 * n;
    if (!take_offsets(lengths, n, lens) || !take_offsets(args[1], n, src_offs) ||
        (dst != Py_None && !take_offsets(args[3], n, dst_offs)))
        goto not_implemented;
    int got = take_side(src, n, 0, &in);
    if (got <= 0) goto got_side;
    have_in = 1;
    if (dst != Py_None) {
        got = take_side(dst, n, 1, &out);
        if (got <= 0) goto got_side;
        have_out = 1;
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Py_buffer *sv = &in.views[in.seq != NULL ? i : 0];
        if (src_offs[i] > (size_t)sv->len || lens[i] > (size_t)sv->len - src_offs[i]) goto not_implemented;
        jobs[i].src = (const unsigned char *)sv->buf + src_offs[i];
        jobs[i].len = lens[i];
        jobs[i].dst = NULL;
        if (have_out) {
            const Py_buffer *dv = &out.views[out.seq != NULL ? i : 0];
            if (dst_offs[i] > (size_t)dv->len || lens[i] > (size_t)dv->len - dst_offs[i]) goto not_implemented;
            jobs[i].dst = (unsigned char *)dv->buf + dst_offs[i];
        }
        total += lens[i];
    }
    int nthreads = (int)(threads < MAX_THREADS ? threads : MAX_THREADS);
    if ((size_t)nthreads > total / MIN_THREAD_BYTES) nthreads = (int)(total / MIN_THREAD_BYTES);
    if (nthreads < 1) nthreads = 1;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = run_jobs(jobs, (size_t)n, total, (int)hash, nthreads, digests);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    if (hash == HASH_NONE) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = PyList_New(n);
    if (result == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyLong_FromUnsignedLongLong(digests[i]);
        if (d == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, d);
    }
    goto done;

got_side:
    if (got < 0) goto done;
not_implemented:
    result = Py_NewRef(Py_NotImplemented);
done:
    if (have_in) release_side(&in);
    if (have_out) release_side(&out);
    PyMem_Free(cols);
    PyMem_Free(jobs);
    PyMem_Free(digests);
    return result;
}
