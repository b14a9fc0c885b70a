/* The local control socket's frames: kvwire/local_wire.py's encode_/decode_request and _response.
 *
 *   request:  u32 len | u16 n + method | f64 timeout_s (< 0: none) | metadata | payload
 *   response: u32 len | u8 code | u32 n + details | metadata | payload
 *   metadata: u16 pairs, each u16 n + key | u32 n + value (str as UTF-8; "-bin" keys' values stay bytes)
 *
 * The envelope is a few struct packs in Python (2-3.5 us a frame, four frames a call); here it
 * is one allocation and memcpy. Decoders answer (fields..., payload offset): the wrapper slices
 * the payload view itself. Anything the strict parse below refuses (a truncated field, bad
 * UTF-8) goes to the reference, which decides what it means.
 */
#include "kvnative.h"

#include <poll.h>
#include <sched.h>
#include <time.h>

typedef struct {
    const char *key;
    Py_ssize_t key_len;
    const char *value;
    Py_ssize_t value_len;
} Pair;

/* Pairs as the reference encodes them: str keys, bytes or str values. 1: ok, 0: not for us, -1: error. */
static int collect_pairs(PyObject *metadata, Pair **pairs_out, Py_ssize_t *count_out, Py_ssize_t *bytes_out) {
    if (!(PyTuple_CheckExact(metadata) || PyList_CheckExact(metadata))) return 0;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(metadata);
    if (count > 0xFFFF) return 0;
    Pair *pairs = PyMem_Malloc(sizeof(Pair) * (count ? (size_t)count : 1));
    if (pairs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t total = 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(metadata, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) goto not_ours;
        PyObject *key = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (!PyUnicode_CheckExact(key)) goto not_ours;
        pairs[i].key = PyUnicode_AsUTF8AndSize(key, &pairs[i].key_len);
        if (pairs[i].key == NULL) {
            PyErr_Clear();
            goto not_ours;
        }
        if (PyBytes_CheckExact(value)) {
            pairs[i].value = PyBytes_AS_STRING(value);
            pairs[i].value_len = PyBytes_GET_SIZE(value);
        } else if (PyUnicode_CheckExact(value)) {
            pairs[i].value = PyUnicode_AsUTF8AndSize(value, &pairs[i].value_len);
            if (pairs[i].value == NULL) {
                PyErr_Clear();
                goto not_ours;
            }
        } else {
            goto not_ours;
        }
        if (pairs[i].key_len > 0xFFFF || (uint64_t)pairs[i].value_len > 0xFFFFFFFFu) goto not_ours;
        total += 2 + pairs[i].key_len + 4 + pairs[i].value_len;
    }
    *pairs_out = pairs;
    *count_out = count;
    *bytes_out = total;
    return 1;
not_ours:
    PyMem_Free(pairs);
    return 0;
}

static unsigned char *put_pairs(unsigned char *p, const Pair *pairs, Py_ssize_t count) {
    kvn_put_u16(p, (uint32_t)count);
    p += 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        kvn_put_u16(p, (uint32_t)pairs[i].key_len);
        memcpy(p + 2, pairs[i].key, (size_t)pairs[i].key_len);
        p += 2 + pairs[i].key_len;
        kvn_put_u32(p, (uint32_t)pairs[i].value_len);
        memcpy(p + 4, pairs[i].value, (size_t)pairs[i].value_len);
        p += 4 + pairs[i].value_len;
    }
    return p;
}

