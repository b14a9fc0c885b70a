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
    /* pages, tiers, host offsets, HBM offsets, then the words written (the one writable buffer). */
    Py_buffer views[5];
    int got = 0;
    while (got < 5 && words_of(args[got], &views[got], got == 4)) got++;
    if (got < 5) {
        while (got > 0) PyBuffer_Release(&views[--got]);
        KVN_RETURN_NOT_IMPLEMENTED;
    }
    const Py_ssize_t n = views[0].len / 8, ntiers = views[1].len / 8;
    const int64_t *pages = (const int64_t *)views[0].buf;
    const uint64_t *tiers = (const uint64_t *)views[1].buf;
    const uint64_t *offsets[2] = {(const uint64_t *)views[2].buf, (const uint64_t *)views[3].buf}; /* host, HBM */
    const uint64_t limits[2] = {(uint64_t)host_bytes, (uint64_t)hbm_bytes};
    int64_t *words = (int64_t *)views[4].buf;
    PyObject *answer = NULL;
    int ok = (ntiers == 0 || ntiers >= n) && views[2].len / 8 >= n && (ntiers == 0 || views[3].len / 8 >= n) &&
             views[4].len / 8 >= (hash ? 3 : 2) * n;
    Py_ssize_t count[2] = {0, 0}; /* blocks from the host pool, from HBM */
    if (ok && ntiers)
        for (Py_ssize_t i = 0; i < n; i++) count[1] += tiers[i] == TIER_HBM;
    count[0] = n - count[1];
    uint64_t ors[2] = {0, 0};
    Py_ssize_t at[2] = {0, 2 * count[0]};
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        int64_t page = pages[i];
        int source = ntiers && tiers[i] == TIER_HBM;
        uint64_t offset = offsets[source][i];
        if (page < 0 || page >= num_pages || offset > limits[source] || limits[source] - offset < (uint64_t)block) {
            ok = 0;
            break;
        }
        ors[source] |= offset;
        words[at[source]] = (int64_t)offset;
        words[at[source] + count[source]] = page;
        at[source]++;
        if (hash) words[2 * n + i] = page * half;
    }
    if (ok) answer = Py_BuildValue("(nnKK)", count[0], count[1], (unsigned long long)ors[0], (unsigned long long)ors[1]);
    for (int v = 0; v < 5; v++) PyBuffer_Release(&views[v]);
    if (!ok) KVN_RETURN_NOT_IMPLEMENTED;
    return answer;
}
