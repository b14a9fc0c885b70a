/* kvstore._native.FlatIndex: what a prefix Pin reads of each block, in one flat native table beside the block
 * index's dict (kvstore/index.py BlockIndex keeps the two in step: add, remove, attach, detach).
 *
 * A prefix Pin of an 8k-token prompt walks 512 blocks. Through the dict that walk is a chain of dependent loads a
 * block (the dict's slot, its entry, the key's bytes, the BlockMeta, its copies dict and that dict's table, the
 * Slot, the Slot's int objects, the checksum's int): some ten cache lines, one after another. On a host whose
 * caches the engine's forward pass has just cleared, that chain is most of the server's answer (430-480 us of it on
 * an H200 host, against 110-140 us on a development box whose caches are warmer). Here a block is one 128-byte row
 * (key, tenant tag, fingerprint, host and HBM offsets, sizes, checksum, the BlockMeta) found through an
 * open-addressing table of row numbers (rows in chunks that never move; a bucket keeps its row's hash bits, so the
 * table grows without reading a row), and the walk runs in stages over all the keys at once (hash and prefetch
 * every bucket, then read them and prefetch every row, then read the rows and prefetch every BlockMeta, then count
 * the pins), so the misses of 512 blocks overlap instead of queueing: the way hash joins and Mooncake's and
 * Dynamo's block indices lay out their hot paths.
 *
 * Rows hold copies of BlockMeta fields that do not change while a block is indexed (skey, fingerprint, size,
 * checksum) and of its HOST and HBM slots, which change only through BlockIndex.attach and detach. The dict stays
 * the index: a row the table cannot hold exactly (a field of another type or out of range) is kept "opaque", and a
 * walk that meets one answers NotImplemented before changing anything, for the caller to run the Python
 * definition. The buckets are keyed by XXH3 with a seed the caller draws at random, so keys a tenant chooses cannot
 * aim at one bucket chain.
 *
 * It also takes the blocks it holds out of the cycle collector's sight (PyObject_GC_UnTrack: the BlockMeta, its copies
 * dict, and the copies of the leaf types it was given). Their fields are leaves (bytes, str, ints, enum members), so
 * they can be in no cycle; but tracked, each full collection walked them all: 346 ms for a million blocks on a 2-core
 * box, a stall of every request, every time a quarter as many new objects again had survived. Untracked objects are
 * still freed by reference counting.
 */
#include "pin_table.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "../third_party/xxhash/xxhash.h"

#define TAG_BYTES 8
#define KEY_BYTES 16
#define SKEY_BYTES (TAG_BYTES + KEY_BYTES)
#define FP_BYTES 16
#define NONE UINT64_MAX  /* no copy on that tier */
#define ROW_HOST 1u
#define ROW_HBM 2u
#define ROW_OPAQUE 4u
#define MIN_BUCKETS 1024
#define CHUNK_BITS 12  /* rows come in chunks of 4096 (512 KiB), never moved: the table grows without copying them */
#define CHUNK_ROWS (1u << CHUNK_BITS)
#define MAX_WALK 4096  /* keys a walk takes on the stack's side tables; more: NotImplemented (the store sends 1024 at most) */

typedef struct {
    /* first line: what the walk compares and the columns it answers */
    unsigned char key[KEY_BYTES];
    unsigned char tag[TAG_BYTES];
    unsigned char fp[FP_BYTES];
    uint64_t host_offset, hbm_offset, checksum;
    /* second line */
    PyObject *meta;  /* strong: the dict holds it too */
    uint64_t size, host_size;
    uint32_t flags, pad;
    unsigned char spare[32];
} Row;

_Static_assert(sizeof(Row) == 128, "a row is two cache lines");

typedef struct {
    uint32_t row;  /* 0: empty; rows are numbered from 1 */
    uint32_t hash;  /* the low 32 bits of the row's hash: its home bucket, so growing rehashes without reading rows */
} Bucket;

typedef struct {
    PyObject_HEAD
    Row **chunks;  /* row r is chunks[r >> CHUNK_BITS][r & (CHUNK_ROWS - 1)]; row 0 unused */
    uint32_t chunks_cap, rows_cap, rows_used, free_head;  /* free rows chained through their pad field */
    Bucket *buckets;
    uint64_t mask;  /* buckets - 1 */
    Py_ssize_t count;
    uint64_t seed;
    PyObject *leaf_types;  /* tuple of the copy types whose instances hold only leaves (Slot, Record) */
} FlatIndex;

