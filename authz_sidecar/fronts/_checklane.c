/* The Check lane: a Check asked again, answered without running Python.
 *
 * Why this exists (docs/performance.md, "The Check lane"): called directly, the sidecar spent
 * 1.4x the floor of Python gRPC's CPU per Check, and the difference was the handler's Python,
 * ~17 us of it in place for ~6 us in a loop, however it was arranged. A Check whose answer is
 * already known (the decider's whole-Check memo: a pure function of the snapshot and a few fields
 * of the request) needs none of it. The lane reads those fields from the request's bytes, looks
 * the answer up, counts the hit and hands the decision to the decision log, all in C.
 *
 * Rules that keep it right:
 * - It never decides. Its entries are taught by the Python path (learn), each the answer that
 *   path gave for the same fields on the same snapshot, and one lane serves one snapshot.
 * - It answers only what it reads exactly as upb would parse the view
 *   (_proto/view/check_view.proto). Anything else (a group, a known field with another wire
 *   type, a message field given twice, text that is not UTF-8, a truncated field) is not
 *   answered here: the Python path parses it and decides, so a hostile request costs a scan
 *   and can never get an answer the Python path would not give.
 * - The counts of a hit (metrics, shadow reports, the latency histogram) are kept per entry and
 *   handed back by drain(); the decision log's line is written per hit, through record().
 * - All of it runs under the GIL and keeps no pointer into the entries across a call into
 *   Python (record() may let another thread learn, which can move them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* ---- reading the wire ---------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
    int present;
} Span;

/* The fields the whole-Check memo is keyed by (decision/decider.py), in its order. */
enum { F_META, F_PEER, F_METHOD, F_PATH, F_SHADOW, F_PERMISSION, F_SCOPE, N_FIELDS };

typedef struct {
    Span f[N_FIELDS];
    Span request_id; /* not in the key: only a sampled decision's log line names it */
} Fields;

static const char JWT_AUTHN[] = "envoy.filters.http.jwt_authn";
static const char SHADOW_HEADER[] = "x-authz-shadow-version";
static const char PERMISSION[] = "permission";
static const char SCOPE[] = "scope";

#define NOT_READ 0
#define READ 1

static int
varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= end)
            return NOT_READ;
        uint8_t b = *p++;
        if (i == 9 && b > 1)
            return NOT_READ;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return READ;
        }
    }
    return NOT_READ;
}

/* One field's tag; a field number of 0 or past 2^29-1 is refused, as upb refuses it, and so is a
 * tag written in more bytes than it needs (which upb may take: the Python path decides it). */
static int
tag(const uint8_t **pp, const uint8_t *end, uint32_t *field, int *wire)
{
    uint64_t t;
    const uint8_t *start = *pp;
    if (!varint(pp, end, &t) || t > 0xFFFFFFFFu || (*pp - start > 1 && (*pp)[-1] == 0))
        return NOT_READ;
    *field = (uint32_t)(t >> 3);
    *wire = (int)(t & 7);
    return *field != 0 && *field <= 0x1FFFFFFFu;
}

static int
delimited(const uint8_t **pp, const uint8_t *end, Span *out)
{
    uint64_t n;
    if (!varint(pp, end, &n) || n > (uint64_t)(end - *pp))
        return NOT_READ;
    out->p = *pp;
    out->n = (Py_ssize_t)n;
    out->present = 1;
    *pp += n;
    return READ;
}

/* Past a field the view does not know. Groups (3, 4) and the unused wire types are not read. */
static int
skip(const uint8_t **pp, const uint8_t *end, int wire)
{
    uint64_t ignored;
    Span s;
    switch (wire) {
    case 0:
        return varint(pp, end, &ignored);
    case 1:
        if (end - *pp < 8)
            return NOT_READ;
        *pp += 8;
        return READ;
    case 2:
        return delimited(pp, end, &s);
    case 5:
        if (end - *pp < 4)
            return NOT_READ;
        *pp += 4;
        return READ;
    default:
        return NOT_READ;
    }
}

