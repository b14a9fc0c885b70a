/* Block copies: kvwire/blockcopy.py copy_blocks, a gather/scatter memcpy over (source, offset, length)
 * -> (destination, offset), each block's xxh3-64 taken while its bytes are still in cache.
 *
 * In Python a get of 512 blocks of 64 KiB out of the shared pool spent ~10 us a block in slicing,
 * np.copyto and the hash call, twice the copy itself; a put hashed every block in one pass and
 * copied it in another. Here one call copies every block of a request with the GIL released, in
 * chunks of CHUNK_BYTES that are hashed right after they are copied (one pass over memory, not
 * two), on up to `threads` threads once a call moves MIN_THREAD_BYTES per thread. Without a hash a
 * call is split by bytes, a block larger than a share included; with one, at block boundaries
 * (a block's hash is sequential).
 *
 * Anything the C cannot take as given (a buffer that is not C-contiguous, a read-only destination,
 * an offset out of range, an argument of another type) is the reference's to copy or refuse, with
 * its one error message: NotImplemented, before any byte moved.
 */
#include "kvnative.h"

#include <pthread.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "../third_party/xxhash/xxhash.h"

#define HASH_NONE 0
#define HASH_SOURCE 1
#define HASH_DEST 2
#define MAX_THREADS 16
#define CHUNK_BYTES (64 * 1024)
#define MIN_THREAD_BYTES (2 * 1024 * 1024)

typedef struct {
    const unsigned char *src;
    unsigned char *dst; /* NULL: hash only */
    size_t len;
} job_t;

typedef struct {
    const job_t *jobs;
    uint64_t *digests;
    int hash;
    size_t first;      /* first block */
    size_t end;        /* one past the last block (hashing parts) */
    size_t first_skip; /* bytes of the first block another part copies (byte-split parts) */
    size_t bytes;      /* bytes to copy (byte-split parts) */
} part_t;

static void copy_hashed(const job_t *job, int hash, uint64_t *digest) {
    if (job->len <= CHUNK_BYTES || hash == HASH_NONE) {
        if (job->dst != NULL && job->len) memcpy(job->dst, job->src, job->len);
        if (hash != HASH_NONE) *digest = XXH3_64bits(hash == HASH_DEST ? job->dst : job->src, job->len);
        return;
    }
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    for (size_t at = 0; at < job->len; at += CHUNK_BYTES) {
        size_t n = job->len - at < CHUNK_BYTES ? job->len - at : CHUNK_BYTES;
        if (job->dst != NULL) memcpy(job->dst + at, job->src + at, n);
        XXH3_64bits_update(&state, (hash == HASH_DEST ? job->dst : job->src) + at, n);
    }
    *digest = XXH3_64bits_digest(&state);
}

static void *run_part(void *arg) {
    const part_t *p = arg;
    if (p->hash != HASH_NONE) {
        for (size_t i = p->first; i < p->end; i++) copy_hashed(&p->jobs[i], p->hash, &p->digests[i]);
        return NULL;
    }
    size_t i = p->first, skip = p->first_skip, left = p->bytes;
    while (left > 0) {
        const job_t *job = &p->jobs[i];
        size_t n = job->len - skip < left ? job->len - skip : left;
        if (n) memcpy(job->dst + skip, job->src + skip, n);
        left -= n;
        skip = 0;
        i++;
    }
    return NULL;
}

/* Cut the work into at most nparts parts of about equal bytes; returns how many parts there are. */
static int plan(const job_t *jobs, size_t n, size_t total, int hash, int nparts, uint64_t *digests, part_t *parts) {
    if (hash != HASH_NONE) {
        int made = 0;
        size_t i = 0, done = 0;
        for (int t = 0; t < nparts && i < n; t++) {
            size_t target = (size_t)((double)total * (t + 1) / nparts);
            size_t start = i;
            while (i < n && (done < target || i == start || t == nparts - 1)) done += jobs[i++].len;
            parts[made++] = (part_t){jobs, digests, hash, start, i, 0, 0};
        }
        return made;
    }
    size_t share = (total + nparts - 1) / nparts, i = 0, skip = 0;
    int made = 0;
    for (size_t left = total; left > 0 && made < nparts;) {
        size_t want = share < left ? share : left;
        parts[made++] = (part_t){jobs, NULL, HASH_NONE, i, 0, skip, want};
        left -= want;
        while (want > 0) { /* advance past the bytes this part copies */
            size_t in_block = jobs[i].len - skip;
            if (in_block > want) {
                skip += want;
                want = 0;
            } else {
                want -= in_block;
                skip = 0;
                i++;
            }
        }
    }
    return made;
}

static void run_parts(part_t *parts, int nparts) {
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < nparts; t++) started[t] = pthread_create(&tids[t], NULL, run_part, &parts[t]) == 0;
    run_part(&parts[0]);
    for (int t = 1; t < nparts; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            run_part(&parts[t]); /* no thread to be had: this one does it */
    }
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
    int nparts = (int)(threads < MAX_THREADS ? threads : MAX_THREADS);
    if ((size_t)nparts > total / MIN_THREAD_BYTES) nparts = (int)(total / MIN_THREAD_BYTES);
    if (nparts < 1) nparts = 1;
    part_t parts[MAX_THREADS];
    Py_BEGIN_ALLOW_THREADS
    nparts = plan(jobs, (size_t)n, total, (int)hash, nparts, digests, parts);
    if (nparts > 0) run_parts(parts, nparts);
    Py_END_ALLOW_THREADS
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