static inline Row *row_at(const FlatIndex *self, uint32_t r) {
    return &self->chunks[r >> CHUNK_BITS][r & (CHUNK_ROWS - 1)];
}

static inline uint64_t hash_skey(const FlatIndex *self, const unsigned char *tag, const unsigned char *key) {
    unsigned char skey[SKEY_BYTES];
    memcpy(skey, tag, TAG_BYTES);
    memcpy(skey + TAG_BYTES, key, KEY_BYTES);
    return XXH3_64bits_withSeed(skey, SKEY_BYTES, self->seed);
}

static void *aligned_zeroed(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 128, bytes ? bytes : 128) != 0) return NULL;
    memset(p, 0, bytes);
    return p;
}

/* The bucket of (tag, key) with hash h, or of an empty slot where it would go. */
static inline uint64_t probe(const FlatIndex *self, uint64_t h, const unsigned char *tag, const unsigned char *key) {
    uint64_t at = h & self->mask;
    for (;;) {
        const Bucket *b = &self->buckets[at];
        if (b->row == 0) return at;
        if (b->hash == (uint32_t)h) {
            const Row *r = row_at(self, b->row);
            if (memcmp(r->key, key, KEY_BYTES) == 0 && memcmp(r->tag, tag, TAG_BYTES) == 0) return at;
        }
        at = (at + 1) & self->mask;
    }
}

static int grow_buckets(FlatIndex *self) {
    uint64_t n = (self->mask + 1) * 2;
    Bucket *fresh = aligned_zeroed(n * sizeof(Bucket));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Bucket *old = self->buckets;
    uint64_t old_n = self->mask + 1;
    self->buckets = fresh;
    self->mask = n - 1;
    for (uint64_t i = 0; i < old_n; i++) {
        if (old[i].row == 0) continue;
        uint64_t at = old[i].hash & self->mask;
        while (fresh[at].row != 0) at = (at + 1) & self->mask;
        fresh[at] = old[i];
    }
    free(old);
    return 0;
}

static uint32_t new_row(FlatIndex *self) {
    if (self->free_head != 0) {
        uint32_t r = self->free_head;
        self->free_head = row_at(self, r)->pad;
        return r;
    }
    if (self->rows_used + 1 >= self->rows_cap) {
        if (self->rows_cap >= UINT32_MAX / 2) {
            PyErr_SetString(PyExc_OverflowError, "FlatIndex: too many blocks");
            return 0;
        }
        uint32_t chunk = self->rows_cap >> CHUNK_BITS;
        if (chunk == self->chunks_cap) {
            uint32_t cap = self->chunks_cap * 2;
            Row **chunks = realloc(self->chunks, sizeof(Row *) * cap);
            if (chunks == NULL) {
                PyErr_NoMemory();
                return 0;
            }
            self->chunks = chunks;
            self->chunks_cap = cap;
        }
        self->chunks[chunk] = aligned_zeroed(CHUNK_ROWS * sizeof(Row));
        if (self->chunks[chunk] == NULL) {
            PyErr_NoMemory();
            return 0;
        }
        self->rows_cap += CHUNK_ROWS;
    }
    return ++self->rows_used;
}

/* Remove the bucket at `at`, shifting later entries of its run back (linear probing's deletion, no tombstones). */
static void drop_bucket(FlatIndex *self, uint64_t at) {
    uint64_t hole = at, next = (at + 1) & self->mask;
    while (self->buckets[next].row != 0) {
        uint64_t home = self->buckets[next].hash & self->mask;
        /* move next into hole unless its home lies cyclically in (hole, next] */
        int stays = hole <= next ? (home > hole && home <= next) : (home > hole || home <= next);
        if (!stays) {
            self->buckets[hole] = self->buckets[next];
            hole = next;
        }
        next = (next + 1) & self->mask;
    }
    self->buckets[hole].row = 0;
    self->buckets[hole].hash = 0;
}

