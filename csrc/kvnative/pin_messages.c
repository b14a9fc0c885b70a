/* The Pin call's protobuf messages (proto/kvwire/v1/kvstore.proto) as plain columns: kvwire/pin_codec.py.
 *
 *   PinRequest  { bytes fingerprint_id = 1; repeated bytes keys = 2; uint32 ttl_ms = 3;
 *                 repeated uint64 release_pin_ids = 4; bool prefix_only = 5; }
 *   PinResponse { uint64 pin_id = 1; int64 expires_unix_ms = 3; repeated uint64 offsets = 4;
 *                 repeated uint64 lengths = 5; repeated uint64 checksums = 6; }
 *
 * A prefix Pin names hundreds of keys and answers three columns of as many ints; building and
 * reading those through protobuf message objects cost ~45 us a side for 512 blocks, more than
 * the socket round trip. The encoders write what protobuf's serializer writes (fields in number
 * order, proto3 defaults omitted, repeated ints packed), which the tests check byte for byte;
 * the decoders read any field order, packed or not, and leave everything else (an unknown
 * field, a malformed varint, a uint32 out of range) to protobuf itself.
 */
#include "kvnative.h"

#include <limits.h>

static inline int varint_size(uint64_t v) {
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static inline unsigned char *put_varint(unsigned char *p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (unsigned char)v;
    return p;
}

/* The varint at *p, or NULL for a truncated or over-long one. */
static inline const unsigned char *get_varint(const unsigned char *p, const unsigned char *end, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        unsigned char b = *p++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            if (shift == 63 && b > 1) return NULL;
            *out = v;
            return p;
        }
    }
    return NULL;
}

/* An int in [0, 2**64) as uint64, or (uint64_t)-1 with an error set. PyLong_AsUnsignedLong where unsigned long
 * is 64 bits: it reads the digits directly, where PyLong_AsUnsignedLongLong goes through _PyLong_AsByteArray,
 * three times slower for the 64-bit checksums (~16 us of a 512-block Pin answer). */
static inline uint64_t as_u64(PyObject *value) {
#if ULONG_MAX == UINT64_MAX
    return PyLong_AsUnsignedLong(value);
#else
    return PyLong_AsUnsignedLongLong(value);
#endif
}

/* A list or tuple of plain ints in [0, 2**64) as uint64s: 1 ok, 0 not ours, -1 error. */
/* A one-dimensional buffer of native unsigned 64-bit ints (array('Q'), a numpy uint64 array): copied whole. */
static int read_u64_buffer(PyObject *obj, uint64_t **out, Py_ssize_t *count) {
    Py_buffer view;
    if (PyBytes_Check(obj) || !PyObject_CheckBuffer(obj)) return 0;
    if (PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 0;
    }
    const char *f = view.format != NULL ? view.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;  /* native or little-endian (this code runs little-endian) */
    int ok = view.ndim == 1 && view.itemsize == 8 && (strcmp(f, "Q") == 0 || (strcmp(f, "L") == 0 && sizeof(unsigned long) == 8));
    uint64_t *values = ok ? PyMem_Malloc(view.len ? (size_t)view.len : 1) : NULL;
    if (ok && values == NULL) {
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return -1;
    }
    if (ok) {
        memcpy(values, view.buf, (size_t)view.len);
        *out = values;
        *count = view.len / 8;
    }
    PyBuffer_Release(&view);
    return ok;
}

static int read_u64s(PyObject *seq, uint64_t **out, Py_ssize_t *count) {
    if (!(PyList_CheckExact(seq) || PyTuple_CheckExact(seq))) return read_u64_buffer(seq, out, count);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *values = PyMem_Malloc(sizeof(uint64_t) * (n ? (size_t)n : 1));
    if (values == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyLong_CheckExact(item)) goto not_ours;
        values[i] = as_u64(item);
        if (values[i] == (uint64_t)-1 && PyErr_Occurred()) {
            PyErr_Clear();  /* negative or too large: protobuf's ValueError, from the reference */
            goto not_ours;
        }
    }
    *out = values;
    *count = n;
    return 1;
not_ours:
    PyMem_Free(values);
    return 0;
}

static Py_ssize_t packed_size(const uint64_t *values, Py_ssize_t n) {
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < n; i++) size += varint_size(values[i]);
    return size;
}