/* Metadata at body[*at:], as the reference's tuple of (str, str | bytes); NULL with no error set: not ours. */
static PyObject *take_pairs(const unsigned char *body, Py_ssize_t size, Py_ssize_t *at) {
    Py_ssize_t i = *at;
    if (size - i < 2) return NULL;
    Py_ssize_t count = kvn_get_u16(body + i);
    i += 2;
    PyObject *pairs = PyTuple_New(count);
    if (pairs == NULL) return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        if (size - i < 2) goto not_ours;
        Py_ssize_t key_len = kvn_get_u16(body + i);
        i += 2;
        if (size - i < key_len + 4) goto not_ours;
        const char *key_at = (const char *)body + i;
        i += key_len;
        Py_ssize_t value_len = (Py_ssize_t)kvn_get_u32(body + i);
        i += 4;
        if (size - i < value_len) goto not_ours;
        PyObject *key = PyUnicode_DecodeUTF8(key_at, key_len, NULL);
        if (key == NULL) goto not_ours;
        int binary = key_len >= 4 && memcmp(key_at + key_len - 4, "-bin", 4) == 0;
        PyObject *value = binary ? PyBytes_FromStringAndSize((const char *)body + i, value_len)
                                 : PyUnicode_DecodeUTF8((const char *)body + i, value_len, NULL);
        i += value_len;
        if (value == NULL) {
            Py_DECREF(key);
            goto not_ours;
        }
        PyObject *pair = PyTuple_Pack(2, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (pair == NULL) goto not_ours;
        PyTuple_SET_ITEM(pairs, k, pair);
    }
    *at = i;
    return pairs;
not_ours:
    Py_DECREF(pairs);
    PyErr_Clear();  /* a decode error is the reference's to report, as FrameError */
    return NULL;
}

/* One frame: u32 body length | head | text | tail | metadata | payload, where a request's head is the method's
 * u16 length and its tail the f64 timeout, and a response's head the code and the details' u32 length. */
static PyObject *encode_frame(const unsigned char *head, Py_ssize_t head_len, const char *text, Py_ssize_t text_len,
                              const unsigned char *tail, Py_ssize_t tail_len, PyObject *metadata, PyObject *payload_object,
                              Py_ssize_t max_frame) {
    Pair *pairs;
    Py_ssize_t count, pairs_bytes;
    int got = collect_pairs(metadata, &pairs, &count, &pairs_bytes);
    if (got <= 0) {
        if (got < 0) return NULL;
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    Py_buffer payload;
    if (PyObject_GetBuffer(payload_object, &payload, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyMem_Free(pairs);
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    PyObject *frame = NULL;
    Py_ssize_t body = head_len + text_len + tail_len + pairs_bytes + payload.len;
    if (body > max_frame || (uint64_t)body > 0xFFFFFFFFu) {
        frame = Py_NewRef(Py_NotImplemented);  /* the reference raises FrameError, with its message */
    } else if ((frame = PyBytes_FromStringAndSize(NULL, 4 + body)) != NULL) {
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
        kvn_put_u32(p, (uint32_t)body);
        memcpy(p + 4, head, (size_t)head_len);
        p += 4 + head_len;
        memcpy(p, text, (size_t)text_len);
        if (tail_len) memcpy(p + text_len, tail, (size_t)tail_len);
        p = put_pairs(p + text_len + tail_len, pairs, count);
        memcpy(p, payload.buf, (size_t)payload.len);
    }
    PyBuffer_Release(&payload);
    PyMem_Free(pairs);
    return frame;
}

/* A str as UTF-8 of at most max_len bytes, or NULL (no error set): the reference's to encode or refuse. */
static const char *utf8_of(PyObject *text, Py_ssize_t max_len, Py_ssize_t *len) {
    if (!PyUnicode_CheckExact(text)) return NULL;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, len);
    if (utf8 == NULL) PyErr_Clear();
    return utf8 != NULL && *len <= max_len ? utf8 : NULL;
}

/* encode_request(method, timeout_s, metadata, payload, max_frame_bytes) -> bytes | NotImplemented */
PyObject *kvn_encode_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "encode_request(method, timeout_s, metadata, payload, max_frame_bytes)");
        return NULL;
    }
    PyObject *timeout = args[1];
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[4]), method_len;
    if (max_frame == -1 && PyErr_Occurred()) return NULL;
    double timeout_s = -1.0;
    if (timeout != Py_None) {
        if (!(PyFloat_CheckExact(timeout) || PyLong_CheckExact(timeout))) KVN_RETURN_NOT_IMPLEMENTED;
        timeout_s = PyFloat_AsDouble(timeout);
        if (timeout_s == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            KVN_RETURN_NOT_IMPLEMENTED;
        }
    }
    const char *method = utf8_of(args[0], 0xFFFF, &method_len);
    if (method == NULL) KVN_RETURN_NOT_IMPLEMENTED;
    unsigned char head[2], tail[8];
    uint64_t bits;
    memcpy(&bits, &timeout_s, 8);
    kvn_put_u16(head, (uint32_t)method_len);
    kvn_put_u64(tail, bits);
    return encode_frame(head, 2, method, method_len, tail, 8, args[2], args[3], max_frame);
}