static int u64_of(PyObject *value, uint64_t *out) {
    if (!PyLong_CheckExact(value)) return 0;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (overflow == 1) {  /* a checksum may use all 64 bits */
        unsigned long long u = PyLong_AsUnsignedLongLong(value);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        *out = u;
        return 1;
    }
    if (overflow != 0) return 0;
    *out = (uint64_t)v;  /* -1 (no copy) becomes NONE, which a size or a checksum may not be */
    return v >= -1;
}

/* Fill row's copies of the fields, or mark it opaque where one is not what the walk can answer exactly. */
static void fill(Row *row, PyObject *const *args) {
    PyObject *fp = args[2];
    uint64_t size, checksum, host_offset, host_size, hbm_offset;
    int exact = PyBytes_CheckExact(fp) && PyBytes_GET_SIZE(fp) == FP_BYTES && u64_of(args[3], &size) && size != NONE &&
                u64_of(args[4], &checksum) && checksum != NONE && u64_of(args[5], &host_offset) && u64_of(args[6], &host_size) &&
                u64_of(args[7], &hbm_offset) && (host_offset == NONE) == (host_size == NONE) && kvs_pinnable(&args[1], 1);
    row->flags = exact ? 0 : ROW_OPAQUE;
    if (!exact) return;
    memcpy(row->fp, PyBytes_AS_STRING(fp), FP_BYTES);
    row->size = size;
    row->checksum = checksum;
    row->host_offset = host_offset;
    row->host_size = host_size;
    row->hbm_offset = hbm_offset;
    row->flags = (host_offset != NONE ? ROW_HOST : 0) | (hbm_offset != NONE ? ROW_HBM : 0);
}

/* 1: a storage key a walk can name (tenant tag + a block key of 16 bytes); 0: another length, which no walk names, so
 * the table need not hold it; -1: not bytes (TypeError). */
static int skey_ok(PyObject *skey) {
    if (!PyBytes_CheckExact(skey)) {
        PyErr_SetString(PyExc_TypeError, "FlatIndex: a storage key is bytes");
        return -1;
    }
    return PyBytes_GET_SIZE(skey) == SKEY_BYTES;
}

/* Out of the cycle collector's sight: meta, its copies of a leaf type, and the copies dict once all its values are. */
static void untrack_block(FlatIndex *self, PyObject *meta) {
    PyObject *copies = kvs_meta_copies(meta), *tier, *copy;
    if (copies == NULL) return;
    if (PyDict_CheckExact(copies)) {
        int leaves = 1;
        Py_ssize_t pos = 0, n = PyTuple_GET_SIZE(self->leaf_types);
        while (PyDict_Next(copies, &pos, &tier, &copy)) {
            int leaf = 0;
            for (Py_ssize_t t = 0; t < n && !leaf; t++) leaf = Py_IS_TYPE(copy, (PyTypeObject *)PyTuple_GET_ITEM(self->leaf_types, t));
            if (leaf && PyObject_GC_IsTracked(copy)) PyObject_GC_UnTrack(copy);
            leaves &= leaf || !PyObject_GC_IsTracked(copy);
        }
        if (leaves && PyObject_GC_IsTracked(copies)) PyObject_GC_UnTrack(copies);  /* a tracked copy added later re-tracks it */
    }
    if (PyObject_GC_IsTracked(meta)) PyObject_GC_UnTrack(meta);
}

#define ROW_ARGS "(skey, meta, fingerprint_id, size, checksum, host_offset, host_size, hbm_offset)"

/* put(skey, meta, fingerprint_id, size, checksum, host_offset, host_size, hbm_offset): the row of skey is meta's
 * (replacing another block's); an offset or size of -1: no copy on that tier. */
