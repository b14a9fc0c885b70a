/* kvstore._native: the server's per-key Pin bookkeeping, beside its Python definition in kvstore/block_table.py.
 *
 *   pin_leading   BlockTable.pin_leading: leading_present, pin_blocks, then the index's touch
 *   pin_found     BlockTable.pin_found: the same for an all-or-nothing Pin, the absent keys named
 *   unpin_blocks  BlockTable.unpin_blocks's count: every block unpinned, the deleted ones it freed named
 *   host_columns  block_table.host_columns: where pinned blocks' host copies sit, as three columns, and their bytes
 *   tier_columns  HbmPlacement.pin_placement's columns: each pinned block's fastest tier and its offset there
 *   distinct_keys store._check_keys's rules (every key of its size, none twice), answering only "all hold"
 *   bind, bind_slot  the classes whose fields these read at their offsets (BlockMeta; Slot where it is a slots class)
 *   FlatIndex     (flat_index.c) the prefix Pin's walk, over flat rows the block index keeps beside its dict
 *
 * A Pin of an 8k-token prompt walks 512 blocks: look each up, check its fingerprint, count
 * the pin, touch it in the LRU, then read its slot. In Python that is ~0.3 us a block, most of a
 * Pin's server time. Here the same steps run on BlockMeta's slots through their member
 * descriptors (at the offsets they name, what attribute access on a slots class does underneath)
 * and OrderedDict.move_to_end, in the reference's order: every lookup before any change, every
 * block pin-counted before any is touched. A block is moved in the LRU by its own skey (the object
 * the orders hold, found by identity), and pin counts change without allocating (add_one). Like kvwire._native, a function answers NotImplemented
 * for anything it does not expect (another class, a field of another type), before changing
 * anything, and the caller runs the reference.
 */
#include "pin_table.h"
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "../third_party/xxhash/xxhash.h"
#include <sys/random.h>

static uint64_t keys_seed;  /* distinct_keys's hash seed, drawn at import: keys a tenant chooses cannot aim at one chain */

#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

#define PIN_TABLE_ABI 7
#define TIER_ORDERS 4  /* the tiers whose LRU orders one walk keeps at hand (HBM, host, SSD, and one more) */

/* BlockMeta's fields, bound once (bind) to the class block_table passes. */
static PyTypeObject *meta_type = NULL;
static PyMemberDef *m_skey, *m_fingerprint_id, *m_pins, *m_last_access, *m_copies, *m_checksum, *m_size, *m_deleted;
static PyObject *move_to_end = NULL;   /* OrderedDict.move_to_end, unbound */
static PyTypeObject *odict_type = NULL;
static PyObject *s_offset, *s_size_bytes, *s_move_to_end;
/* Slot's fields (offset, size_bytes) when it is a slots class (bind_slot); else read by attribute. */
static PyTypeObject *slot_type = NULL;
static PyMemberDef *m_offset, *m_size_bytes;

static PyMemberDef *slot_member(PyTypeObject *type, const char *name) {
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);  /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) return NULL;
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != Py_T_OBJECT_EX || (member->flags & Py_READONLY)) return NULL;
    return member;
}

/* bind(BlockMeta, OrderedDict) -> bool: whether BlockMeta is a slots class with the fields this code reads. */
static PyObject *bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyType_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "bind(BlockMeta, OrderedDict)");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)args[0];
    m_fingerprint_id = slot_member(type, "fingerprint_id");
    m_pins = slot_member(type, "pins");
    m_last_access = slot_member(type, "last_access");
    m_copies = slot_member(type, "copies");
    m_checksum = slot_member(type, "checksum");
    m_size = slot_member(type, "size");
    m_deleted = slot_member(type, "deleted");
    m_skey = slot_member(type, "skey");
    PyObject *method = PyObject_GetAttr(args[1], s_move_to_end);
    if (method == NULL) return NULL;
    Py_XSETREF(move_to_end, method);
    Py_XSETREF(odict_type, (PyTypeObject *)Py_NewRef(args[1]));
    int ok = m_skey && m_fingerprint_id && m_pins && m_last_access && m_copies && m_checksum && m_size && m_deleted;
    Py_XSETREF(meta_type, ok ? (PyTypeObject *)Py_NewRef(type) : NULL);
    return PyBool_FromLong(ok);
}