/* Strict UTF-8, as upb checks proto3 strings: no overlong forms, no surrogates, nothing past
 * U+10FFFF. Stricter than upb would only send more requests to the Python path. */
static int
utf8(const Span *s)
{
    const uint8_t *p = s->p, *end = s->p + s->n;
    while (p < end) {
        uint8_t c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            if (end - p < 2 || (p[1] & 0xC0) != 0x80)
                return 0;
            p += 2;
        }
        else if (c >= 0xE0 && c <= 0xEF) {
            if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F))
                return 0;
            p += 3;
        }
        else if (c >= 0xF0 && c <= 0xF4) {
            if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] > 0x8F))
                return 0;
            p += 4;
        }
        else
            return 0;
    }
    return 1;
}

static int
named(const Span *s, const char *name, size_t len)
{
    return (size_t)s->n == len && memcmp(s->p, name, len) == 0;
}

/* A string field: length-delimited and UTF-8; the last occurrence wins, as in upb. */
static int
string_field(const uint8_t **pp, const uint8_t *end, int wire, Span *out)
{
    Span s;
    if (wire != 2 || !delimited(pp, end, &s) || !utf8(&s))
        return NOT_READ;
    *out = s;
    return READ;
}

/* A message field the view declares singular: read once. A second occurrence would be merged
 * into the first by upb; it is left to the Python path instead. */
static int
message_field(const uint8_t **pp, const uint8_t *end, int wire, Span *out)
{
    if (wire != 2 || out->present)
        return NOT_READ;
    return delimited(pp, end, out);
}

/* What a message's reader does with one of its fields: reads it (READ), declines the request
 * (NOT_READ), or leaves it to walk() to skip (OTHER, a field the view does not declare). */
#define OTHER 2
typedef int (*OnField)(void *into, uint32_t field, int wire, const uint8_t **pp, const uint8_t *end);

/* Every field of a message, in order, through `on`. */
static int
walk(Span msg, OnField on, void *into)
{
    const uint8_t *p = msg.p, *end = msg.p + msg.n;
    while (p < end) {
        uint32_t field;
        int wire;
        if (!tag(&p, end, &field, &wire))
            return NOT_READ;
        int done = on(into, field, wire, &p, end);
        if (done == OTHER)
            done = skip(&p, end, wire);
        if (done != READ)
            return NOT_READ;
    }
    return READ;
}

/* One map entry: key = 1, value = 2, either missing meaning "", and nothing else (upb moves an
 * entry with any other field to the unknown fields: it is not in the map). `text`: the value is a
 * string (checked as UTF-8), not bytes. */
typedef struct {
    Span key, value;
    int text;
} MapEntry;

static int
on_map_entry(void *into, uint32_t field, int wire, const uint8_t **pp, const uint8_t *end)
{
    MapEntry *entry = into;
    if (field == 1)
        return string_field(pp, end, wire, &entry->key);
    if (field == 2)
        return wire == 2 && delimited(pp, end, &entry->value) && (!entry->text || utf8(&entry->value));
    return NOT_READ;
}

/* A map field's entry: if its key is `name` (or `name2`), its value goes to `out` (or `out2`); a
 * later entry with the same key wins, as in upb. */
static int
map_entry(const uint8_t **pp, const uint8_t *end, int wire, int text, const char *name, size_t name_len, Span *out,
          const char *name2, size_t name2_len, Span *out2)
{
    Span whole = {0};
    MapEntry entry = {{(const uint8_t *)"", 0, 1}, {(const uint8_t *)"", 0, 1}, text};
    if (wire != 2 || !delimited(pp, end, &whole) || !walk(whole, on_map_entry, &entry))
        return NOT_READ;
    if (named(&entry.key, name, name_len))
        *out = entry.value;
    else if (name2 != NULL && named(&entry.key, name2, name2_len))
        *out2 = entry.value;
    return READ;
}