static unsigned char *put_packed(unsigned char *p, int field, const uint64_t *values, Py_ssize_t n, Py_ssize_t size) {
    if (n == 0) return p;
    *p++ = (unsigned char)(field << 3 | 2);
    p = put_varint(p, (uint64_t)size);
    for (Py_ssize_t i = 0; i < n; i++) p = put_varint(p, values[i]);
    return p;
}

/* encode_pin_request(fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only) -> bytes | NotImplemented */
PyObject *kvn_encode_pin_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "encode_pin_request(fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only)");
        return NULL;
    }
    PyObject *fingerprint_id = args[0], *keys = args[1], *ttl = args[2], *prefix_only = args[4];
    if (!PyBytes_CheckExact(fingerprint_id) || !(PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) ||
        !PyLong_CheckExact(ttl) || !PyBool_Check(prefix_only))
        KVN_RETURN_NOT_IMPLEMENTED;
    unsigned long long ttl_ms = PyLong_AsUnsignedLongLong(ttl);
    if ((ttl_ms == (unsigned long long)-1 && PyErr_Occurred()) || ttl_ms > 0xFFFFFFFFu) {
        PyErr_Clear();
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    uint64_t *ids;
    Py_ssize_t n_ids;
    int got = read_u64s(args[3], &ids, &n_ids);
    if (got <= 0) {
        if (got < 0) return NULL;
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    Py_ssize_t n_keys = PySequence_Fast_GET_SIZE(keys), fp_len = PyBytes_GET_SIZE(fingerprint_id);
    Py_ssize_t size = fp_len ? 1 + varint_size((uint64_t)fp_len) + fp_len : 0;
    for (Py_ssize_t i = 0; i < n_keys; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(key)) {
            PyMem_Free(ids);
            KVN_RETURN_NOT_IMPLEMENTED;
        }
        size += 1 + varint_size((uint64_t)PyBytes_GET_SIZE(key)) + PyBytes_GET_SIZE(key);
    }
    if (ttl_ms) size += 1 + varint_size(ttl_ms);
    Py_ssize_t ids_size = packed_size(ids, n_ids);
    if (n_ids) size += 1 + varint_size((uint64_t)ids_size) + ids_size;
    if (prefix_only == Py_True) size += 2;

    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out != NULL) {
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
        if (fp_len) {
            *p++ = 1 << 3 | 2;
            p = put_varint(p, (uint64_t)fp_len);
            memcpy(p, PyBytes_AS_STRING(fingerprint_id), (size_t)fp_len);
            p += fp_len;
        }
        for (Py_ssize_t i = 0; i < n_keys; i++) {
            PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
            *p++ = 2 << 3 | 2;
            p = put_varint(p, (uint64_t)PyBytes_GET_SIZE(key));
            memcpy(p, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
            p += PyBytes_GET_SIZE(key);
        }
        if (ttl_ms) {
            *p++ = 3 << 3;
            p = put_varint(p, ttl_ms);
        }
        p = put_packed(p, 4, ids, n_ids, ids_size);
        if (prefix_only == Py_True) {
            *p++ = 5 << 3;
            *p++ = 1;
        }
    }
    PyMem_Free(ids);
    return out;
}

/* encode_pin_response(pin_id, expires_unix_ms, offsets, lengths, checksums[, tiers, hbm_offsets, hbm_pool_id])
 *   -> bytes | NotImplemented
 *
 * The HBM columns (fields 10 and 11, and the pool id, 12) only where a pinned block has an HBM copy: an
 * engine's whole prefix, when its server has the tier, so they are on the hot path as much as the rest. */
#define PIN_COLUMNS 5
static const int pin_column_fields[PIN_COLUMNS] = {4, 5, 6, 10, 11};

