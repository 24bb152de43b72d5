/* Grants folded into a compiled set's shards: the inner loop of engine._fold, in C.
 *
 * Why this exists (docs/performance.md, "Seventh round"): building a million-grant set cold spent
 * ~0.6 of its ~1.6 s in this loop, one principal at a time in Python (a hash, a shard, a
 * setdefault), and the goal is 2 s on a machine whose speed varies by a third from hour to hour.
 * engine._fold_piece is the same loop in Python, used where this was not built; the two are
 * checked against each other in tests/test_fold.py.
 *
 * fold(principals, handle_sets, scopes, unscoped, scoped, intern, mask): for each grant i, the
 * shard is hash(principals[i]) & mask; an unscoped grant (scopes[i] is None) goes into
 * unscoped[shard] under the principal, a scoped one into scoped[shard] under (principal, scope).
 * The first grant of a key stores its handle set; a later one stores intern(held | handles).
 * One call per piece of grants (~550): the builder pauses between pieces, so no call holds the
 * GIL long.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static int
check_shards(PyObject *shards, Py_ssize_t count, const char *name)
{
    if (!PyTuple_CheckExact(shards) || PyTuple_GET_SIZE(shards) != count) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of %zd dicts", name, count);
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyDict_CheckExact(PyTuple_GET_ITEM(shards, i))) {
            PyErr_Format(PyExc_TypeError, "%s must be a tuple of %zd dicts", name, count);
            return -1;
        }
    }
    return 0;
}

/* Store `handles` under `key` in `part`, or the union with what is there (interned). */
static int
put(PyObject *part, PyObject *key, PyObject *handles, PyObject *intern)
{
    PyObject *held = PyDict_SetDefault(part, key, handles); /* borrowed */
    if (held == NULL)
        return -1;
    if (held == handles)
        return 0;
    PyObject *both = PyNumber_Or(held, handles);
    if (both == NULL)
        return -1;
    PyObject *interned = PyObject_CallOneArg(intern, both);
    Py_DECREF(both);
    if (interned == NULL)
        return -1;
    int rc = PyDict_SetItem(part, key, interned);
    Py_DECREF(interned);
    return rc;
}

static PyObject *
fold(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "fold(principals, handle_sets, scopes, unscoped, scoped, intern, mask)");
        return NULL;
    }
    Py_ssize_t mask = PyLong_AsSsize_t(args[6]);
    if (mask == -1 && PyErr_Occurred())
        return NULL;
    if (mask < 0 || (mask & (mask + 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "mask must be a power of two less one");
        return NULL;
    }
    PyObject *unscoped = args[3], *scoped = args[4], *intern = args[5];
    if (check_shards(unscoped, mask + 1, "unscoped") < 0 || check_shards(scoped, mask + 1, "scoped") < 0)
        return NULL;
    PyObject *principals = PySequence_Fast(args[0], "principals must be a sequence");
    PyObject *handle_sets = principals ? PySequence_Fast(args[1], "handle_sets must be a sequence") : NULL;
    PyObject *scopes = handle_sets ? PySequence_Fast(args[2], "scopes must be a sequence") : NULL;
    PyObject *result = NULL;
    if (scopes == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(principals);
    if (PySequence_Fast_GET_SIZE(handle_sets) != n || PySequence_Fast_GET_SIZE(scopes) != n) {
        PyErr_SetString(PyExc_ValueError, "principals, handle_sets and scopes differ in length");
        goto done;
    }
    PyObject **ps = PySequence_Fast_ITEMS(principals);
    PyObject **hs = PySequence_Fast_ITEMS(handle_sets);
    PyObject **ss = PySequence_Fast_ITEMS(scopes);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t hash = PyObject_Hash(ps[i]);
        if (hash == -1 && PyErr_Occurred())
            goto done;
        /* Python's hash(p) & mask: the low bits of the same two's complement value. */
        Py_ssize_t at = (Py_ssize_t)((size_t)hash & (size_t)mask);
        int rc;
        if (ss[i] == Py_None) {
            rc = put(PyTuple_GET_ITEM(unscoped, at), ps[i], hs[i], intern);
        }
        else {
            PyObject *key = PyTuple_Pack(2, ps[i], ss[i]);
            if (key == NULL)
                goto done;
            rc = put(PyTuple_GET_ITEM(scoped, at), key, hs[i], intern);
            Py_DECREF(key);
        }
        if (rc < 0)
            goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(principals);
    Py_XDECREF(handle_sets);
    Py_XDECREF(scopes);
    return result;
}

static PyMethodDef module_methods[] = {
    {"fold", (PyCFunction)(void (*)(void))fold, METH_FASTCALL,
     "Fold a piece of grants into a compiled set's shards (engine._fold_piece, in C)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "authz_sidecar.model._fold",
    .m_doc = "Grants folded into a compiled set's shards (see _fold.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fold(void)
{
    return PyModule_Create(&module);
}