#define NAME(s) s, sizeof(s) - 1

/* Peer: principal = 4. */
static int
on_peer(void *into, uint32_t field, int wire, const uint8_t **pp, const uint8_t *end)
{
    Fields *f = into;
    return field == 4 ? string_field(pp, end, wire, &f->f[F_PEER]) : OTHER;
}

/* HttpRequest: id = 1, method = 2, headers = 3, path = 4. */
static int
on_http(void *into, uint32_t field, int wire, const uint8_t **pp, const uint8_t *end)
{
    Fields *f = into;
    switch (field) {
    case 1:
        return string_field(pp, end, wire, &f->request_id);
    case 2:
        return string_field(pp, end, wire, &f->f[F_METHOD]);
    case 3:
        return map_entry(pp, end, wire, 1, NAME(SHADOW_HEADER), &f->f[F_SHADOW], NULL, 0, NULL);
    case 4:
        return string_field(pp, end, wire, &f->f[F_PATH]);
    default:
        return OTHER;
    }
}

/* Metadata: filter_metadata = 1, a map of namespace to the bytes of a Struct. */
static int
on_metadata(void *into, uint32_t field, int wire, const uint8_t **pp, const uint8_t *end)
{
    Fields *f = into;
    return field == 1 ? map_entry(pp, end, wire, 0, NAME(JWT_AUTHN), &f->f[F_META], NULL, 0, NULL) : OTHER;
}

/* A message whose one field the view reads is a message: CheckRequest.attributes = 1,
 * AttributeContext.Request.http = 2. */
typedef struct {
    uint32_t field;
    Span found;
} One;

static int
on_one(void *into, uint32_t field, int wire, const uint8_t **pp, const uint8_t *end)
{
    One *one = into;
    return field == one->field ? message_field(pp, end, wire, &one->found) : OTHER;
}

/* AttributeContext: source = 1, request = 4, context_extensions = 10, metadata_context = 11. */
typedef struct {
    Fields *f;
    Span source, request, metadata;
} Attributes;

static int
on_attributes(void *into, uint32_t field, int wire, const uint8_t **pp, const uint8_t *end)
{
    Attributes *a = into;
    switch (field) {
    case 1:
        return message_field(pp, end, wire, &a->source);
    case 4:
        return message_field(pp, end, wire, &a->request);
    case 10:
        return map_entry(pp, end, wire, 1, NAME(PERMISSION), &a->f->f[F_PERMISSION], NAME(SCOPE), &a->f->f[F_SCOPE]);
    case 11:
        return message_field(pp, end, wire, &a->metadata);
    default:
        return OTHER;
    }
}

/* The fields of a CheckRequest's bytes, or NOT_READ when the lane must leave it to Python
 * (without attributes.request.http the Python path refuses it as malformed). */
static int
read_check(const uint8_t *data, Py_ssize_t n, Fields *f)
{
    memset(f, 0, sizeof(*f));
    One check = {1, {0}}, http = {2, {0}};
    Attributes a = {f, {0}, {0}, {0}};
    Span whole = {data, n, 1};
    return walk(whole, on_one, &check) && check.found.present && walk(check.found, on_attributes, &a) &&
           (!a.source.present || walk(a.source, on_peer, f)) &&
           (!a.metadata.present || walk(a.metadata, on_metadata, f)) && a.request.present &&
           walk(a.request, on_one, &http) && http.found.present && walk(http.found, on_http, f);
}

/* The fields as one bytes key: a byte of which optional fields are present, then each field as
 * its length (4 bytes) and its bytes. Lengths make it unambiguous. */