static PyObject *put(FlatIndex *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "put" ROW_ARGS);
        return NULL;
    }
    int ok = skey_ok(args[0]);
    if (ok <= 0) return ok < 0 ? NULL : Py_NewRef(Py_None);
    const unsigned char *skey = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    if ((uint64_t)(self->count + 1) * 2 > self->mask + 1 && grow_buckets(self) < 0) return NULL;
    uint64_t h = hash_skey(self, skey, skey + TAG_BYTES);
    uint64_t at = probe(self, h, skey, skey + TAG_BYTES);
    Row *row;
    if (self->buckets[at].row != 0) {
        row = row_at(self, self->buckets[at].row);
        Py_SETREF(row->meta, Py_NewRef(args[1]));
    } else {
        uint32_t r = new_row(self);
        if (r == 0) return NULL;
        row = row_at(self, r);
        memset(row, 0, sizeof(Row));
        memcpy(row->tag, skey, TAG_BYTES);
        memcpy(row->key, skey + TAG_BYTES, KEY_BYTES);
        row->meta = Py_NewRef(args[1]);
        self->buckets[at].row = r;
        self->buckets[at].hash = (uint32_t)h;
        self->count++;
    }
    fill(row, args);
    untrack_block(self, args[1]);
    Py_RETURN_NONE;
}

/* The row of skey if it is meta's, else NULL. */
static Row *row_of(FlatIndex *self, PyObject *skey_obj, PyObject *meta, uint64_t *at_out) {
    const unsigned char *skey = (const unsigned char *)PyBytes_AS_STRING(skey_obj);
    uint64_t at = probe(self, hash_skey(self, skey, skey + TAG_BYTES), skey, skey + TAG_BYTES);
    if (self->buckets[at].row == 0) return NULL;
    Row *row = row_at(self, self->buckets[at].row);
    if (row->meta != meta) return NULL;
    if (at_out != NULL) *at_out = at;
    return row;
}

/* update(skey, meta, ...): put's, if skey's row is meta's (a copy attached or detached); else nothing. */
static PyObject *update(FlatIndex *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "update" ROW_ARGS);
        return NULL;
    }
    int ok = skey_ok(args[0]);
    if (ok <= 0) return ok < 0 ? NULL : Py_NewRef(Py_None);
    Row *row = row_of(self, args[0], args[1], NULL);
    if (row != NULL) {
        fill(row, args);
        untrack_block(self, args[1]);
    }
    Py_RETURN_NONE;
}

/* drop(skey, meta): forget skey's row if it is meta's. */
static PyObject *drop(FlatIndex *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "drop(skey, meta)");
        return NULL;
    }
    int ok = skey_ok(args[0]);
    if (ok <= 0) return ok < 0 ? NULL : Py_NewRef(Py_None);
    uint64_t at = 0;
    Row *row = row_of(self, args[0], args[1], &at);
    if (row == NULL) Py_RETURN_NONE;
    uint32_t r = self->buckets[at].row;
    drop_bucket(self, at);
    PyObject *meta = row->meta;
    memset(row, 0, sizeof(Row));
    row->pad = self->free_head;
    self->free_head = r;
    self->count--;
    Py_DECREF(meta);
    Py_RETURN_NONE;
}

/* row(skey) -> (meta, fingerprint_id, size, checksum, host_offset, host_size, hbm_offset) | "opaque" | None: what
 * the table holds for skey (-1: no copy), for the tests that hold it to the dict. */
static PyObject *row(FlatIndex *self, PyObject *skey) {
    int ok = skey_ok(skey);
    if (ok <= 0) return ok < 0 ? NULL : Py_NewRef(Py_None);
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(skey);
    uint64_t at = probe(self, hash_skey(self, s, s + TAG_BYTES), s, s + TAG_BYTES);
    if (self->buckets[at].row == 0) Py_RETURN_NONE;
    const Row *r = row_at(self, self->buckets[at].row);
    if (r->flags & ROW_OPAQUE) return Py_BuildValue("(Os)", r->meta, "opaque");
    return Py_BuildValue("(Oy#KKLLL)", r->meta, (const char *)r->fp, (Py_ssize_t)FP_BYTES, (unsigned long long)r->size,
                         (unsigned long long)r->checksum, r->host_offset == NONE ? -1LL : (long long)r->host_offset,
                         r->host_offset == NONE ? -1LL : (long long)r->host_size,
                         r->hbm_offset == NONE ? -1LL : (long long)r->hbm_offset);
}

/* values as a list of ints; a value equal to the one before it shares its object (a prompt's blocks are mostly one
 * size: 512 allocations fewer). */