PyObject *kvn_encode_pin_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5 && nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_pin_response(pin_id, expires_unix_ms, offsets, lengths, checksums[, tiers, hbm_offsets, hbm_pool_id])");
        return NULL;
    }
    if (!PyLong_CheckExact(args[0]) || !PyLong_CheckExact(args[1])) KVN_RETURN_NOT_IMPLEMENTED;
    uint64_t pool_id = 0;
    if (nargs == 8) {
        if (!PyLong_CheckExact(args[7])) KVN_RETURN_NOT_IMPLEMENTED;
        pool_id = as_u64(args[7]);
        if (pool_id == (uint64_t)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            KVN_RETURN_NOT_IMPLEMENTED;
        }
    }
    uint64_t pin_id = as_u64(args[0]);
    if (pin_id == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    long long expires = PyLong_AsLongLong(args[1]);
    if (expires == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    uint64_t *columns[PIN_COLUMNS] = {NULL, NULL, NULL, NULL, NULL};
    Py_ssize_t counts[PIN_COLUMNS] = {0, 0, 0, 0, 0}, sizes[PIN_COLUMNS] = {0, 0, 0, 0, 0};
    int n_columns = nargs == 8 ? 5 : 3;
    PyObject *out = NULL;
    for (int c = 0; c < n_columns; c++) {
        int got = read_u64s(args[2 + c], &columns[c], &counts[c]);
        if (got <= 0) {
            out = got < 0 ? NULL : Py_NewRef(Py_NotImplemented);
            goto done;
        }
        sizes[c] = packed_size(columns[c], counts[c]);
    }
    Py_ssize_t size = 0;
    if (pin_id) size += 1 + varint_size(pin_id);
    if (expires) size += 1 + varint_size((uint64_t)expires);  /* a negative int64 is ten bytes, as protobuf writes it */
    for (int c = 0; c < n_columns; c++)
        if (counts[c]) size += 1 + varint_size((uint64_t)sizes[c]) + sizes[c];
    if (pool_id) size += 1 + varint_size(pool_id);
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out != NULL) {
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
        if (pin_id) {
            *p++ = 1 << 3;
            p = put_varint(p, pin_id);
        }
        if (expires) {
            *p++ = 3 << 3;
            p = put_varint(p, (uint64_t)expires);
        }
        for (int c = 0; c < n_columns; c++) p = put_packed(p, pin_column_fields[c], columns[c], counts[c], sizes[c]);
        if (pool_id) {
            *p++ = 12 << 3;
            p = put_varint(p, pool_id);
        }
    }
done:
    for (int c = 0; c < PIN_COLUMNS; c++) PyMem_Free(columns[c]);
    return out;
}

/* Appends a repeated uint64 field's values (packed, wire type 2, or one unpacked, wire type 0) to list. */
static const unsigned char *take_u64s(const unsigned char *p, const unsigned char *end, int wire_type, PyObject *list) {
    const unsigned char *stop = end;
    if (wire_type == 2) {
        uint64_t len;
        p = get_varint(p, end, &len);
        if (p == NULL || len > (uint64_t)(end - p)) return NULL;
        stop = p + len;
    } else if (wire_type != 0) {
        return NULL;
    }
    do {
        uint64_t v;
        p = get_varint(p, stop, &v);
        if (p == NULL) return NULL;
        PyObject *item = PyLong_FromUnsignedLongLong(v);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            return NULL;
        }
        Py_DECREF(item);
    } while (wire_type == 2 && p < stop);
    return p;
}

/* A length-delimited field's bytes at p, or NULL. */
static const unsigned char *take_bytes(const unsigned char *p, const unsigned char *end, PyObject **out) {
    uint64_t len;
    p = get_varint(p, end, &len);
    if (p == NULL || len > (uint64_t)(end - p)) return NULL;
    *out = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)len);
    return *out ? p + len : NULL;
}

/* The keys of a Pin request as the wire carried them: where each starts, and whether all share one width. */
typedef struct {
    const unsigned char *at;
    Py_ssize_t len;
} KeySpan;

typedef struct {
    KeySpan *spans;
    Py_ssize_t n, cap, width;  /* width: every key's length so far, or -1 once two differ */
} KeySpans;

static int add_key_span(KeySpans *spans, const unsigned char *at, Py_ssize_t len) {
    if (spans->n == spans->cap) {
        Py_ssize_t cap = spans->cap ? 2 * spans->cap : 64;
        KeySpan *grown = PyMem_Realloc(spans->spans, sizeof(*grown) * (size_t)cap);
        if (grown == NULL) return -1;
        spans->spans = grown;
        spans->cap = cap;
    }
    spans->spans[spans->n++] = (KeySpan){at, len};
    if (spans->n == 1) spans->width = len;
    else if (spans->width != len) spans->width = -1;
    return 0;
}