static PyObject *
key_of(const Fields *f)
{
    Py_ssize_t size = 1;
    for (int i = 0; i < N_FIELDS; i++)
        size += 4 + f->f[i].n;
    PyObject *key = PyBytes_FromStringAndSize(NULL, size);
    if (key == NULL)
        return NULL;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(key);
    uint8_t present = 0;
    for (int i = 0; i < N_FIELDS; i++)
        present |= (uint8_t)(f->f[i].present ? 1u << i : 0);
    *out++ = present;
    for (int i = 0; i < N_FIELDS; i++) {
        uint32_t n = (uint32_t)f->f[i].n;
        memcpy(out, &n, 4);
        out += 4;
        if (n)
            memcpy(out, f->f[i].p, n);
        out += n;
    }
    return key;
}

/* ---- the lane -------------------------------------------------------------------------------- */

#define MAX_BOUNDS 32

/* Every answer() call in the process, answered or not: what a build's pacer reads to know that
 * Checks are arriving (model/pacing.py). Only ever written with the GIL held. */
static unsigned long long calls;

typedef struct {
    PyObject *response; /* the answer's bytes */
    PyObject *args;     /* (principal, handle, scope, evaluation): record()'s and drain()'s */
    uint64_t hits;      /* since the last drain() */
} Entry;

typedef struct {
    PyObject_HEAD
    PyObject *index;  /* dict: key bytes -> int, the entry's index */
    Entry *entries;
    Py_ssize_t size, capacity, limit;
    /* The decision log's queue (a deque), or NULL: a hit is appended as DecisionLog.record does. */
    PyObject *queue, *append, *wake, *drops;
    Py_ssize_t max_queue, batch;
    PyObject *sample; /* sample(principal, handle, scope, evaluation, request_id), or NULL */
    double rate;      /* the share of hits passed to sample() */
    uint64_t draws;   /* xorshift64* state: sampling, not a secret */
    double bounds[MAX_BOUNDS];
    int nbounds;
    uint64_t buckets[MAX_BOUNDS + 1];
    double total;
    uint64_t count;
} Lane;

static int
Lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", "bounds", "log", "sample", "rate", NULL};
    Py_ssize_t limit, max_queue = 0, batch = 0;
    PyObject *bounds, *log = Py_None, *sample = Py_None;
    PyObject *queue = NULL, *wake = NULL, *drops = NULL;
    double rate = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nO|OOd", kwlist, &limit, &bounds, &log, &sample, &rate))
        return -1;
    if (log != Py_None && !PyArg_ParseTuple(log, "OnnOO!;log is (queue, max_queue, batch, wake, drops)", &queue,
                                            &max_queue, &batch, &wake, &PyDict_Type, &drops))
        return -1;
    if (limit < 1) {
        PyErr_SetString(PyExc_ValueError, "limit must be >= 1");
        return -1;
    }
    PyObject *seq = PySequence_Fast(bounds, "bounds must be a sequence of floats");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_BOUNDS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %d bounds", MAX_BOUNDS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double b = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (b == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        self->bounds[i] = b;
    }
    Py_DECREF(seq);
    if ((wake != NULL && !PyCallable_Check(wake)) || (sample != Py_None && !PyCallable_Check(sample))) {
        PyErr_SetString(PyExc_TypeError, "wake and sample must be callable");
        return -1;
    }
    if (!(rate >= 0.0 && rate <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "rate must be between 0 and 1");
        return -1;
    }
    if (self->index != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a lane is initialised once");
        return -1;
    }
    self->index = PyDict_New();
    if (self->index == NULL)
        return -1;
    if (queue != NULL) {
        self->append = PyObject_GetAttrString(queue, "append");
        if (self->append == NULL)
            return -1;
        self->queue = Py_NewRef(queue);
        self->wake = Py_NewRef(wake);
        self->drops = Py_NewRef(drops);
        self->max_queue = max_queue;
        self->batch = batch;
    }
    self->sample = sample == Py_None ? NULL : Py_NewRef(sample);
    self->rate = self->sample != NULL ? rate : 0.0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    self->draws = ((uint64_t)ts.tv_nsec << 32) ^ (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)self ^ 0x9E3779B97F4A7C15u;
    self->nbounds = (int)n;
    self->limit = limit;
    return 0;
}