/* encode_response(code, details, trailing, payload, max_frame_bytes) -> bytes | NotImplemented */
PyObject *kvn_encode_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "encode_response(code, details, trailing, payload, max_frame_bytes)");
        return NULL;
    }
    long code = PyLong_AsLong(args[0]);
    if (code == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[4]), details_len;
    if (max_frame == -1 && PyErr_Occurred()) return NULL;
    const char *details = utf8_of(args[1], 0xFFFFFFFF, &details_len);
    if (code < 0 || code > 255 || details == NULL) KVN_RETURN_NOT_IMPLEMENTED;
    unsigned char head[5] = {(unsigned char)code};
    kvn_put_u32(head + 1, (uint32_t)details_len);
    return encode_frame(head, 5, details, details_len, NULL, 0, args[2], args[3], max_frame);
}

/* A frame's body: its head (a request's method and timeout, a response's code and details), its metadata,
 * and where the payload starts; NotImplemented for anything the strict parse refuses. */
static PyObject *decode_frame(PyObject *const *args, Py_ssize_t nargs, int response) {
    Py_buffer view;
    KVN_ONE_BUFFER(response ? "decode_response(body)" : "decode_request(body)", &view);
    const unsigned char *body = view.buf;
    Py_ssize_t size = view.len, text_at = response ? 5 : 2, text_len, at;
    PyObject *result = NULL, *text = NULL, *pairs = NULL;
    if (size < text_at) goto not_ours;
    text_len = response ? (Py_ssize_t)kvn_get_u32(body + 1) : (Py_ssize_t)kvn_get_u16(body);
    at = text_at + text_len + (response ? 0 : 8);  /* a request's f64 timeout follows its method */
    if (size < at || (text = PyUnicode_DecodeUTF8((const char *)body + text_at, text_len, NULL)) == NULL) goto not_ours;
    if ((pairs = take_pairs(body, size, &at)) == NULL) goto not_ours;
    if (response) {
        result = Py_BuildValue("(iOOn)", (int)body[0], text, pairs, at);
    } else {
        uint64_t bits = kvn_get_u64(body + text_at + text_len);
        double timeout_s;
        memcpy(&timeout_s, &bits, 8);
        result = Py_BuildValue("(OdOn)", text, timeout_s, pairs, at);
    }
    goto done;
not_ours:
    PyErr_Clear();
    result = Py_NewRef(Py_NotImplemented);
done:
    Py_XDECREF(text);
    Py_XDECREF(pairs);
    PyBuffer_Release(&view);
    return result;
}

/* decode_request(body) -> (method, timeout_s, metadata, payload_at) | NotImplemented; timeout_s < 0: none */
PyObject *kvn_decode_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return decode_frame(args, nargs, 0);
}

/* decode_response(body) -> (code, details, trailing, payload_at) | NotImplemented */
PyObject *kvn_decode_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return decode_frame(args, nargs, 1);
}

static inline uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* poll_readable(fd, spin_ns) -> bool
 *
 * Busy-polls fd, GIL released, until it is readable (or hung up) or spin_ns have passed; True if it is.
 * A thread blocked in recv is woken by the kernel and rescheduled, which on a host whose cores idle
 * cost a local-socket round trip ~0.1-0.3 ms more than the call's own work; polling first skips that.
 * Each turn yields the core to any other runnable thread, so a poller only takes time nobody wants. */
PyObject *kvn_poll_readable(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "poll_readable(fd, spin_ns)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    long long spin_ns = PyLong_AsLongLong(args[1]);
    if ((fd == -1 || spin_ns == -1) && PyErr_Occurred()) return NULL;
    int ready = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t deadline = monotonic_ns() + (uint64_t)(spin_ns > 0 ? spin_ns : 0);
    struct pollfd pfd = {.fd = (int)fd, .events = POLLIN | POLLRDHUP};
    do {
        int n = poll(&pfd, 1, 0);
        if (n != 0) {  /* readable, hung up, or an error the caller's recv will report */
            ready = 1;
            break;
        }
        sched_yield();
    } while (monotonic_ns() < deadline);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ready);
}