/* bind_slot(Slot) -> bool: whether Slot is a slots class whose offset and size_bytes host_columns may read
 * at their offsets (a Slot is read twice per block of a Pin's answer); else they are read by attribute. */
static PyObject *bind_slot(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 1 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "bind_slot(Slot)");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)args[0];
    /* A frozen dataclass's fields are read-only only by its __setattr__: the descriptors are writable ones. */
    m_offset = slot_member(type, "offset");
    m_size_bytes = slot_member(type, "size_bytes");
    int ok = m_offset && m_size_bytes;
    Py_XSETREF(slot_type, ok ? (PyTypeObject *)Py_NewRef(type) : NULL);
    return PyBool_FromLong(ok);
}

/* A field of a bound BlockMeta as a new reference; NULL if the slot is empty. Read at the offset its
 * member descriptor names, as PyMember_GetOne does (which costs as much again in checks, per field). */
static inline PyObject *field(PyObject *meta, PyMemberDef *member) {
    PyObject *value = *(PyObject **)((char *)meta + member->offset);
    Py_XINCREF(value);
    return value;
}

/* Set a field of a bound BlockMeta (a T_OBJECT_EX slot: no type to check), as PyMember_SetOne does. */
static inline void set_field(PyObject *meta, PyMemberDef *member, PyObject *value) {
    Py_XSETREF(*(PyObject **)((char *)meta + member->offset), Py_NewRef(value));
}

/* tag + key as bytes, a new reference: only looked up, never kept. Built in *scratch, reused while nothing
 * else holds it (its hash, cached in the object, forgotten), so a walk of 512 keys allocates one, not 512
 * (~10 us). Python 3.13 leaves a bytes object's cached hash to itself: a fresh object each there. */
static PyObject *storage_key(PyObject **scratch, PyObject *tag, PyObject *key) {
    Py_ssize_t tag_len = PyBytes_GET_SIZE(tag), size = tag_len + PyBytes_GET_SIZE(key);
    PyObject *skey = *scratch;
#if PY_VERSION_HEX < 0x030D0000
    if (skey != NULL && Py_REFCNT(skey) == 1 && PyBytes_GET_SIZE(skey) == size) {
        _Py_COMP_DIAG_PUSH
        _Py_COMP_DIAG_IGNORE_DEPR_DECLS
        ((PyBytesObject *)skey)->ob_shash = -1;
        _Py_COMP_DIAG_POP
    } else {
        Py_XDECREF(skey);
        skey = *scratch = PyBytes_FromStringAndSize(NULL, size);
        if (skey == NULL) return NULL;
    }
    Py_INCREF(skey);
#else
    (void)scratch;
    skey = PyBytes_FromStringAndSize(NULL, size);
    if (skey == NULL) return NULL;
#endif
    memcpy(PyBytes_AS_STRING(skey), PyBytes_AS_STRING(tag), (size_t)tag_len);
    memcpy(PyBytes_AS_STRING(skey) + tag_len, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
    return skey;
}

/* count + step (+1 or -1) for an int count: in a C long where it fits (a pin count always does), with
 * no allocation for the small ints CPython keeps; else as Python adds. */
static PyObject *add_one(PyObject *count, long step) {
    int overflow = 0;
    long value = PyLong_AsLongAndOverflow(count, &overflow);
    if (overflow == 0 && !(value == -1 && PyErr_Occurred()) && value > LONG_MIN + 1 && value < LONG_MAX - 1)
        return PyLong_FromLong(value + step);
    PyErr_Clear();
    PyObject *delta = PyLong_FromLong(step);
    if (delta == NULL) return NULL;
    PyObject *sum = PyNumber_Add(count, delta);
    Py_DECREF(delta);
    return sum;
}

PyObject *kvs_meta_copies(PyObject *meta) {
    if (meta_type == NULL || !Py_IS_TYPE(meta, meta_type)) return NULL;
    return *(PyObject **)((char *)meta + m_copies->offset);
}

int kvs_pinnable(PyObject *const *metas, Py_ssize_t n) {
    if (meta_type == NULL) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!Py_IS_TYPE(metas[i], meta_type)) return 0;
        PyObject *pins = *(PyObject **)((char *)metas[i] + m_pins->offset);
        if (pins == NULL || !PyLong_CheckExact(pins)) return 0;
    }
    return 1;
}

