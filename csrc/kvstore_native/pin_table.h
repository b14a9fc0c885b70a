/* What pin_table.c (which binds BlockMeta's fields) lends flat_index.c. */
#ifndef KVSTORE_PIN_TABLE_H
#define KVSTORE_PIN_TABLE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* 1 if every one of metas[0:n] is a bound BlockMeta whose pin count is an int, 0 if not (nothing changed). */
int kvs_pinnable(PyObject *const *metas, Py_ssize_t n);
/* pins += 1 for each of metas[0:n] (checked by kvs_pinnable): 0, or -1 with an error set. */
int kvs_count_pins(PyObject *const *metas, Py_ssize_t n);
/* meta's copies dict (borrowed), or NULL (no error set) if meta is not a bound BlockMeta. */
PyObject *kvs_meta_copies(PyObject *meta);
/* Adds the FlatIndex type to the module: 0, or -1 with an error set. */
int kvs_add_flat_index(PyObject *module);

#endif
