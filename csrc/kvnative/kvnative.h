/* kvwire._native: the control path's hot loops in C, each beside its Python reference.
 *
 *   keys.c          kvwire/keys.py block_keys: the chained xxh3-128 over a prompt's blocks
 *   frames.c        kvwire/local_wire.py: the local control socket's frame envelope
 *   pin_messages.c  kvwire/pin_codec.py: the Pin call's protobuf messages as plain columns, and the
 *                   client's rows of its answer
 *   block_copy.c    kvwire/blockcopy.py: a gather/scatter copy of many blocks with each block's xxh3-64,
 *                   GIL released, over threads for large calls
 *   load_tables.c   engines/load_tables.py: a prefix load's gather and checksum kernel tables from its Pin's answer
 *
 * One rule for every function here: it answers exactly what its reference answers, or it
 * returns NotImplemented and the Python wrapper runs the reference, which then gives the
 * answer or raises its own error. So anything unusual (a token that is not a plain int, a
 * frame that does not parse, a protobuf field this code does not know) costs speed, never
 * a different result, and no error message has two versions. tests/kvwire/test_native.py
 * holds the two against each other.
 */
#ifndef KVNATIVE_H
#define KVNATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Bumped whenever a function's arguments or answers change: a stale build is then not used. */
#define KVNATIVE_ABI 6

#define KVN_RETURN_NOT_IMPLEMENTED Py_RETURN_NOTIMPLEMENTED

/* ---- little-endian stores and loads, whatever the host's byte order ---- */

static inline void kvn_put_u16(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static inline void kvn_put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static inline void kvn_put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static inline uint32_t kvn_get_u16(const unsigned char *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }

static inline uint32_t kvn_get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t kvn_get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* A decoder's one argument as a buffer: 1, or 0 when it is none (the reference's to refuse), or -1 on a
 * wrong call (an error set). */
static inline int kvn_one_buffer(PyObject *const *args, Py_ssize_t nargs, const char *usage, Py_buffer *view) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

#define KVN_ONE_BUFFER(usage, view)                                 \
    do {                                                            \
        int got_ = kvn_one_buffer(args, nargs, usage, view);        \
        if (got_ < 0) return NULL;                                  \
        if (got_ == 0) KVN_RETURN_NOT_IMPLEMENTED;                  \
    } while (0)

/* The functions each file adds to the module. */
PyObject *kvn_chain_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_encode_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_decode_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_encode_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_decode_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_poll_readable(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_encode_pin_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_decode_pin_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_encode_pin_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_decode_pin_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_decode_pin_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_slot_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_copy_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvn_write_load_tables(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* Interned attribute names, set once at import (module.c). */
extern PyObject *kvn_str_digest;
extern PyObject *kvn_empty_tuple;

#endif