static PyObject *u64_list(const uint64_t *values, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = i > 0 && values[i] == values[i - 1] ? Py_NewRef(PyList_GET_ITEM(list, i - 1))
                                                           : PyLong_FromUnsignedLongLong(values[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* values as bytes of native uint64s (packed columns: no int object a value; the Pin's encoder reads them whole). */
static PyObject *u64_bytes(const uint64_t *values, Py_ssize_t n) {
    return PyBytes_FromStringAndSize((const char *)values, n * (Py_ssize_t)sizeof(uint64_t));
}

/* pin_prefix(tag, keys, fingerprint_id, hbm_values, packed) -> (metas, columns, placement) | NotImplemented
 *
 * BlockTable.pin_leading_columns without its touch, and HbmPlacement.pin_placement's columns, from the rows: the
 * leading run of keys whose blocks are stored under fingerprint_id (tag: the tenant's), each pin-counted (pins += 1);
 * columns: (offsets, sizes, checksums, payload_bytes) of their host copies, None when one of the run has none;
 * placement, where hbm_values is (hbm, host) (Tier values) and columns are given: (tiers, hbm_offsets, in_hbm), None
 * when no block of the run has an HBM copy. packed: each column as bytes of native uint64s instead of a list of ints.
 * keys: a list of bytes, or one bytes object of keys key after key. NotImplemented, with nothing changed, for keys of
 * another type and for a run through an opaque row. */
static PyObject *pin_prefix(FlatIndex *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "pin_prefix(tag, keys, fingerprint_id, hbm_values, packed)");
        return NULL;
    }
    PyObject *tag_obj = args[0], *keys = args[1], *fp_obj = args[2], *hbm_values = args[3];
    int packed = PyObject_IsTrue(args[4]);
    if (packed < 0) return NULL;
    PyObject *(*column)(const uint64_t *, Py_ssize_t) = packed ? u64_bytes : u64_list;
    /* keys: a list of bytes, or one bytes object of KEY_BYTES keys key after key (kvwire's PackedKeys.packed) */
    const char *packed_keys = PyBytes_CheckExact(keys) ? PyBytes_AS_STRING(keys) : NULL;
    if (packed_keys != NULL ? PyBytes_GET_SIZE(keys) % KEY_BYTES != 0 : !PyList_CheckExact(keys))
        Py_RETURN_NOTIMPLEMENTED;
    Py_ssize_t n = packed_keys != NULL ? PyBytes_GET_SIZE(keys) / KEY_BYTES : PyList_GET_SIZE(keys), run = n;
    if (!PyBytes_CheckExact(tag_obj) || PyBytes_GET_SIZE(tag_obj) != TAG_BYTES || !PyBytes_CheckExact(fp_obj) || n > MAX_WALK ||
        !(hbm_values == Py_None || PyTuple_CheckExact(hbm_values)))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *hbm_value = NULL, *host_value = NULL;
    uint64_t hbm_code = 0, host_code = 0;
    if (hbm_values != Py_None) {
        if (PyTuple_GET_SIZE(hbm_values) != 2) Py_RETURN_NOTIMPLEMENTED;
        hbm_value = PyTuple_GET_ITEM(hbm_values, 0);
        host_value = PyTuple_GET_ITEM(hbm_values, 1);
        if (!u64_of(hbm_value, &hbm_code) || !u64_of(host_value, &host_code) || hbm_code == NONE || host_code == NONE)
            Py_RETURN_NOTIMPLEMENTED;
    }
    const unsigned char *tag = (const unsigned char *)PyBytes_AS_STRING(tag_obj);
    const unsigned char *fp = (const unsigned char *)PyBytes_AS_STRING(fp_obj);
    int fp_exact = PyBytes_GET_SIZE(fp_obj) == FP_BYTES;  /* else no row matches: an empty run */
    uint64_t *hashes = PyMem_Malloc(sizeof(uint64_t) * 4 * (size_t)(n ? n : 1));
    Row **rows = PyMem_Malloc(sizeof(Row *) * (size_t)(n ? n : 1));
    PyObject **metas = PyMem_Malloc(sizeof(PyObject *) * (size_t)(n ? n : 1));
    PyObject *result = NULL;
    if (hashes == NULL || rows == NULL || metas == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t *offsets = hashes + n, *sizes = hashes + 2 * n, *checksums = hashes + 3 * n;

    /* 1. Hash every key and prefetch its bucket. A key of another length ends the run, as a miss does. */
#define KEY_AT(i) ((const unsigned char *)(packed_keys != NULL ? packed_keys + (i) * KEY_BYTES : PyBytes_AS_STRING(PyList_GET_ITEM(keys, (i)))))
    for (Py_ssize_t i = 0; i < n; i++) {
        if (packed_keys == NULL) {
            PyObject *key = PyList_GET_ITEM(keys, i);
            if (!PyBytes_CheckExact(key)) goto not_ours;
            if (PyBytes_GET_SIZE(key) != KEY_BYTES) {
                run = i;
                break;
            }
        }
        hashes[i] = hash_skey(self, tag, KEY_AT(i));
        __builtin_prefetch(&self->buckets[hashes[i] & self->mask], 0, 1);
    }
    if (!fp_exact) run = 0;
    /* 2. Find each row's bucket by its hash alone and prefetch the row: the run ends at the first key with none. */
    for (Py_ssize_t i = 0; i < run; i++) {
        uint64_t at = hashes[i] & self->mask;
        while (self->buckets[at].row != 0 && self->buckets[at].hash != (uint32_t)hashes[i]) at = (at + 1) & self->mask;
        if (self->buckets[at].row == 0) {
            run = i;
            break;
        }
        rows[i] = row_at(self, self->buckets[at].row);
        __builtin_prefetch(rows[i], 0, 1);
        __builtin_prefetch((char *)rows[i] + 64, 0, 1);
    }
    /* 3. Read the rows: the run ends at a key whose bucket was another's, or at another fingerprint's block; prefetch each block for its pin count. */
    int on_host = 1;
    Py_ssize_t in_hbm = 0;
    uint64_t payload = 0;
    for (Py_ssize_t i = 0; i < run; i++) {
        const unsigned char *key = KEY_AT(i);
        if (memcmp(rows[i]->key, key, KEY_BYTES) != 0 || memcmp(rows[i]->tag, tag, TAG_BYTES) != 0) {
            uint64_t at = probe(self, hashes[i], tag, key);  /* another key's 32 hash bits: look on (rare) */
            if (self->buckets[at].row == 0) {
                run = i;
                break;
            }
            rows[i] = row_at(self, self->buckets[at].row);
        }
        const Row *r = rows[i];
        if (r->flags & ROW_OPAQUE) goto not_ours;
        if (memcmp(r->fp, fp, FP_BYTES) != 0) {
            run = i;
            break;
        }
        metas[i] = r->meta;
        __builtin_prefetch(r->meta, 1, 1);
        if (!(r->flags & ROW_HOST)) on_host = 0;
        offsets[i] = r->host_offset;
        sizes[i] = r->host_size;
        checksums[i] = r->checksum;
        payload += r->size;
        in_hbm += (r->flags & ROW_HBM) != 0;
    }
#undef KEY_AT
    if (!kvs_pinnable(metas, run)) goto not_ours;

    /* 4. The answer, then the pins (nothing fails after them). */
    PyObject *list = PyList_New(run), *columns = NULL, *placement = NULL;
    if (list == NULL) goto done;
    for (Py_ssize_t i = 0; i < run; i++) PyList_SET_ITEM(list, i, Py_NewRef(metas[i]));
    if (on_host) {
        PyObject *o = column(offsets, run), *s = o ? column(sizes, run) : NULL, *c = s ? column(checksums, run) : NULL;
        if (c != NULL) columns = Py_BuildValue("(OOOK)", o, s, c, (unsigned long long)payload);
        Py_XDECREF(o);
        Py_XDECREF(s);
        Py_XDECREF(c);
        if (columns == NULL) goto fail;
        if (hbm_value != NULL && in_hbm > 0) {
            /* the tiers column into sizes, the HBM offsets into offsets: both read already */
            for (Py_ssize_t i = 0; i < run; i++) {
                int there = (rows[i]->flags & ROW_HBM) != 0;
                sizes[i] = there ? hbm_code : host_code;
                offsets[i] = there ? rows[i]->hbm_offset : 0;
            }
            PyObject *tiers = NULL;
            if (packed) {
                tiers = u64_bytes(sizes, run);
            } else if ((tiers = PyList_New(run)) != NULL) {  /* the callers' own Tier values, shared */
                for (Py_ssize_t i = 0; i < run; i++) PyList_SET_ITEM(tiers, i, Py_NewRef(sizes[i] == hbm_code ? hbm_value : host_value));
            }
            PyObject *at = tiers ? column(offsets, run) : NULL;
            if (at != NULL) placement = Py_BuildValue("(OOn)", tiers, at, in_hbm);
            Py_XDECREF(tiers);
            Py_XDECREF(at);
            if (placement == NULL) goto fail;
        }
    }
    if (kvs_count_pins(metas, run) < 0) goto fail;
    result = PyTuple_Pack(3, list, columns ? columns : Py_None, placement ? placement : Py_None);
fail:
    Py_DECREF(list);
    Py_XDECREF(columns);
    Py_XDECREF(placement);
    goto done;
not_ours:
    result = Py_NewRef(Py_NotImplemented);
done:
    PyMem_Free(hashes);
    PyMem_Free(rows);
    PyMem_Free(metas);
    return result;
}

static Py_ssize_t flat_len(FlatIndex *self) {
    return self->count;
}

static PyObject *flat_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    unsigned long long seed = 0;
    PyObject *leaf_types = NULL;
    static char *names[] = {"seed", "leaf_types", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KO!", names, &seed, &PyTuple_Type, &leaf_types)) return NULL;
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(leaf_types); t++)
        if (!PyType_Check(PyTuple_GET_ITEM(leaf_types, t))) {
            PyErr_SetString(PyExc_TypeError, "FlatIndex: leaf_types is a tuple of types");
            return NULL;
        }
    FlatIndex *self = (FlatIndex *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->seed = seed;
    self->leaf_types = Py_NewRef(leaf_types);
    self->chunks_cap = 16;
    self->chunks = calloc(self->chunks_cap, sizeof(Row *));
    self->buckets = aligned_zeroed(MIN_BUCKETS * sizeof(Bucket));
    self->mask = MIN_BUCKETS - 1;
    if (self->chunks == NULL || self->buckets == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void flat_dealloc(FlatIndex *self) {
    if (self->chunks != NULL) {
        for (uint32_t r = 1; r <= self->rows_used; r++) Py_XDECREF(row_at(self, r)->meta);
        for (uint32_t c = 0; c < (self->rows_cap >> CHUNK_BITS); c++) free(self->chunks[c]);
    }
    free(self->chunks);
    free(self->buckets);
    Py_XDECREF(self->leaf_types);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef flat_methods[] = {
    {"put", (PyCFunction)(void (*)(void))put, METH_FASTCALL, "put" ROW_ARGS " -> None"},
    {"update", (PyCFunction)(void (*)(void))update, METH_FASTCALL, "update" ROW_ARGS " -> None (only if skey's row is meta's)"},
    {"drop", (PyCFunction)(void (*)(void))drop, METH_FASTCALL, "drop(skey, meta) -> None (only if skey's row is meta's)"},
    {"row", (PyCFunction)row, METH_O, "row(skey) -> (meta, fingerprint_id, size, checksum, host_offset, host_size, hbm_offset) | (meta, 'opaque') | None"},
    {"pin_prefix", (PyCFunction)(void (*)(void))pin_prefix, METH_FASTCALL,
     "pin_prefix(tag, keys, fingerprint_id, hbm_values, packed) -> (metas, columns | None, placement | None) | NotImplemented"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods flat_sequence = {.sq_length = (lenfunc)flat_len};

static PyTypeObject FlatIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstore._native.FlatIndex",
    .tp_basicsize = sizeof(FlatIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FlatIndex(seed, leaf_types): what a prefix Pin reads of each block, in flat rows (csrc/kvstore_native/flat_index.c)",
    .tp_new = flat_new,
    .tp_dealloc = (destructor)flat_dealloc,
    .tp_methods = flat_methods,
    .tp_as_sequence = &flat_sequence,
};

int kvs_add_flat_index(PyObject *module) {
    if (PyType_Ready(&FlatIndexType) < 0) return -1;
    return PyModule_AddObjectRef(module, "FlatIndex", (PyObject *)&FlatIndexType);
}