int kvs_count_pins(PyObject *const *metas, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pins = field(metas[i], m_pins);
        PyObject *more = pins ? add_one(pins, 1) : NULL;
        Py_XDECREF(pins);
        if (more == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "BlockMeta.pins changed under the store lock");
            return -1;
        }
        set_field(metas[i], m_pins, more);
        Py_DECREF(more);
    }
    return 0;
}

/* order.move_to_end(skey): one tier's LRU order. */
static int move_last(PyObject *order, PyObject *skey) {
    PyObject *done;
    if (Py_IS_TYPE(order, odict_type)) {
        PyObject *call[2] = {order, skey};
        done = PyObject_Vectorcall(move_to_end, call, 2, NULL);
    } else {
        done = PyObject_CallMethodOneArg(order, s_move_to_end, skey);
    }
    if (done == NULL) return -1;
    Py_DECREF(done);
    return 0;
}

/* Touch metas[0:n] at now: last_access = now, and each moved to the end of each of its tiers' LRU, in order (the
 * reference's BlockIndex.touch). A move of a block no longer in a tier's order (removed from the index since a
 * deferred touch was queued) is skipped, as the reference skips it. 0, or -1 with an error set. */
static int touch_run(PyObject *const *metas, Py_ssize_t n, PyObject *lru, PyObject *now) {
    /* Each tier's LRU order, looked up once a walk: a block with copies on two tiers (host and HBM) alternates
     * them, and a lookup of lru[tier] per copy cost a 512-block Pin ~1,000 dict lookups. */
    PyObject *tiers[TIER_ORDERS] = {NULL}, *orders[TIER_ORDERS] = {NULL};
    int status = 0;
    for (Py_ssize_t i = 0; i < n && status == 0; i++) {
        set_field(metas[i], m_last_access, now);
        PyObject *copies = field(metas[i], m_copies), *skey = field(metas[i], m_skey), *tier, *copy;
        Py_ssize_t pos = 0;
        if (copies == NULL || skey == NULL || !PyDict_CheckExact(copies)) {
            Py_XDECREF(copies);
            Py_XDECREF(skey);
            PyErr_SetString(PyExc_SystemError, "BlockMeta.copies changed under the store lock");
            status = -1;
            break;
        }
        while (status == 0 && PyDict_Next(copies, &pos, &tier, &copy)) {
            PyObject *order = NULL;
            int t = 0, moved;
            while (t < TIER_ORDERS && tiers[t] != NULL && tiers[t] != tier) t++;
            if (t < TIER_ORDERS && tiers[t] == tier) {
                order = Py_NewRef(orders[t]);
            } else {
                order = PyObject_GetItem(lru, tier);  /* a defaultdict: as lru[tier] in Python */
                if (order != NULL && t < TIER_ORDERS) {  /* kept (the walk holds the references) */
                    tiers[t] = Py_NewRef(tier);
                    orders[t] = Py_NewRef(order);
                }
            }
            moved = order != NULL ? move_last(order, skey) : -1;
            Py_XDECREF(order);
            if (moved < 0 && PyErr_ExceptionMatches(PyExc_KeyError))
                PyErr_Clear();  /* not in this tier's order: the block left the index after its touch was queued */
            else if (moved < 0)
                status = -1;
        }
        Py_DECREF(copies);
        Py_DECREF(skey);
    }
    for (int t = 0; t < TIER_ORDERS; t++) {
        Py_XDECREF(tiers[t]);
        Py_XDECREF(orders[t]);
    }
    return status;
}

/* The blocks of keys, found, pin-counted (pins += 1) and touched (last_access = now, moved to the end of
 * each of their tiers' LRU), in that order, as the reference's pin_blocks then index.touch. missing NULL:
 * the leading run present under fingerprint_id (pin_leading). Else every present key's block, the absent
 * keys appended to missing, and a block of another fingerprint leaves the call to the reference, which
 * raises (pin_found). Nothing changes before every key has been looked up. */