static int
Lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->index);
    Py_VISIT(self->queue);
    Py_VISIT(self->append);
    Py_VISIT(self->wake);
    Py_VISIT(self->drops);
    Py_VISIT(self->sample);
    for (Py_ssize_t i = 0; i < self->size; i++) {
        Py_VISIT(self->entries[i].response);
        Py_VISIT(self->entries[i].args);
    }
    return 0;
}

static int
Lane_clear(Lane *self)
{
    Entry *entries = self->entries;
    Py_ssize_t size = self->size;
    self->entries = NULL;
    self->size = self->capacity = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        Py_CLEAR(entries[i].response);
        Py_CLEAR(entries[i].args);
    }
    PyMem_Free(entries);
    Py_CLEAR(self->index);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->append);
    Py_CLEAR(self->wake);
    Py_CLEAR(self->drops);
    Py_CLEAR(self->sample);
    return 0;
}

static void
Lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    Lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A uniform double in [0, 1) (xorshift64*). */
static double
draw(Lane *self)
{
    uint64_t x = self->draws;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    self->draws = x;
    return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

/* The entry's args and a last item, as a 5-tuple: the decision log's queued item (with the time)
 * or sample()'s arguments (with the request id). Steals `last`. */
static PyObject *
args_and(PyObject *args, PyObject *last)
{
    if (last == NULL)
        return NULL;
    PyObject *out = PyTuple_Pack(5, PyTuple_GET_ITEM(args, 0), PyTuple_GET_ITEM(args, 1), PyTuple_GET_ITEM(args, 2),
                                 PyTuple_GET_ITEM(args, 3), last);
    Py_DECREF(last);
    return out;
}

/* A call's result, which is not needed: -1 if the call failed. */
static int
discard(PyObject *result)
{
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* DecisionLog.record, in C: queue (principal, handle, scope, evaluation, time.time()), waking the
 * writer once per batch, or count the decision dropped when the queue is full. */
static int
enqueue(Lane *self, PyObject *args)
{
    Py_ssize_t queued = PyObject_Size(self->queue);
    if (queued < 0)
        return -1;
    if (queued >= self->max_queue) {
        PyObject *was = PyDict_GetItemString(self->drops, "queue_full"), *one = PyLong_FromLong(1);
        PyObject *more = was != NULL && one != NULL ? PyNumber_Add(was, one) : Py_XNewRef(one);
        Py_XDECREF(one);
        if (more == NULL)
            return -1;
        int failed = PyDict_SetItemString(self->drops, "queue_full", more);
        Py_DECREF(more);
        return failed;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    PyObject *item = args_and(args, PyFloat_FromDouble((double)ts.tv_sec + (double)ts.tv_nsec * 1e-9));
    if (item == NULL)
        return -1;
    int failed = discard(PyObject_CallOneArg(self->append, item));
    Py_DECREF(item);
    if (failed)
        return -1;
    if (queued + 1 == self->batch) /* once per batch, not per request: Event.set takes a lock */
        return discard(PyObject_CallNoArgs(self->wake));
    return 0;
}

/* A hit drawn for the log (--log-decisions): sample(principal, handle, scope, evaluation, request id). */
static int
sampled(Lane *self, PyObject *args, const Span *request_id)
{
    PyObject *argv = args_and(args, PyUnicode_DecodeUTF8((const char *)request_id->p, request_id->n, "strict"));
    if (argv == NULL)
        return -1;
    int failed = discard(PyObject_Call(self->sample, argv, NULL));
    Py_DECREF(argv);
    return failed;
}

static int
raw_bytes(PyObject *raw, const uint8_t **data, Py_ssize_t *n)
{
    if (!PyBytes_Check(raw)) {
        PyErr_SetString(PyExc_TypeError, "raw must be bytes");
        return 0;
    }
    *data = (const uint8_t *)PyBytes_AS_STRING(raw);
    *n = PyBytes_GET_SIZE(raw);
    return 1;
}

/* answer(raw) -> bytes | None: the known answer to these bytes, counted; None when unknown. */
static PyObject *
Lane_answer(Lane *self, PyObject *raw)
{
    double started = now();
    calls++;
    const uint8_t *data;
    Py_ssize_t n;
    Fields f;
    if (self->index == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "lane not initialised");
        return NULL;
    }
    if (!raw_bytes(raw, &data, &n))
        return NULL;
    if (!read_check(data, n, &f))
        Py_RETURN_NONE;
    PyObject *key = key_of(&f);
    if (key == NULL)
        return NULL;
    PyObject *found = PyDict_GetItemWithError(self->index, key);
    Py_DECREF(key);
    if (found == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    Py_ssize_t at = PyLong_AsSsize_t(found);
    if (at < 0 || at >= self->size) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "lane index out of range");
        return NULL;
    }
    Entry *e = &self->entries[at];
    PyObject *response = Py_NewRef(e->response);
    /* `e` is not read after a call into Python: it may let another thread learn, which can move
     * the entries (an index stays valid: entries are only ever added). */
    PyObject *args = Py_NewRef(e->args);
    int failed = (self->queue != NULL && enqueue(self, args) < 0) ||
                 (self->rate > 0.0 && draw(self) < self->rate && sampled(self, args, &f.request_id) < 0);
    Py_DECREF(args);
    if (failed) {
        Py_DECREF(response);
        return NULL;
    }
    /* Counted once answered: a Check whose record() failed goes on to the Python path. */
    self->entries[at].hits++;
    double took = now() - started;
    int b = 0;
    while (b < self->nbounds && self->bounds[b] < took)
        b++;
    self->buckets[b]++;
    self->total += took;
    self->count++;
    return response;
}

/* learn(raw, response, args) -> bool: keep `response` as the answer to requests reading as `raw`
 * does. False when the lane cannot read `raw` or is full; a key already known keeps its entry. */
static PyObject *
Lane_learn(Lane *self, PyObject *const *argv, Py_ssize_t argc)
{
    const uint8_t *data;
    Py_ssize_t n;
    Fields f;
    if (argc != 3) {
        PyErr_SetString(PyExc_TypeError, "learn(raw, response, args)");
        return NULL;
    }
    PyObject *response = argv[1], *args = argv[2];
    if (!raw_bytes(argv[0], &data, &n))
        return NULL;
    if (!PyBytes_Check(response) || !PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 4) {
        PyErr_SetString(PyExc_TypeError, "response must be bytes and args a 4-tuple");
        return NULL;
    }
    if (self->index == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "lane not initialised");
        return NULL;
    }
    if (!read_check(data, n, &f) || self->size >= self->limit)
        Py_RETURN_FALSE;
    PyObject *key = key_of(&f);
    if (key == NULL)
        return NULL;
    int known = PyDict_Contains(self->index, key);
    if (known != 0) {
        Py_DECREF(key);
        if (known < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    if (self->size == self->capacity) {
        Py_ssize_t capacity = self->capacity ? self->capacity * 2 : 16;
        Entry *grown = PyMem_Realloc(self->entries, (size_t)capacity * sizeof(Entry));
        if (grown == NULL) {
            Py_DECREF(key);
            return PyErr_NoMemory();
        }
        self->entries = grown;
        self->capacity = capacity;
    }
    PyObject *at = PyLong_FromSsize_t(self->size);
    if (at == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    /* The entry is whole before its key can be found. */
    Entry *e = &self->entries[self->size];
    e->response = Py_NewRef(response);
    e->args = Py_NewRef(args);
    e->hits = 0;
    self->size++;
    int failed = PyDict_SetItem(self->index, key, at);
    Py_DECREF(key);
    Py_DECREF(at);
    if (failed)
        return NULL;
    Py_RETURN_TRUE;
}

/* drain() -> (hits, buckets, total, count): the counts since the last drain, which start again.
 * hits: [(args, n)] for each entry asked since; buckets: the latency histogram's counts per
 * bound (and one past the last); total: the seconds they took. */
static PyObject *
Lane_drain(Lane *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *hits = PyList_New(0), *buckets = NULL;
    if (hits == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->size; i++) {
        Entry *e = &self->entries[i];
        if (e->hits == 0)
            continue;
        PyObject *pair = Py_BuildValue("(OK)", e->args, (unsigned long long)e->hits);
        if (pair == NULL || PyList_Append(hits, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(hits);
            return NULL;
        }
        Py_DECREF(pair);
    }
    buckets = PyList_New(self->nbounds + 1);
    if (buckets == NULL) {
        Py_DECREF(hits);
        return NULL;
    }
    for (int b = 0; b <= self->nbounds; b++) {
        PyObject *c = PyLong_FromUnsignedLongLong(self->buckets[b]);
        if (c == NULL) {
            Py_DECREF(hits);
            Py_DECREF(buckets);
            return NULL;
        }
        PyList_SET_ITEM(buckets, b, c);
    }
    PyObject *out = Py_BuildValue("(NNdK)", hits, buckets, self->total, (unsigned long long)self->count);
    if (out == NULL)
        return NULL;
    /* Nothing above ran Python code: no hit was counted between reading and resetting. */
    for (Py_ssize_t i = 0; i < self->size; i++)
        self->entries[i].hits = 0;
    memset(self->buckets, 0, sizeof(self->buckets));
    self->total = 0.0;
    self->count = 0;
    return out;
}

static Py_ssize_t
Lane_len(Lane *self)
{
    return self->size;
}

static PyObject *
span_value(const Span *s, int optional)
{
    if (optional && !s->present)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)s->p, s->n);
}

/* calls() -> int: how many Checks were put to any lane in this process. */
static PyObject *
calls_made(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(calls);
}

/* fields(raw) -> tuple | None: what the lane reads, for tests that hold it to upb's parse. */
static PyObject *
fields(PyObject *Py_UNUSED(module), PyObject *raw)
{
    const uint8_t *data;
    Py_ssize_t n;
    Fields f;
    if (!raw_bytes(raw, &data, &n))
        return NULL;
    if (!read_check(data, n, &f))
        Py_RETURN_NONE;
    static const int optional[N_FIELDS] = {1, 0, 0, 0, 1, 1, 1};
    PyObject *out = PyTuple_New(N_FIELDS);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *v = span_value(&f.f[i], optional[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
}

static PyMethodDef Lane_methods[] = {
    {"answer", (PyCFunction)Lane_answer, METH_O, "The known answer to a CheckRequest's bytes, or None."},
    {"learn", (PyCFunction)(void (*)(void))Lane_learn, METH_FASTCALL, "Keep an answer for requests reading as raw does."},
    {"drain", (PyCFunction)Lane_drain, METH_NOARGS, "The counts since the last drain: (hits, buckets, total, count)."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Lane_as_sequence = {
    .sq_length = (lenfunc)Lane_len,
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "authz_sidecar.fronts._checklane.Lane",
    .tp_doc = "Answers to CheckRequests already decided on one snapshot, read from their bytes.",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_traverse = (traverseproc)Lane_traverse,
    .tp_clear = (inquiry)Lane_clear,
    .tp_methods = Lane_methods,
    .tp_as_sequence = &Lane_as_sequence,
};

static PyMethodDef module_methods[] = {
    {"fields", (PyCFunction)fields, METH_O, "The fields the lane reads from a CheckRequest's bytes, or None."},
    {"calls", (PyCFunction)calls_made, METH_NOARGS, "How many Checks were put to any lane in this process."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "authz_sidecar.fronts._checklane",
    .m_doc = "A Check asked again, answered from its bytes without running Python (see _checklane.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__checklane(void)
{
    if (PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
