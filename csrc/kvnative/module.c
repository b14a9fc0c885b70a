/* kvwire._native: the module table. What each function does is in its file (kvnative.h lists them). */
#include "kvnative.h"

PyObject *kvn_str_digest = NULL;
PyObject *kvn_empty_tuple = NULL;

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))kvn_##name, METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    FAST(chain_keys, "chain_keys(seed, tokens, block_tokens, extras, key_type) -> list | NotImplemented"),
    FAST(encode_request, "encode_request(method, timeout_s, metadata, payload, max_frame_bytes) -> bytes | NotImplemented"),
    FAST(decode_request, "decode_request(body) -> (method, timeout_s, metadata, payload_at) | NotImplemented"),
    FAST(encode_response, "encode_response(code, details, trailing, payload, max_frame_bytes) -> bytes | NotImplemented"),
    FAST(decode_response, "decode_response(body) -> (code, details, trailing, payload_at) | NotImplemented"),
    FAST(encode_pin_request, "encode_pin_request(fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only) -> bytes | NotImplemented"),
    FAST(decode_pin_request, "decode_pin_request(payload) -> (fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only, key_width) | NotImplemented"),
    FAST(encode_pin_response, "encode_pin_response(pin_id, expires_unix_ms, offsets, lengths, checksums[, tiers, hbm_offsets, hbm_pool_id]) -> bytes | NotImplemented"),
    FAST(decode_pin_response, "decode_pin_response(payload) -> (pin_id, expires_unix_ms, offsets, lengths, checksums) | NotImplemented"),
    FAST(decode_pin_columns, "decode_pin_columns(payload) -> (pin_id, expires_unix_ms, cells, n, payload_bytes, hbm_columns, hbm_pool_id) | NotImplemented"),
    FAST(slot_rows, "slot_rows(row_type, first_index, offsets, sizes, handle, checksums, expires_unix_ms) -> list | NotImplemented"),
    FAST(poll_readable, "poll_readable(fd, spin_ns) -> bool: busy-polls fd, GIL released, until readable or spin_ns pass"),
    FAST(copy_blocks, "copy_blocks(src, src_offsets, dst, dst_offsets, lengths, hash, threads) -> list | None | NotImplemented"),
    FAST(write_load_tables, "write_load_tables(pages, tiers, host_offsets, hbm_offsets, words, half_bytes, num_pages, block_bytes, "
                            "host_bytes, hbm_bytes, hash_offsets) -> (h, m, host_or, hbm_or) | NotImplemented"),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvwire._native",
    "The control path's hot loops in C (csrc/kvnative); kvwire/native.py chooses between them and the Python references.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    kvn_str_digest = PyUnicode_InternFromString("digest");
    kvn_empty_tuple = PyTuple_New(0);
    if (kvn_str_digest == NULL || kvn_empty_tuple == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", KVNATIVE_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