static PyObject *pin_run(PyObject *const *args, Py_ssize_t nargs, PyObject *missing) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "(blocks, lru, tag, keys, fingerprint_id, now)");
        return NULL;
    }
    PyObject *blocks = args[0], *lru = args[1], *tag = args[2], *keys = args[3], *fingerprint_id = args[4], *now = args[5];
    if (meta_type == NULL || !PyDict_Check(blocks) || !PyDict_Check(lru) || !PyBytes_CheckExact(tag) ||
        !(PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) || !PyBytes_CheckExact(fingerprint_id) || !PyFloat_CheckExact(now))
        Py_RETURN_NOTIMPLEMENTED;

    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys), run = 0;
    Py_ssize_t fp_len = PyBytes_GET_SIZE(fingerprint_id);
    PyObject **metas = PyMem_Calloc(n ? (size_t)n : 1, sizeof(PyObject *));
    PyObject *result = NULL, *scratch = NULL;
    if (metas == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* 1. Find the blocks, changing nothing. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(key)) goto not_ours;
        PyObject *skey = storage_key(&scratch, tag, key);
        if (skey == NULL) goto done;
        PyObject *meta = PyDict_GetItemWithError(blocks, skey);
        Py_DECREF(skey);  /* the LRU moves below name the block's own skey, which its orders hold: found by identity */
        if (meta == NULL) {
            if (PyErr_Occurred()) goto done;
            if (missing == NULL) break;
            if (PyList_Append(missing, key) < 0) goto done;
            continue;
        }
        if (!Py_IS_TYPE(meta, meta_type)) goto not_ours;
        /* Borrowed: the block holds them, and the dict lookup above ran no code that could drop one. */
        PyObject *fp = *(PyObject **)((char *)meta + m_fingerprint_id->offset);
        PyObject *pins = *(PyObject **)((char *)meta + m_pins->offset);
        PyObject *copies = *(PyObject **)((char *)meta + m_copies->offset);
        PyObject *own_skey = *(PyObject **)((char *)meta + m_skey->offset);
        int expected = fp && pins && copies && own_skey && PyBytes_CheckExact(fp) && PyLong_CheckExact(pins) &&
                       PyDict_CheckExact(copies) && PyBytes_CheckExact(own_skey);
        int same_fp = expected && PyBytes_GET_SIZE(fp) == fp_len &&
                      memcmp(PyBytes_AS_STRING(fp), PyBytes_AS_STRING(fingerprint_id), (size_t)fp_len) == 0;
        if (!expected || (!same_fp && missing != NULL)) goto not_ours;  /* the reference raises FingerprintMismatchError */
        if (!same_fp) break;
        metas[run++] = Py_NewRef(meta);
    }
    /* 2. Count the pins, then 3. touch. */
    if (kvs_count_pins(metas, run) < 0) goto done;
    if (touch_run(metas, run, lru, now) < 0) goto done;
    result = PyList_New(run);
    if (result != NULL)
        for (Py_ssize_t i = 0; i < run; i++) PyList_SET_ITEM(result, i, Py_NewRef(metas[i]));
    goto done;
not_ours:
    result = Py_NewRef(Py_NotImplemented);
done:
    Py_XDECREF(scratch);
    if (metas != NULL)
        for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(metas[i]);
    PyMem_Free(metas);
    return result;
}

/* pin_leading(blocks, lru, tag, keys, fingerprint_id, now) -> list[BlockMeta] | NotImplemented
 *
 * blocks: storage key -> BlockMeta (BlockIndex.blocks); lru: tier -> OrderedDict of storage keys;
 * tag: the tenant's storage-key prefix. The blocks of the leading run of keys present under
 * fingerprint_id, pin-counted and touched. The caller counts the lookup hits and misses and pin_count. */
static PyObject *pin_leading(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return pin_run(args, nargs, NULL);
}

/* pin_found(blocks, lru, tag, keys, fingerprint_id, now) -> (list[BlockMeta], missing keys) | NotImplemented
 *
 * Every present key's block, pin-counted and touched, and the keys with none: an all-or-nothing Pin's
 * (and a get's) lookups. A block stored under another fingerprint is the reference's to refuse. */
static PyObject *pin_found(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    PyObject *missing = PyList_New(0);
    if (missing == NULL) return NULL;
    PyObject *found = pin_run(args, nargs, missing);
    if (found == NULL || found == Py_NotImplemented) {
        Py_DECREF(missing);
        return found;
    }
    PyObject *result = PyTuple_Pack(2, found, missing);
    Py_DECREF(found);
    Py_DECREF(missing);
    return result;
}

