/* A piece of canonical grant text taken apart in one pass: bigsets._split_canonical, in C.
 *
 * Why this exists (docs/performance.md, "Eighth round"): after the fold moved to C, reading text
 * was most of a cold million-grant build: the regular expression that takes a piece apart
 * (~0.32 s of ~1.1 s), the sums that prove its matches tile the piece (~0.04 s) and the principals'
 * check (~0.12 s). The goal is 2 s on a machine whose speed varies by half from hour to hour.
 *
 * split(text, max_len) -> (principals, roles, scopes, plain) | None. `text` is a piece of a set's
 * grants array as canonical JSON writes it: grants separated by commas, each exactly
 *     {"principal":"P","roles":["R"(,"R")*](,"scope":"S")?}
 * with every string free of '"', '\\' and control characters (below 0x20). Then it returns each
 * grant's principal, its roles as written between the brackets, and its scope ('' for none), as
 * three lists of strings, and `plain`: every principal is 1..max_len ASCII characters, printable,
 * with no space at either end (what parsers._check_principals would find, except the magic words).
 * Anything else (another shape, an empty scope, text that is not one byte per character) returns
 * None, and the caller takes the piece apart in Python, which accepts exactly what this accepts
 * and more; tests/test_granttext.py checks the two against each other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    const Py_UCS1 *at;
    const Py_UCS1 *end;
} Cursor;

static const char PRINCIPAL[] = "{\"principal\":\"";
static const char ROLES[] = "\",\"roles\":[\"";
static const char SCOPE[] = ",\"scope\":\"";

/* Step over `literal` if the text goes on with it. */
static int
expect(Cursor *c, const char *literal, size_t size)
{
    if ((size_t)(c->end - c->at) < size || memcmp(c->at, literal, size) != 0)
        return 0;
    c->at += size;
    return 1;
}

/* Step over a string's characters, up to its closing quote (not taken); 0 if one is not allowed. */
static int
text(Cursor *c)
{
    while (c->at < c->end) {
        Py_UCS1 ch = *c->at;
        if (ch == '"')
            return 1;
        if (ch == '\\' || ch < 0x20)
            return 0;
        c->at++;
    }
    return 0;
}

static PyObject *
string(const Py_UCS1 *from, const Py_UCS1 *to, int ascii)
{
    Py_ssize_t size = to - from;
    if (!ascii)
        return PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, from, size);
    PyObject *s = PyUnicode_New(size, 127);
    if (s != NULL)
        memcpy(PyUnicode_1BYTE_DATA(s), from, (size_t)size);
    return s;
}

/* A principal the checks would pass without looking further: printable ASCII, no space at either
 * end, 1..max_len characters. (Control characters cannot be in the text; DEL can.) */
static int
plain(const Py_UCS1 *from, const Py_UCS1 *to, Py_ssize_t max_len, int ascii)
{
    if (!ascii || to == from || to - from > max_len || *from == ' ' || to[-1] == ' ')
        return 0;
    return memchr(from, 0x7f, (size_t)(to - from)) == NULL;
}

/* Append a new string to `list`; -1 on error. */
static int
add(PyObject *list, const Py_UCS1 *from, const Py_UCS1 *to, int ascii)
{
    PyObject *s = string(from, to, ascii);
    if (s == NULL)
        return -1;
    int rc = PyList_Append(list, s);
    Py_DECREF(s);
    return rc;
}

/* 1: taken apart into the lists; 0: not canonical; -1: error. */
static int
take_apart(Cursor *c, PyObject *principals, PyObject *roles, PyObject *scopes, Py_ssize_t max_len, int ascii,
           int *all_plain)
{
    for (;;) {
        if (!expect(c, PRINCIPAL, sizeof PRINCIPAL - 1))
            return 0;
        const Py_UCS1 *from = c->at;
        if (!text(c))
            return 0;
        if (*all_plain && !plain(from, c->at, max_len, ascii))
            *all_plain = 0;
        if (add(principals, from, c->at, ascii) < 0)
            return -1;
        if (!expect(c, ROLES, sizeof ROLES - 1))
            return 0;
        from = c->at - 1; /* the roles as written start with the first name's quote */
        for (;;) {
            if (!text(c))
                return 0;
            c->at++; /* the closing quote */
            if (expect(c, ",\"", 2))
                continue;
            if (c->at < c->end && *c->at == ']')
                break;
            return 0;
        }
        if (add(roles, from, c->at, ascii) < 0)
            return -1;
        c->at++; /* ']' */
        if (expect(c, SCOPE, sizeof SCOPE - 1)) {
            from = c->at;
            if (!text(c) || c->at == from) /* an empty scope is not canonical: the checks say why */
                return 0;
            if (add(scopes, from, c->at, ascii) < 0)
                return -1;
            c->at++;
        }
        else if (add(scopes, c->at, c->at, 1) < 0) {
            return -1;
        }
        if (!expect(c, "}", 1))
            return 0;
        if (c->at == c->end)
            return 1;
        if (!expect(c, ",", 1))
            return 0;
    }
}

static PyObject *
split(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyUnicode_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "split(text: str, max_len: int)");
        return NULL;
    }
    Py_ssize_t max_len = PyLong_AsSsize_t(args[1]);
    if (max_len == -1 && PyErr_Occurred())
        return NULL;
    PyObject *source = args[0];
    if (PyUnicode_READY(source) < 0)
        return NULL;
    if (PyUnicode_KIND(source) != PyUnicode_1BYTE_KIND || PyUnicode_GET_LENGTH(source) == 0)
        Py_RETURN_NONE;
    const Py_UCS1 *data = PyUnicode_1BYTE_DATA(source);
    Cursor c = {data, data + PyUnicode_GET_LENGTH(source)};
    int ascii = PyUnicode_IS_ASCII(source);
    int all_plain = 1;
    PyObject *principals = PyList_New(0), *roles = PyList_New(0), *scopes = PyList_New(0);
    PyObject *result = NULL;
    if (principals == NULL || roles == NULL || scopes == NULL)
        goto done;
    int rc = take_apart(&c, principals, roles, scopes, max_len, ascii, &all_plain);
    if (rc < 0)
        goto done;
    if (rc == 0)
        result = Py_NewRef(Py_None);
    else
        result = PyTuple_Pack(4, principals, roles, scopes, all_plain ? Py_True : Py_False);
done:
    Py_XDECREF(principals);
    Py_XDECREF(roles);
    Py_XDECREF(scopes);
    return result;
}

static PyMethodDef module_methods[] = {
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "A piece of canonical grant text as its principals, roles and scopes, or None (see _granttext.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "authz_sidecar.documents._granttext",
    .m_doc = "A piece of canonical grant text taken apart in one pass (see _granttext.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__granttext(void)
{
    return PyModule_Create(&module);
}
