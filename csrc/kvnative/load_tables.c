/* A prefix load's kernel tables: engines/load_tables.py write_load_tables, one pass over the pinned blocks.
 *
 * An engine loading a cached prefix turns the Pin's answer (each block's tier, its offset in the host pool and
 * in the HBM pool) and its own pages into the gather kernel's tables, one per source, and the checksum kernel's
 * page offsets, then checks every page and offset is in range. In numpy that is a dozen masks, gathers and
 * reductions over 512 blocks, ~0.15 ms of the thread that then launches the forward pass on an H200 host,
 * before layer 0's bytes can move; here it is one loop.
 *
 * The words written, for h blocks from the host pool and m from HBM (n = h + m, in key order within each):
 *   [0, h) host offsets, [h, 2h) their pages, [2h, 2h+m) HBM offsets, [2h+m, 2n) their pages,
 *   [2n, 3n) every block's page * half_bytes (with hash_offsets), in key order.
 * Anything out of range, or an argument this code does not take as given (a buffer that is not C-contiguous
 * 8-byte words, one too short, a read-only destination), is the reference's to refuse with its one error
 * message: NotImplemented. The words may then hold part of a table; the caller raises, never uses them.
 */
#include "kvnative.h"

#define TIER_HBM 1 /* kvwire.types.Tier.HBM */

/* A buffer argument as 8-byte words: 1, or 0 when it is not one (the reference's to take). */
static int words_of(PyObject *obj, Py_buffer *view, int writable) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (view->itemsize != 8 || view->len % 8 != 0) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* write_load_tables(pages, tiers, host_offsets, hbm_offsets, words, half_bytes, num_pages, block_bytes, host_bytes,
 *                   hbm_bytes, hash_offsets) -> (h, m, host_or, hbm_or) | NotImplemented
 * tiers empty: every block from the host pool (hbm_offsets is then not read). host_or, hbm_or: the bitwise or of
 * each source's offsets, for the kernel's alignment rule. */
PyObject *kvn_write_load_tables(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "write_load_tables(pages, tiers, host_offsets, hbm_offsets, words, half_bytes, "
                                         "num_pages, block_bytes, host_bytes, hbm_bytes, hash_offsets)");
        return NULL;
    }
    long long half = PyLong_AsLongLong(args[5]), num_pages = PyLong_AsLongLong(args[6]);
    long long block = PyLong_AsLongLong(args[7]), host_bytes = PyLong_AsLongLong(args[8]), hbm_bytes = PyLong_AsLongLong(args[9]);
    int hash = PyObject_IsTrue(args[10]);
    if (PyErr_Occurred() || hash < 0) {
        PyErr_Clear();
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    if (half < 0 || num_pages < 0 || block < 0 || host_bytes < 0 || hbm_bytes < 0) KVN_RETURN_NOT_IMPLEMENTED;
    Py_buffer pv, tv, hv, gv, wv;
    if (!words_of(args[0], &pv, 0)) KVN_RETURN_NOT_IMPLEMENTED;
    if (!words_of(args[1], &tv, 0)) {
        PyBuffer_Release(&pv);
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    if (!words_of(args[2], &hv, 0)) {
        PyBuffer_Release(&pv);
        PyBuffer_Release(&tv);
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    if (!words_of(args[3], &gv, 0)) {
        PyBuffer_Release(&pv);
        PyBuffer_Release(&tv);
        PyBuffer_Release(&hv);
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    if (!words_of(args[4], &wv, 1)) {
        PyBuffer_Release(&pv);
        PyBuffer_Release(&tv);
        PyBuffer_Release(&hv);
        PyBuffer_Release(&gv);
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    const Py_ssize_t n = pv.len / 8, ntiers = tv.len / 8;
    const int64_t *pages = (const int64_t *)pv.buf;
    const uint64_t *tiers = (const uint64_t *)tv.buf, *host = (const uint64_t *)hv.buf, *hbm = (const uint64_t *)gv.buf;
    int64_t *words = (int64_t *)wv.buf;
    PyObject *answer = NULL;
    int ok = (ntiers == 0 || ntiers >= n) && hv.len / 8 >= n && (ntiers == 0 || gv.len / 8 >= n) &&
             wv.len / 8 >= (hash ? 3 : 2) * n;
    Py_ssize_t h = 0, m = 0;
    if (ok && ntiers)
        for (Py_ssize_t i = 0; i < n; i++) m += tiers[i] == TIER_HBM;
    h = n - m;
    uint64_t host_or = 0, hbm_or = 0;
    Py_ssize_t at_host = 0, at_hbm = 2 * h;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        int64_t page = pages[i];
        if (page < 0 || page >= num_pages) {
            ok = 0;
            break;
        }
        if (ntiers && tiers[i] == TIER_HBM) {
            uint64_t offset = hbm[i];
            if (offset > (uint64_t)hbm_bytes || (uint64_t)hbm_bytes - offset < (uint64_t)block) {
                ok = 0;
                break;
            }
            hbm_or |= offset;
            words[at_hbm] = (int64_t)offset;
            words[at_hbm + m] = page;
            at_hbm++;
        } else {
            uint64_t offset = host[i];
            if (offset > (uint64_t)host_bytes || (uint64_t)host_bytes - offset < (uint64_t)block) {
                ok = 0;
                break;
            }
            host_or |= offset;
            words[at_host] = (int64_t)offset;
            words[at_host + h] = page;
            at_host++;
        }
        if (hash) words[2 * n + i] = page * half;
    }
    if (ok) answer = Py_BuildValue("(nnKK)", h, m, (unsigned long long)host_or, (unsigned long long)hbm_or);
    PyBuffer_Release(&pv);
    PyBuffer_Release(&tv);
    PyBuffer_Release(&hv);
    PyBuffer_Release(&gv);
    PyBuffer_Release(&wv);
    if (!ok) KVN_RETURN_NOT_IMPLEMENTED;
    return answer;
}