/* A Slot's field as a new reference: at its offset where Slot is bound (bind_slot), else by attribute. */
static inline PyObject *slot_field(PyObject *slot, PyMemberDef *member, PyObject *name) {
    if (slot_type != NULL && Py_IS_TYPE(slot, slot_type)) {
        PyObject *value = field(slot, member);
        if (value == NULL) PyErr_SetObject(PyExc_AttributeError, name);
        return value;
    }
    return PyObject_GetAttr(slot, name);
}

/* The columns of host_columns for metas[0:n]: (offsets, sizes, checksums, payload_bytes), None when one
 * has no host copy, NotImplemented for anything unexpected. */
static PyObject *columns_of(PyObject *const *metas, Py_ssize_t n, PyObject *host) {
    PyObject *columns[3] = {PyList_New(n), PyList_New(n), PyList_New(n)}, *result = NULL, *total = NULL;
    long long payload_bytes = 0;
    if (columns[0] == NULL || columns[1] == NULL || columns[2] == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *meta = metas[i];
        if (!Py_IS_TYPE(meta, meta_type)) goto not_ours;
        PyObject *copies = field(meta, m_copies);
        if (copies == NULL || !PyDict_CheckExact(copies)) {
            Py_XDECREF(copies);
            goto not_ours;
        }
        PyObject *slot = PyDict_GetItemWithError(copies, host);  /* borrowed, alive while copies is */
        if (slot == NULL) {
            Py_DECREF(copies);
            if (PyErr_Occurred()) goto done;
            result = Py_NewRef(Py_None);
            goto done;
        }
        PyObject *offset = slot_field(slot, m_offset, s_offset);
        PyObject *size = offset ? slot_field(slot, m_size_bytes, s_size_bytes) : NULL;
        Py_DECREF(copies);
        PyObject *checksum = size ? field(meta, m_checksum) : NULL, *meta_size = checksum ? field(meta, m_size) : NULL;
        long long block_bytes = meta_size && PyLong_CheckExact(meta_size) ? PyLong_AsLongLong(meta_size) : -1;
        Py_XDECREF(meta_size);
        if (checksum == NULL || block_bytes < 0) {
            Py_XDECREF(offset);
            Py_XDECREF(size);
            Py_XDECREF(checksum);
            if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_OverflowError) && !PyErr_ExceptionMatches(PyExc_AttributeError))
                goto done;
            PyErr_Clear();
            goto not_ours;
        }
        payload_bytes += block_bytes;
        PyList_SET_ITEM(columns[0], i, offset);
        PyList_SET_ITEM(columns[1], i, size);
        PyList_SET_ITEM(columns[2], i, checksum);
    }
    if ((total = PyLong_FromLongLong(payload_bytes)) != NULL) result = PyTuple_Pack(4, columns[0], columns[1], columns[2], total);
    goto done;
not_ours:
    result = Py_NewRef(Py_NotImplemented);
done:
    for (int c = 0; c < 3; c++) Py_XDECREF(columns[c]);
    Py_XDECREF(total);
    return result;
}

/* host_columns(metas, host_tier) -> (offsets, sizes, checksums, payload_bytes) | None | NotImplemented
 *
 * Each block's host copy (a Slot: offset, size_bytes) and checksum, as three lists in order, and
 * the sum of the blocks' sizes; None when some block has no host copy (it is on a lower tier only,
 * and must be staged). */
static PyObject *host_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "host_columns(metas, host_tier)");
        return NULL;
    }
    PyObject *metas = args[0], *host = args[1];
    if (meta_type == NULL || !PyList_CheckExact(metas)) Py_RETURN_NOTIMPLEMENTED;
    return columns_of(PySequence_Fast_ITEMS(metas), PyList_GET_SIZE(metas), host);
}

/* tier_columns(metas, tier, fastest, otherwise) -> (values, offsets, count) | NotImplemented
 *
 * HbmPlacement.pin_placement's columns: per block, fastest where it has a copy on tier, else otherwise (Tier
 * values, plain ints), and that copy's offset (0 where none); count: how many have one. A 512-block prefix
 * Pin from a server with an HBM tier built these in three list comprehensions, ~50 us of its request thread. */