/* decode_pin_request(payload) -> (fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only, key_width) | NotImplemented
 *
 * keys: with key_width > 0 (every key that long), all of them in one bytes object, key after key; else a list of
 * bytes. A 512-key Pin's keys as one copy instead of 512 objects: ~25 us of the server's answer with cold caches. */
PyObject *kvn_decode_pin_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_buffer view;
    KVN_ONE_BUFFER("decode_pin_request(payload)", &view);
    const unsigned char *p = view.buf, *end = p + view.len;
    PyObject *fingerprint_id = PyBytes_FromStringAndSize(NULL, 0), *keys = NULL, *ids = PyList_New(0), *result = NULL;
    KeySpans spans = {NULL, 0, 0, 0};
    uint64_t ttl_ms = 0, prefix_only = 0;
    if (fingerprint_id == NULL || ids == NULL) goto done;
    while (p < end) {
        uint64_t tag, v;
        PyObject *item = NULL;
        p = get_varint(p, end, &tag);
        if (p == NULL) goto not_ours;
        switch (tag) {
            case 1 << 3 | 2:
                p = take_bytes(p, end, &item);
                if (p == NULL) goto not_ours;
                Py_SETREF(fingerprint_id, item);  /* a singular field: the last one counts */
                break;
            case 2 << 3 | 2:
                p = get_varint(p, end, &v);
                if (p == NULL || v > (uint64_t)(end - p)) goto not_ours;
                if (add_key_span(&spans, p, (Py_ssize_t)v) < 0) {
                    PyErr_NoMemory();
                    goto done;
                }
                p += v;
                break;
            case 3 << 3:
                p = get_varint(p, end, &v);
                if (p == NULL || v > 0xFFFFFFFFu) goto not_ours;
                ttl_ms = v;
                break;
            case 4 << 3 | 2:
            case 4 << 3:
                p = take_u64s(p, end, (int)(tag & 7), ids);
                if (p == NULL) goto not_ours;
                break;
            case 5 << 3:
                p = get_varint(p, end, &v);
                if (p == NULL || v > 1) goto not_ours;
                prefix_only = v;
                break;
            default:
                goto not_ours;
        }
    }
    Py_ssize_t width = spans.width > 0 ? spans.width : 0;
    if (width) {
        keys = PyBytes_FromStringAndSize(NULL, spans.n * width);
        if (keys == NULL) goto done;
        char *out = PyBytes_AS_STRING(keys);
        for (Py_ssize_t i = 0; i < spans.n; i++) memcpy(out + i * width, spans.spans[i].at, (size_t)width);
    } else {
        keys = PyList_New(spans.n);
        if (keys == NULL) goto done;
        for (Py_ssize_t i = 0; i < spans.n; i++) {
            PyObject *key = PyBytes_FromStringAndSize((const char *)spans.spans[i].at, spans.spans[i].len);
            if (key == NULL) goto done;
            PyList_SET_ITEM(keys, i, key);
        }
    }
    result = Py_BuildValue("(OOKOOn)", fingerprint_id, keys, (unsigned long long)ttl_ms, ids, prefix_only ? Py_True : Py_False, width);
    goto done;
not_ours:
    PyErr_Clear();
    result = Py_NewRef(Py_NotImplemented);
done:
    PyMem_Free(spans.spans);
    Py_XDECREF(fingerprint_id);
    Py_XDECREF(keys);
    Py_XDECREF(ids);
    PyBuffer_Release(&view);
    return result;
}

/* A packed uint64 column as a tuple, sized by counting its last varint bytes first. A value equal to
 * the one before reuses its int (a Pin's lengths are mostly one block size). NULL: not ours, or an error. */
static PyObject *packed_tuple(const unsigned char *p, const unsigned char *stop) {
    Py_ssize_t n = 0;
    for (const unsigned char *q = p; q < stop; q++) n += !(*q & 0x80);
    PyObject *column = PyTuple_New(n), *last = NULL;
    uint64_t last_value = 0;
    if (column == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v;
        p = get_varint(p, stop, &v);
        if (p == NULL) {
            Py_DECREF(column);
            return NULL;
        }
        if (last != NULL && v == last_value) {
            Py_INCREF(last);
        } else if ((last = PyLong_FromUnsignedLongLong(v)) == NULL) {
            Py_DECREF(column);
            return NULL;
        }
        last_value = v;
        PyTuple_SET_ITEM(column, i, last);
    }
    if (p != stop) {  /* the last varint ran past the field */
        Py_DECREF(column);
        return NULL;
    }
    return column;
}

