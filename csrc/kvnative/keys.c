/* Block keys: kvwire/keys.py block_keys, the chain h_i = xxh3_128(h_{i-1} || int64-LE tokens || extra_i).
 *
 * In Python the chain costs 0.3-0.45 ms for an 8k-token prompt (a bytes slice, a concatenation,
 * a hash call and a key object per 16-token block, and numpy's conversion of the token list);
 * it is on every request's path before the first control call. Here the tokens are read once
 * into an int64 buffer, each block hashed in place, and the keys built without the dataclass
 * __init__ (object.__new__ and object.__setattr__, as keys.py's _computed_key does).
 */
#include "kvnative.h"

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "../third_party/xxhash/xxhash.h"

static int host_is_little_endian(void) {
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

/* Whether a buffer holds signed 64-bit little-endian integers (numpy's "<i8" reports "l" or "q"). */
static int is_int64_le(const Py_buffer *view) {
    const char *f = view->format;
    if (view->itemsize != 8 || f == NULL) return 0;
    if (f[0] == '<') return (f[1] == 'q' || f[1] == 'l') && f[2] == '\0';
    if (!host_is_little_endian()) return 0;
    if (f[0] == '@' || f[0] == '=') f++;
    return (f[0] == 'q' || f[0] == 'l') && f[1] == '\0';
}

/* chain_keys(seed, tokens, block_tokens, extras, key_type) -> list[key_type] | NotImplemented
 *
 * seed: the 16-byte chain seed (keys.chain_seed). tokens: a list or tuple of plain ints, or a
 * 1-d buffer of int64-LE. extras: None or a list/tuple of bytes, one per full block at least.
 * Every token is checked, the trailing partial block's too, as numpy's conversion in the
 * reference checks them: a token that is not a plain int in int64 range is the reference's to
 * convert or refuse.
 */
PyObject *kvn_chain_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "chain_keys(seed, tokens, block_tokens, extras, key_type)");
        return NULL;
    }
    PyObject *seed = args[0], *tokens = args[1], *extras = args[3], *key_type = args[4];
    Py_ssize_t block_tokens = PyLong_AsSsize_t(args[2]);
    if (block_tokens == -1 && PyErr_Occurred()) return NULL;
    if (!PyBytes_CheckExact(seed) || PyBytes_GET_SIZE(seed) != 16 || block_tokens <= 0 || !PyType_Check(key_type))
        KVN_RETURN_NOT_IMPLEMENTED;

    PyObject *result = NULL;
    unsigned char *owned = NULL, *buf = NULL;
    const unsigned char *token_bytes = NULL;
    Py_buffer view;
    int have_view = 0;
    Py_ssize_t n;

    if (PyList_CheckExact(tokens) || PyTuple_CheckExact(tokens)) {
        n = PySequence_Fast_GET_SIZE(tokens);
        PyObject **items = PySequence_Fast_ITEMS(tokens);
        owned = PyMem_Malloc(n > 0 ? (size_t)n * 8 : 1);
        if (owned == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = items[i];
            int overflow = 0;
#if defined(__GNUC__)
            /* The int objects lie scattered over the heap: reading each one misses the cache, and that,
               not the conversion, was this loop's cost (8k tokens). Ask for later ones while this one converts. */
            if (i + 16 < n) __builtin_prefetch(items[i + 16]);
#endif
            if (!PyLong_CheckExact(item)) goto not_implemented;  /* bool, numpy scalars, floats: numpy decides */
#if PY_VERSION_HEX >= 0x030C0000
            /* token ids fit one digit: read it inline (half this loop's time for 8k tokens on 3.12) */
            if (PyUnstable_Long_IsCompact((PyLongObject *)item)) {
                kvn_put_u64(owned + 8 * i, (uint64_t)(long long)PyUnstable_Long_CompactValue((PyLongObject *)item));
                continue;
            }
#endif
            long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
            if (overflow) goto not_implemented;
            if (v == -1 && PyErr_Occurred()) goto done;
            kvn_put_u64(owned + 8 * i, (uint64_t)v);
        }
        token_bytes = owned;
    } else if (PyObject_CheckBuffer(tokens)) {
        if (PyObject_GetBuffer(tokens, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            KVN_RETURN_NOT_IMPLEMENTED;
        }
        have_view = 1;
        if (view.ndim != 1 || !is_int64_le(&view)) goto not_implemented;
        n = view.shape[0];
        token_bytes = view.buf;
    } else {
        KVN_RETURN_NOT_IMPLEMENTED;
    }

    Py_ssize_t full = n / block_tokens;
    Py_ssize_t max_extra = 0;
    PyObject **extra_items = NULL;
    if (extras != Py_None) {
        if (!(PyList_CheckExact(extras) || PyTuple_CheckExact(extras)) || PySequence_Fast_GET_SIZE(extras) < full)
            goto not_implemented;
        extra_items = PySequence_Fast_ITEMS(extras);
        for (Py_ssize_t i = 0; i < full; i++) {
            if (!PyBytes_CheckExact(extra_items[i])) goto not_implemented;
            if (PyBytes_GET_SIZE(extra_items[i]) > max_extra) max_extra = PyBytes_GET_SIZE(extra_items[i]);
        }
    }

    const size_t step = (size_t)block_tokens * 8;
    buf = PyMem_Malloc(16 + step + (size_t)max_extra);
    PyObject *keys = PyList_New(full);
    if (buf == NULL || keys == NULL) {
        Py_XDECREF(keys);
        if (buf == NULL) PyErr_NoMemory();
        goto done;
    }
    memcpy(buf, PyBytes_AS_STRING(seed), 16);
    for (Py_ssize_t i = 0; i < full; i++) {
        size_t len = 16 + step;
        memcpy(buf + 16, token_bytes + (size_t)i * step, step);
        if (extra_items != NULL) {
            Py_ssize_t extra_len = PyBytes_GET_SIZE(extra_items[i]);
            memcpy(buf + len, PyBytes_AS_STRING(extra_items[i]), (size_t)extra_len);
            len += (size_t)extra_len;
        }
        XXH128_canonical_t digest;
        XXH128_canonicalFromHash(&digest, XXH3_128bits(buf, len));
        memcpy(buf, digest.digest, 16);  /* the parent of the next block */

        PyObject *digest_bytes = PyBytes_FromStringAndSize((const char *)digest.digest, 16);
        PyObject *key = digest_bytes ? PyBaseObject_Type.tp_new((PyTypeObject *)key_type, kvn_empty_tuple, NULL) : NULL;
        if (key == NULL || PyObject_GenericSetAttr(key, kvn_str_digest, digest_bytes) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(digest_bytes);
            Py_DECREF(keys);
            goto done;
        }
        Py_DECREF(digest_bytes);
        PyList_SET_ITEM(keys, i, key);
    }
    result = keys;
    goto done;

not_implemented:
    result = Py_NewRef(Py_NotImplemented);
done:
    if (have_view) PyBuffer_Release(&view);
    PyMem_Free(owned);
    PyMem_Free(buf);
    return result;
}