static PyObject *tier_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "tier_columns(metas, tier, fastest, otherwise)");
        return NULL;
    }
    PyObject *metas = args[0], *tier = args[1], *fastest = args[2], *otherwise = args[3];
    if (meta_type == NULL || !PyList_CheckExact(metas) || !PyLong_CheckExact(fastest) || !PyLong_CheckExact(otherwise))
        Py_RETURN_NOTIMPLEMENTED;
    Py_ssize_t n = PyList_GET_SIZE(metas), count = 0;
    PyObject *values = PyList_New(n), *offsets = PyList_New(n), *result = NULL, *zero = PyLong_FromLong(0);
    if (values == NULL || offsets == NULL || zero == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *meta = PyList_GET_ITEM(metas, i);
        if (!Py_IS_TYPE(meta, meta_type)) goto not_ours;
        PyObject *copies = *(PyObject **)((char *)meta + m_copies->offset);  /* borrowed: the block holds it */
        if (copies == NULL || !PyDict_CheckExact(copies)) goto not_ours;
        PyObject *slot = PyDict_GetItemWithError(copies, tier);  /* borrowed */
        if (slot == NULL && PyErr_Occurred()) goto done;
        PyObject *offset = zero;
        if (slot != NULL) {
            if (slot_type == NULL || !Py_IS_TYPE(slot, slot_type)) goto not_ours;
            offset = *(PyObject **)((char *)slot + m_offset->offset);
            if (offset == NULL) goto not_ours;
            count++;
        }
        PyList_SET_ITEM(values, i, Py_NewRef(slot != NULL ? fastest : otherwise));
        PyList_SET_ITEM(offsets, i, Py_NewRef(offset));
    }
    result = Py_BuildValue("(OOn)", values, offsets, count);
    goto done;
not_ours:
    result = Py_NewRef(Py_NotImplemented);
done:
    Py_XDECREF(values);
    Py_XDECREF(offsets);
    Py_XDECREF(zero);
    return result;
}

/* unpin_blocks(metas) -> list[BlockMeta] | NotImplemented
 *
 * pins -= 1 for each block (a block named twice, twice); answers, in order, the deleted blocks
 * whose last pin this was, for the caller to free their copies, as the reference loop does as
 * it goes. Every block is checked before any is changed. */
static PyObject *unpin_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "unpin_blocks(metas)");
        return NULL;
    }
    PyObject *metas = args[0];
    if (meta_type == NULL || !(PyList_CheckExact(metas) || PyTuple_CheckExact(metas))) Py_RETURN_NOTIMPLEMENTED;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(metas);
    /* The blocks' lines first, all at once: an engine's next Pin releases its last one, whose 512 blocks its forward
     * pass has pushed out of the caches since; fetched one by one, they were ~25 us of that Pin. */
    for (Py_ssize_t i = 0; i < n; i++) {
        char *meta = (char *)PySequence_Fast_GET_ITEM(metas, i);
        __builtin_prefetch(meta, 0, 1);
        __builtin_prefetch(meta + m_pins->offset, 1, 1);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *meta = PySequence_Fast_GET_ITEM(metas, i);
        if (!Py_IS_TYPE(meta, meta_type)) Py_RETURN_NOTIMPLEMENTED;
        PyObject *pins = field(meta, m_pins), *deleted = field(meta, m_deleted);
        int expected = pins && deleted && PyLong_CheckExact(pins) && PyBool_Check(deleted);
        Py_XDECREF(pins);
        Py_XDECREF(deleted);
        if (!expected) Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *freed = PyList_New(0);
    if (freed == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *meta = PySequence_Fast_GET_ITEM(metas, i);
        PyObject *pins = field(meta, m_pins);
        PyObject *fewer = pins ? add_one(pins, -1) : NULL;
        Py_XDECREF(pins);
        if (fewer == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "BlockMeta.pins changed under the store lock");
            Py_DECREF(freed);
            return NULL;
        }
        set_field(meta, m_pins, fewer);
        long long left = PyLong_AsLongLong(fewer);
        if (left == -1 && PyErr_Occurred()) PyErr_Clear();  /* beyond long long: not zero */
        int last = left == 0;
        Py_DECREF(fewer);
        PyObject *deleted = field(meta, m_deleted);
        int gone = deleted == Py_True;
        Py_XDECREF(deleted);
        if (last && gone && PyList_Append(freed, meta) < 0) {
            Py_DECREF(freed);
            return NULL;
        }
    }
    return freed;
}