/* Where a PinResponse's fields lie, as protobuf's serializer writes them: each column (offsets, lengths,
 * checksums, tiers, hbm_offsets) packed, at most once, with its count of values. */
typedef struct {
    uint64_t pin_id, expires, pool_id;
    const unsigned char *at[PIN_COLUMNS], *stop[PIN_COLUMNS];
    Py_ssize_t count[PIN_COLUMNS];
} pin_response_t;

/* 1 where payload parses so; 0 for anything else (a column split over several fields, or unpacked, is
 * legal protobuf that no server of ours sends: the reference reads it), with no Python error set. */
static int scan_pin_response(const unsigned char *p, const unsigned char *end, pin_response_t *r) {
    memset(r, 0, sizeof *r);
    while (p < end) {
        uint64_t tag, len;
        if ((p = get_varint(p, end, &tag)) == NULL) return 0;
        switch (tag) {
            case 1 << 3:
                p = get_varint(p, end, &r->pin_id);
                break;
            case 3 << 3:
                p = get_varint(p, end, &r->expires);
                break;
            case 12 << 3:
                p = get_varint(p, end, &r->pool_id);
                break;
            case 4 << 3 | 2:
            case 5 << 3 | 2:
            case 6 << 3 | 2:
            case 10 << 3 | 2:
            case 11 << 3 | 2: {
                int field = (int)(tag >> 3), c = field <= 6 ? field - 4 : field - 7;
                p = get_varint(p, end, &len);
                if (p == NULL || len > (uint64_t)(end - p) || r->at[c] != NULL) return 0;
                r->at[c] = p;
                r->stop[c] = p + len;
                for (const unsigned char *q = p; q < r->stop[c]; q++) r->count[c] += !(*q & 0x80);
                p += len;
                break;
            }
            default:
                return 0;
        }
        if (p == NULL) return 0;
    }
    return 1;
}

/* decode_pin_response(payload) -> (pin_id, expires_unix_ms, offsets, lengths, checksums) | NotImplemented
 *
 * Answers with HBM columns are the reference's (this tuple has no place for them). */
PyObject *kvn_decode_pin_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_buffer view;
    KVN_ONE_BUFFER("decode_pin_response(payload)", &view);
    PyObject *columns[3] = {NULL, NULL, NULL}, *result = NULL;
    pin_response_t r;
    if (!scan_pin_response(view.buf, (const unsigned char *)view.buf + view.len, &r) || r.at[3] || r.at[4] || r.pool_id)
        goto not_ours;
    for (int c = 0; c < 3; c++) {
        columns[c] = r.at[c] != NULL ? packed_tuple(r.at[c], r.stop[c]) : PyTuple_New(0);
        if (columns[c] == NULL) goto not_ours;
    }
    result = Py_BuildValue("(KLOOO)", (unsigned long long)r.pin_id, (long long)(int64_t)r.expires, columns[0], columns[1], columns[2]);
    goto done;
not_ours:
    PyErr_Clear();
    result = Py_NewRef(Py_NotImplemented);
done:
    for (int c = 0; c < 3; c++) Py_XDECREF(columns[c]);
    PyBuffer_Release(&view);
    return result;
}

/* The values of a packed uint64 field into out (n of them, counted beforehand); 0 if one runs past the field. */
static int packed_values(const unsigned char *p, const unsigned char *stop, uint64_t *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if ((p = get_varint(p, stop, &out[i])) == NULL) return 0;
    return p == stop;
}

/* decode_pin_columns(payload) -> (pin_id, expires_unix_ms, cells, n, payload_bytes, hbm_columns, hbm_pool_id)
 *   | NotImplemented
 *
 * decode_pin_response's answer with its columns as one bytes object of native-endian uint64s (offsets,
 * lengths, checksums, then, where hbm_columns is 2, tiers and hbm_offsets: 3n or 5n values) and the
 * lengths' sum: no int object per value (1,000 of them for a 512-block Pin, ~15 us). Only where the
 * columns are as long as each other; anything else (and what scan_pin_response leaves to the
 * reference) is NotImplemented. */