/* distinct_keys(keys, key_bytes) -> bool: whether keys (a list or tuple, or one bytes object of them key after key)
 * are all bytes of key_bytes and no two equal, store._check_keys's two rules. False for anything else, for the caller to find and name what is wrong.
 * The lengths in one C loop (a Python loop over len() cost 11 us for 512 keys), the duplicates by a table of the keys'
 * hashes (keys of one length: equal bytes, equal keys, as Python's set(keys) finds them). */
/* present(blocks, tag, keys, fingerprint_id) -> bytes | NotImplemented
 *
 * block_table.present: one byte a key, 1 where tag + key names a block stored under fingerprint_id. A
 * contains of 1024 keys spent ~90 us of its ~0.3 ms in the Python comprehension's lookups. Changes nothing. */
static PyObject *present(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "present(blocks, tag, keys, fingerprint_id)");
        return NULL;
    }
    PyObject *blocks = args[0], *tag = args[1], *keys = args[2], *fingerprint_id = args[3];
    if (meta_type == NULL || !PyDict_Check(blocks) || !PyBytes_CheckExact(tag) ||
        !(PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) || !PyBytes_CheckExact(fingerprint_id))
        Py_RETURN_NOTIMPLEMENTED;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys), fp_len = PyBytes_GET_SIZE(fingerprint_id);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n), *scratch = NULL;
    if (out == NULL) return NULL;
    char *flags = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(key)) goto not_ours;
        PyObject *skey = storage_key(&scratch, tag, key);
        if (skey == NULL) goto failed;
        PyObject *meta = PyDict_GetItemWithError(blocks, skey);  /* borrowed */
        Py_DECREF(skey);
        if (meta == NULL) {
            if (PyErr_Occurred()) goto failed;
            flags[i] = 0;
            continue;
        }
        if (!Py_IS_TYPE(meta, meta_type)) goto not_ours;
        PyObject *fp = *(PyObject **)((char *)meta + m_fingerprint_id->offset);
        if (fp == NULL || !PyBytes_CheckExact(fp)) goto not_ours;
        flags[i] = PyBytes_GET_SIZE(fp) == fp_len && memcmp(PyBytes_AS_STRING(fp), PyBytes_AS_STRING(fingerprint_id), (size_t)fp_len) == 0;
    }
    Py_XDECREF(scratch);
    return out;
not_ours:
    Py_XDECREF(scratch);
    Py_DECREF(out);
    Py_RETURN_NOTIMPLEMENTED;
failed:
    Py_XDECREF(scratch);
    Py_DECREF(out);
    return NULL;
}

/* touch(metas, lru, now) -> None | NotImplemented: BlockIndex.touch of a list of bound BlockMetas (a deferred touch). */
static PyObject *touch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "touch(metas, lru, now)");
        return NULL;
    }
    PyObject *metas = args[0], *lru = args[1], *now = args[2];
    if (meta_type == NULL || !PyList_CheckExact(metas) || !PyDict_Check(lru) || !PyFloat_CheckExact(now))
        Py_RETURN_NOTIMPLEMENTED;
    Py_ssize_t n = PyList_GET_SIZE(metas);
    PyObject **items = PySequence_Fast_ITEMS(metas);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!Py_IS_TYPE(items[i], meta_type)) Py_RETURN_NOTIMPLEMENTED;
    PyObject *held = PyList_GetSlice(metas, 0, n);  /* the list may change while a move runs Python code */
    if (held == NULL) return NULL;
    int status = touch_run(PySequence_Fast_ITEMS(held), n, lru, now);
    Py_DECREF(held);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *distinct_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "distinct_keys(keys, key_bytes)");
        return NULL;
    }
    PyObject *keys = args[0];
    Py_ssize_t key_bytes = PyLong_AsSsize_t(args[1]);
    if (key_bytes == -1 && PyErr_Occurred()) return NULL;
    if (key_bytes <= 0) Py_RETURN_FALSE;
    Py_ssize_t n;
    const char *packed = NULL;  /* the keys key after key (kvwire's PackedKeys.packed), else a list or tuple of them */
    if (PyBytes_CheckExact(keys)) {
        if (PyBytes_GET_SIZE(keys) % key_bytes) Py_RETURN_FALSE;
        n = PyBytes_GET_SIZE(keys) / key_bytes;
        packed = PyBytes_AS_STRING(keys);
    } else if (PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) {
        n = PySequence_Fast_GET_SIZE(keys);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
            if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) != key_bytes) Py_RETURN_FALSE;
        }
    } else {
        Py_RETURN_FALSE;
    }
#define KEY_AT(i) (packed != NULL ? packed + (i) * key_bytes : PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(keys, (i))))
    /* The duplicates by a table of seeded XXH3 hashes of the keys' bytes, probed linearly, comparing bytes on a hash match:
     * a set of 512 fresh bytes objects (a SipHash each, then the inserts) cost ~10-20 us of a prefix Pin. */
    size_t slots = 16;
    while (slots < 2 * (size_t)n) slots *= 2;
    Py_ssize_t *table = PyMem_Malloc(slots * sizeof(Py_ssize_t));
    uint64_t *hashes = PyMem_Malloc(slots * sizeof(uint64_t));
    if (table == NULL || hashes == NULL) {
        PyMem_Free(table);
        PyMem_Free(hashes);
        return PyErr_NoMemory();
    }
    memset(table, 0xff, slots * sizeof(Py_ssize_t));  /* -1: empty */
    int distinct = 1;
    for (Py_ssize_t i = 0; i < n && distinct; i++) {
        const char *bytes = KEY_AT(i);
        uint64_t h = XXH3_64bits_withSeed(bytes, (size_t)key_bytes, keys_seed);
        size_t at = (size_t)h & (slots - 1);
        for (; table[at] >= 0; at = (at + 1) & (slots - 1)) {
            if (hashes[at] == h && memcmp(KEY_AT(table[at]), bytes, (size_t)key_bytes) == 0) {
                distinct = 0;
                break;
            }
        }
        table[at] = i;
        hashes[at] = h;
    }
#undef KEY_AT
    PyMem_Free(table);
    PyMem_Free(hashes);
    return PyBool_FromLong(distinct);
}

static PyMethodDef methods[] = {
    {"distinct_keys", (PyCFunction)(void (*)(void))distinct_keys, METH_FASTCALL, "distinct_keys(keys, key_bytes) -> bool"},
    {"present", (PyCFunction)(void (*)(void))present, METH_FASTCALL,
     "present(blocks, tag, keys, fingerprint_id) -> bytes (a flag a key) | NotImplemented"},
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, "bind(BlockMeta, OrderedDict) -> bool"},
    {"pin_leading", (PyCFunction)(void (*)(void))pin_leading, METH_FASTCALL,
     "pin_leading(blocks, lru, tag, keys, fingerprint_id, now) -> list[BlockMeta] | NotImplemented"},
    {"pin_found", (PyCFunction)(void (*)(void))pin_found, METH_FASTCALL,
     "pin_found(blocks, lru, tag, keys, fingerprint_id, now) -> (list[BlockMeta], missing) | NotImplemented"},
    {"bind_slot", (PyCFunction)(void (*)(void))bind_slot, METH_FASTCALL, "bind_slot(Slot) -> bool"},
    {"touch", (PyCFunction)(void (*)(void))touch, METH_FASTCALL, "touch(metas, lru, now) -> None | NotImplemented"},
    {"host_columns", (PyCFunction)(void (*)(void))host_columns, METH_FASTCALL,
     "host_columns(metas, host_tier) -> (offsets, sizes, checksums, payload_bytes) | None | NotImplemented"},
    {"unpin_blocks", (PyCFunction)(void (*)(void))unpin_blocks, METH_FASTCALL, "unpin_blocks(metas) -> list[BlockMeta] | NotImplemented"},
    {"tier_columns", (PyCFunction)(void (*)(void))tier_columns, METH_FASTCALL,
     "tier_columns(metas, tier, fastest, otherwise) -> (values, offsets, count) | NotImplemented"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvstore._native",
    "The server's per-key Pin bookkeeping in C (csrc/kvstore_native); kvstore/block_table.py holds its definition.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (getrandom(&keys_seed, sizeof(keys_seed), 0) != (ssize_t)sizeof(keys_seed)) keys_seed = (uint64_t)(uintptr_t)&keys_seed;
    s_offset = PyUnicode_InternFromString("offset");
    s_size_bytes = PyUnicode_InternFromString("size_bytes");
    s_move_to_end = PyUnicode_InternFromString("move_to_end");
    if (s_offset == NULL || s_size_bytes == NULL || s_move_to_end == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "ABI", PIN_TABLE_ABI) < 0 || kvs_add_flat_index(m) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