PyObject *kvn_decode_pin_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_buffer view;
    KVN_ONE_BUFFER("decode_pin_columns(payload)", &view);
    PyObject *cells = NULL, *result = NULL;
    pin_response_t r;
    if (!scan_pin_response(view.buf, (const unsigned char *)view.buf + view.len, &r)) goto not_ours;
    Py_ssize_t n = r.count[0];
    if (r.count[1] != n || r.count[2] != n) goto not_ours;
    /* The HBM columns come together, each a value per block, or not at all (then a pool id means nothing). */
    int n_columns = r.at[3] != NULL || r.at[4] != NULL ? 5 : 3;
    if (n_columns == 5 && (r.count[3] != n || r.count[4] != n)) goto not_ours;
    if ((cells = PyBytes_FromStringAndSize(NULL, n_columns * n * (Py_ssize_t)sizeof(uint64_t))) == NULL) goto done;
    uint64_t *values = (uint64_t *)PyBytes_AS_STRING(cells), payload_bytes = 0;
    for (int c = 0; c < n_columns; c++)
        if (n && !packed_values(r.at[c], r.stop[c], values + c * n, n)) goto not_ours;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (values[n + i] > UINT64_MAX - payload_bytes) goto not_ours;
        payload_bytes += values[n + i];
    }
    result = Py_BuildValue("(KLOnKiK)", (unsigned long long)r.pin_id, (long long)(int64_t)r.expires, cells, n,
                           (unsigned long long)payload_bytes, n_columns - 3, (unsigned long long)r.pool_id);
    goto done;
not_ours:
    PyErr_Clear();
    result = Py_NewRef(Py_NotImplemented);
done:
    Py_XDECREF(cells);
    PyBuffer_Release(&view);
    return result;
}

/* slot_rows(row_type, first_index, offsets, sizes, handle, checksums, expires_unix_ms) -> list | NotImplemented
 *
 * The client's rows of a Pin's answer: row_type((first_index + i, offsets[i], sizes[i], handle, checksums[i],
 * expires_unix_ms)) for each block, row_type being a 6-field tuple class (kvclient's SlotRef). Built as
 * tuple.__new__(row_type, ...) builds one; namedtuple's _make over zipped columns cost ~0.15 ms for 512. */
PyObject *kvn_slot_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "slot_rows(row_type, first_index, offsets, sizes, handle, checksums, expires_unix_ms)");
        return NULL;
    }
    PyObject *row_type = args[0], *first = args[1], *handle = args[4], *expires = args[6];
    PyObject *offsets = args[2], *sizes = args[3], *checksums = args[5];
    if (!PyType_Check(row_type) || !PyType_IsSubtype((PyTypeObject *)row_type, &PyTuple_Type) ||
        ((PyTypeObject *)row_type)->tp_basicsize != PyTuple_Type.tp_basicsize || !PyLong_CheckExact(first) ||
        !PyTuple_CheckExact(offsets) || !PyTuple_CheckExact(sizes) || !PyTuple_CheckExact(checksums))
        KVN_RETURN_NOT_IMPLEMENTED;
    Py_ssize_t n = PyTuple_GET_SIZE(offsets);
    if (PyTuple_GET_SIZE(sizes) != n || PyTuple_GET_SIZE(checksums) != n) KVN_RETURN_NOT_IMPLEMENTED;
    Py_ssize_t start = PyLong_AsSsize_t(first);
    if (start == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    PyTypeObject *type = (PyTypeObject *)row_type;
    PyObject *rows = PyList_New(n);
    if (rows == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *index = PyLong_FromSsize_t(start + i);
        PyObject *row = index ? type->tp_alloc(type, 6) : NULL;
        if (row == NULL) {
            Py_XDECREF(index);
            Py_DECREF(rows);
            return NULL;
        }
        PyTuple_SET_ITEM(row, 0, index);
        PyTuple_SET_ITEM(row, 1, Py_NewRef(PyTuple_GET_ITEM(offsets, i)));
        PyTuple_SET_ITEM(row, 2, Py_NewRef(PyTuple_GET_ITEM(sizes, i)));
        PyTuple_SET_ITEM(row, 3, Py_NewRef(handle));
        PyTuple_SET_ITEM(row, 4, Py_NewRef(PyTuple_GET_ITEM(checksums, i)));
        PyTuple_SET_ITEM(row, 5, Py_NewRef(expires));
        PyList_SET_ITEM(rows, i, row);
    }
    return rows;
}
