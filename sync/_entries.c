/* sync._entries: a read of v2 stream entries decoded in one pass (sync/batch.py).
 *
 * decode_v2(entries, times, kinds, max_digits) takes the entries of one XREADGROUP or
 * XAUTOCLAIM read (each [id, ["v2", value]], as the fast client returns them) and answers
 * what sync/batch.py decode_each answers for the same read, when every entry is a v2 entry
 * that decode_each decodes on its fast path (a known shape; no reference decode needed):
 *
 *   (entry ids, fields, flats, COPY lines, days, empty bucket, usage, levels, clean)
 *
 * with each flat the list of the entry's values (str.split on tabs, lv set aside), each
 * line sync/records.py copy_line of it, each day the UTC day of its ts from `times`
 * (sync/records.py Times: called once per run of equal ts), and clean when no value holds
 * a newline, a carriage return or a backslash (no value holds a tab: they are split on
 * tabs), which makes the fast COPY rendering exact as it is. Anything else (another shape,
 * a v1 entry, a value decode would check by itself, bytes, a lone surrogate, a ts `times`
 * refuses) answers None, and decode_each decodes the read: so the answer, when there is
 * one, is decode_each's, and tests/sync/test_sync_decode.py checks both forms alike.
 *
 * Why: per event, decode_each's interpreter work (the checks, the line joined from the
 * values, the lists it appends to) was most of the sync worker's decode; here each value is
 * read once, the line is written into one buffer, and the only objects made per event are
 * the ones the writer keeps (the values, the line), a value of few distinct texts (the org,
 * user, feature ...) only once per read (`slot_value`).
 *
 * Plain C99 against the Python headers, compiled by hatch_build.py like _topscan.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <string.h>

#define N_FIELDS 21     /* gateway/core/events.py FIELDS */
#define N_EXT 30        /* FIELDS + USAGE_FIELDS */
#define MAX_VALUES 32   /* FIELDS_EXT, tm, lv */
#define TS 13

/* The integer values of FIELDS (t bal x a used s ts st lat) and of the usage fields
 * (rs ov ui uc uo ur), as sync/records.py checked() and usage_fast() read them. */
static const int INTS[] = {6, 7, 8, 9, 10, 12, 13, 15, 16};
static const int USAGE_INTS[] = {21, 22, 24, 25, 26, 27};
/* The end of a line without usage fields (sync/records.py NO_USAGE). */
static const char NO_USAGE[] = "\t\t0\t\t\t\t\t\t\t0\t";

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int put(Buf *b, const char *p, Py_ssize_t n) {
    if (b->len + n > b->cap) {
        Py_ssize_t cap = (b->len + n) * 2 + 256;
        char *grown = PyMem_Realloc(b->data, (size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, (size_t)n);
    b->len += n;
    return 0;
}

/* The value at k, or "0" when it is empty (a NOT NULL integer column). */
#define PUT_VALUE(k) put(&buf, u + at[k], len[k])
#define PUT_OR_ZERO(k) (len[k] ? PUT_VALUE(k) : put(&buf, "0", 1))
#define PUT_TAB() put(&buf, "\t", 1)

static int all_digits(const char *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return 0;
        }
    }
    return 1;
}

static PyObject *piece(const char *p, Py_ssize_t n, int ascii) {
    if (n == 0) {
        return PyUnicode_New(0, 0);
    }
    if (ascii) {
        PyObject *s = PyUnicode_New(n, 127);
        if (s != NULL) {
            memcpy(PyUnicode_1BYTE_DATA(s), p, (size_t)n);
        }
        return s;
    }
    return PyUnicode_DecodeUTF8(p, n, "strict");
}

/* The read's values of few distinct texts that change from entry to entry (org, user,
 * feature, bucket, tokens, route), kept per read in a direct-mapped table: an entry whose
 * value is the text of the slot's takes that object. One object per distinct text instead
 * of one per event: fewer to make and free, and their hashes, computed once, kept, so the
 * reductions' dict lookups (org_order, rollups, newest, plans) hash each text once and
 * find their keys by identity; the objects they keep sit together in memory. Equal
 * values either way: the answer is the same. */
#define SLOTS 1024
#define SLOT_MAX_LEN 64

static int slotted(int k) {
    return (k >= 2 && k <= 6) || k == 18;
}

/* The value at (p, n) of column k, from `slots` when a slot holds its text (a new
 * reference), else made and put in its slot; NULL on error. Only for ASCII values. */
static PyObject *slot_value(PyObject **slots, int k, const char *p, Py_ssize_t n) {
    const unsigned char *q = (const unsigned char *)p;
    size_t h = 2166136261u ^ (size_t)k; /* FNV-1a */
    for (Py_ssize_t j = 0; j < n; j++) {
        h = (h ^ q[j]) * 16777619u;
    }
    PyObject **slot = &slots[h & (SLOTS - 1)];
    PyObject *c = *slot;
    if (c != NULL && PyUnicode_GET_LENGTH(c) == n &&
        memcmp(PyUnicode_1BYTE_DATA(c), p, (size_t)n) == 0) {
        Py_INCREF(c);
        return c;
    }
    PyObject *s = piece(p, n, 1);
    if (s != NULL) {
        Py_INCREF(s);
        Py_XSETREF(*slot, s);
    }
    return s;
}

/* 1: decoded into the lists at i; 0: not this fast path's entry (answer None); -1: error. */
static int one(PyObject *entry, Py_ssize_t i, PyObject *times, PyObject *kinds,
               Py_ssize_t max_digits, PyObject *out[5], PyObject *levels, Buf *bufp,
               PyObject **last_ts, PyObject **last_hit, int *empty_bucket, int *usage,
               int *dirty, PyObject **slots) {
    Buf buf = *bufp;
    int result = -1;
    PyObject *id, *fields, *name, *value, *flat = NULL, *line = NULL;
    if (PyList_CheckExact(entry) && PyList_GET_SIZE(entry) == 2) {
        id = PyList_GET_ITEM(entry, 0);
        fields = PyList_GET_ITEM(entry, 1);
    } else if (PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 2) {
        id = PyTuple_GET_ITEM(entry, 0);
        fields = PyTuple_GET_ITEM(entry, 1);
    } else {
        return 0;
    }
    if (!PyList_CheckExact(fields) || PyList_GET_SIZE(fields) != 2) {
        return 0;
    }
    name = PyList_GET_ITEM(fields, 0);
    value = PyList_GET_ITEM(fields, 1);
    if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(value) ||
        PyUnicode_CompareWithASCIIString(name, "v2") != 0) {
        return 0;
    }
    Py_ssize_t size;
    const char *u = PyUnicode_AsUTF8AndSize(value, &size);
    if (u == NULL) { /* a lone surrogate (surrogateescape): decode_each's business */
        PyErr_Clear();
        return 0;
    }
    int ascii = PyUnicode_IS_ASCII(value);
    Py_ssize_t at[MAX_VALUES + 1], len[MAX_VALUES];
    int n = 0;
    at[0] = 0;
    /* memchr (vectorised by the C library) rather than a loop over every byte. */
    const char *tab;
    while ((tab = memchr(u + at[n], '\t', (size_t)(size - at[n]))) != NULL) {
        if (n + 1 >= MAX_VALUES) {
            return 0;
        }
        len[n] = (tab - u) - at[n];
        n++;
        at[n] = (tab - u) + 1;
    }
    len[n] = size - at[n];
    if (!*dirty && (memchr(u, '\\', (size_t)size) || memchr(u, '\n', (size_t)size) ||
                    memchr(u, '\r', (size_t)size))) {
        *dirty = 1; /* the fast COPY rendering must check the payload */
    }
    n++;
    int lv = n == N_FIELDS + 2 || n == N_EXT + 2;
    int values = lv ? n - 1 : n;
    if (values != N_FIELDS && values != N_FIELDS + 1 && values != N_EXT && values != N_EXT + 1) {
        return 0;
    }
    int has_usage = values >= N_EXT, teamed = values == N_FIELDS + 1 || values == N_EXT + 1;
    /* sync/records.py checked(): an id, an org, the integers canonical digits. */
    if (len[0] == 0 || len[2] == 0) {
        return 0;
    }
    Py_ssize_t digits = 0;
    for (size_t k = 0; k < sizeof INTS / sizeof INTS[0]; k++) {
        if (!all_digits(u + at[INTS[k]], len[INTS[k]])) {
            return 0;
        }
        digits += len[INTS[k]];
    }
    if (digits == 0 || digits > max_digits) {
        return 0;
    }
    if (has_usage) { /* usage_fast() */
        digits = 0;
        for (size_t k = 0; k < sizeof USAGE_INTS / sizeof USAGE_INTS[0]; k++) {
            if (!all_digits(u + at[USAGE_INTS[k]], len[USAGE_INTS[k]])) {
                return 0;
            }
            digits += len[USAGE_INTS[k]];
        }
        if (digits > max_digits || len[29] > 1 || (len[29] == 1 && u[at[29]] != '1')) {
            return 0;
        }
    }
    flat = PyList_New(values);
    if (flat == NULL) {
        return -1;
    }
    /* The previous entry's value where this one's is the same text (kind, method, status,
     * plan, period, feature ... mostly are): one object fewer to make, and its hash,
     * once computed by a reduction, kept. */
    PyObject *prev = i > 0 ? PyList_GET_ITEM(out[2], i - 1) : NULL;
    Py_ssize_t shared = prev != NULL && ascii ? PyList_GET_SIZE(prev) : 0;
    for (int k = 0; k < values; k++) {
        PyObject *s = NULL;
        if (k < shared) {
            PyObject *p = PyList_GET_ITEM(prev, k);
            if (PyUnicode_IS_ASCII(p) && PyUnicode_GET_LENGTH(p) == len[k] &&
                memcmp(PyUnicode_1BYTE_DATA(p), u + at[k], (size_t)len[k]) == 0) {
                Py_INCREF(p);
                s = p;
            }
        }
        if (s == NULL && ascii && len[k] > 0 && len[k] <= SLOT_MAX_LEN && slotted(k)) {
            if ((s = slot_value(slots, k, u + at[k], len[k])) == NULL) {
                goto done;
            }
        }
        if (s == NULL && (s = piece(u + at[k], len[k], ascii)) == NULL) {
            goto done;
        }
        PyList_SET_ITEM(flat, k, s);
    }
    int known = PySet_Contains(kinds, PyList_GET_ITEM(flat, 1));
    if (known <= 0) {
        result = known;
        goto done;
    }
    /* created_at and the day: Times, once per run of equal ts. */
    PyObject *ts = PyList_GET_ITEM(flat, TS);
    if (*last_ts == NULL || PyUnicode_Compare(ts, *last_ts) != 0) {
        if (PyErr_Occurred()) {
            goto done;
        }
        PyObject *hit = PyObject_GetItem(times, ts);
        if (hit == NULL) { /* a ts out of range: decode_each reports the entry */
            PyErr_Clear();
            result = 0;
            goto done;
        }
        if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 2 ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(hit, 0))) {
            Py_DECREF(hit);
            result = 0;
            goto done;
        }
        Py_INCREF(ts);
        Py_XSETREF(*last_ts, ts);
        Py_XSETREF(*last_hit, hit);
    }
    Py_ssize_t created_len;
    const char *created = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(*last_hit, 0), &created_len);
    if (created == NULL) {
        goto done;
    }
    /* sync/records.py copy_line */
    buf.len = 0;
    for (int k = 0; k < 6; k++) {
        if (PUT_VALUE(k) || PUT_TAB()) {
            goto done;
        }
    }
    if (PUT_OR_ZERO(6) || PUT_TAB() || PUT_VALUE(7) || PUT_TAB() || PUT_VALUE(8) || PUT_TAB() ||
        PUT_OR_ZERO(12) || PUT_TAB() || put(&buf, created, created_len)) {
        goto done;
    }
    for (int k = 14; k <= 20; k++) {
        if (PUT_TAB() || PUT_VALUE(k)) {
            goto done;
        }
    }
    if (has_usage) {
        if (PUT_TAB() || PUT_VALUE(21) || PUT_TAB() || PUT_OR_ZERO(22)) {
            goto done;
        }
        for (int k = 23; k <= 28; k++) {
            if (PUT_TAB() || PUT_VALUE(k)) {
                goto done;
            }
        }
        if (PUT_TAB() || PUT_OR_ZERO(29) || PUT_TAB()) {
            goto done;
        }
    } else if (put(&buf, NO_USAGE, (Py_ssize_t)(sizeof NO_USAGE - 1))) {
        goto done;
    }
    if (teamed && PUT_VALUE(values - 1)) {
        goto done;
    }
    line = piece(buf.data, buf.len, ascii);
    if (line == NULL) {
        goto done;
    }
    if (lv) {
        PyObject *figures = piece(u + at[values], len[values], ascii);
        if (figures == NULL) {
            goto done;
        }
        PyObject *pair = Py_BuildValue("(nN)", i, figures);
        if (pair == NULL || PyList_Append(levels, pair) < 0) {
            Py_XDECREF(pair);
            goto done;
        }
        Py_DECREF(pair);
    }
    if (len[5] == 0) {
        *empty_bucket = 1;
    }
    if (has_usage) {
        *usage = 1;
    }
    Py_INCREF(id);
    PyList_SET_ITEM(out[0], i, id);
    Py_INCREF(fields);
    PyList_SET_ITEM(out[1], i, fields);
    PyList_SET_ITEM(out[2], i, flat);
    PyList_SET_ITEM(out[3], i, line);
    PyObject *day = PyTuple_GET_ITEM(*last_hit, 1);
    Py_INCREF(day);
    PyList_SET_ITEM(out[4], i, day);
    *bufp = buf;
    return 1;
done:
    *bufp = buf;
    Py_XDECREF(flat);
    Py_XDECREF(line);
    return result;
}

static PyObject *decode_v2(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *entries, *times, *kinds;
    Py_ssize_t max_digits;
    if (!PyArg_ParseTuple(args, "O!OO!n", &PyList_Type, &entries, &times, &PyFrozenSet_Type,
                          &kinds, &max_digits)) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(entries);
    if (n == 0) {
        Py_RETURN_NONE;
    }
    PyObject *out[5] = {NULL, NULL, NULL, NULL, NULL};
    PyObject *levels = NULL, *last_ts = NULL, *last_hit = NULL, *answer = NULL;
    Buf buf = {NULL, 0, 0};
    int empty_bucket = 0, usage = 0, dirty = 0, status = 1;
    PyObject **slots = PyMem_Calloc(SLOTS, sizeof(PyObject *));
    if (slots == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (int k = 0; k < 5; k++) {
        if ((out[k] = PyList_New(n)) == NULL) {
            goto done;
        }
    }
    if ((levels = PyList_New(0)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n && status == 1; i++) {
        status = one(PyList_GET_ITEM(entries, i), i, times, kinds, max_digits, out, levels, &buf,
                     &last_ts, &last_hit, &empty_bucket, &usage, &dirty, slots);
    }
    if (status == 1) {
        answer = Py_BuildValue("(OOOOOOOOO)", out[0], out[1], out[2], out[3], out[4],
                               empty_bucket ? Py_True : Py_False, usage ? Py_True : Py_False,
                               levels, dirty ? Py_False : Py_True);
    } else if (status == 0) {
        answer = Py_None;
        Py_INCREF(answer);
    }
done:
    /* Lists filled only in part hold NULLs, which their deallocation skips. */
    for (int k = 0; k < 5; k++) {
        Py_XDECREF(out[k]);
    }
    Py_XDECREF(levels);
    Py_XDECREF(last_ts);
    Py_XDECREF(last_hit);
    for (int k = 0; k < SLOTS; k++) {
        Py_XDECREF(slots[k]);
    }
    PyMem_Free(slots);
    PyMem_Free(buf.data);
    return answer;
}


/* ---- the batch's reductions (sync/aggregate.py), the same answers as its Python loops ---- */

/* An integer value of a Flat (canonical digits, maybe a sign, at most 18 digits) into *out;
 * 0 for anything else (the Python form then reduces the batch: it reads any int()). */
static int small_int(PyObject *s, long long *out) {
    if (!PyUnicode_CheckExact(s) || !PyUnicode_IS_ASCII(s)) {
        return 0;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    const char *p = (const char *)PyUnicode_1BYTE_DATA(s);
    int negative = n > 0 && p[0] == '-';
    if (negative) {
        p++;
        n--;
    }
    if (n == 0 || n > 18) {
        return 0;
    }
    long long v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return 0;
        }
        v = v * 10 + (p[i] - '0');
    }
    *out = negative ? -v : v;
    return 1;
}

/* A value of a Flat that is a list of at least N_FIELDS str (else NULL: not ours). */
static PyObject *value_at(PyObject *flat, Py_ssize_t k) {
    if (!PyList_CheckExact(flat) || PyList_GET_SIZE(flat) < N_FIELDS) {
        return NULL;
    }
    PyObject *v = PyList_GET_ITEM(flat, k);
    return PyUnicode_CheckExact(v) ? v : NULL;
}

typedef struct {
    Py_ssize_t first;  /* the key's first event */
    Py_ssize_t count;
    long long sum;
    PyObject *bucket; /* borrowed: the least bucket (features) */
    /* borrowed, of the key's first event: its org, day and user (or feature) */
    PyObject *org, *day, *name;
} Cell;

/* An (org, day) of a batch's rollups: its users' and its features' cells, by user or
 * feature (str -> the cell's index). */
typedef struct {
    PyObject *users, *features;
} Group;

static int same_text(PyObject *a, PyObject *b) {
    if (a == b) {
        return 1;
    }
    int c = PyUnicode_Compare(a, b);
    return c == -1 && PyErr_Occurred() ? -1 : c == 0;
}

/* The key's cell, a new one (index n) if it was not in `index`: -1 error, else its index. */
static Py_ssize_t cell_of(PyObject *index, PyObject *key, Py_ssize_t *n) {
    PyObject *at = PyDict_GetItemWithError(index, key);
    if (at != NULL) {
        return PyLong_AsSsize_t(at);
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    PyObject *fresh = PyLong_FromSsize_t(*n);
    if (fresh == NULL || PyDict_SetItem(index, key, fresh) < 0) {
        Py_XDECREF(fresh);
        return -1;
    }
    Py_DECREF(fresh);
    return (*n)++;
}

static int add(Cell *c, long long t) {
    c->count++;
    if ((t > 0 && c->sum > LLONG_MAX - t) || (t < 0 && c->sum < LLONG_MIN - t)) {
        return 0;
    }
    c->sum += t;
    return 1;
}

static PyObject *count_text(Cell *c, PyObject *one) {
    if (c->count == 1) {
        Py_INCREF(one);
        return one;
    }
    return PyUnicode_FromFormat("%zd", c->count);
}

static PyObject *sum_text(Cell *c, PyObject *flats, PyObject *zero) {
    if (c->count == 1) { /* the event's own string, as the Python form keeps it */
        PyObject *t = PyList_GET_ITEM(PyList_GET_ITEM(flats, c->first), 6);
        PyObject *out = PyUnicode_GET_LENGTH(t) ? t : zero;
        Py_INCREF(out);
        return out;
    }
    return PyUnicode_FromFormat("%lld", c->sum);
}

static int append_new(PyObject *list, PyObject *item) {
    if (item == NULL) {
        return -1;
    }
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

/* rollups(flats, days, kinds) -> sync/aggregate.py rollups_each's columns, or None.
 *
 * The keys are (org, day, user) and (org, day, feature), in the order of their first
 * events. An (org, day) is looked up once per run of events with the same org and day
 * (a batch in org order is one run per org: sync/writer.py), and within it the user and
 * the feature by the str alone: no key tuple made and hashed per event. The cells are
 * numbered as their keys first come, which is the order of the answer. */
static PyObject *rollups(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *flats, *days, *kinds;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &flats, &PyList_Type, &days,
                          &PyFrozenSet_Type, &kinds)) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(flats);
    if (PyList_GET_SIZE(days) != n) {
        Py_RETURN_NONE;
    }
    PyObject *index = PyDict_New();
    PyObject *answer = NULL, *cols = NULL;
    PyObject *one = PyUnicode_FromString("1"), *zero = PyUnicode_FromString("0");
    Cell *uc = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Cell));
    Cell *fc = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Cell));
    Group *groups = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Group));
    Group *group = NULL;
    PyObject *group_org = NULL, *group_day = NULL; /* borrowed: the current run's */
    Py_ssize_t nu = 0, nf = 0, ng = 0;
    int ours = 1;
    if (index == NULL || one == NULL || zero == NULL || uc == NULL || fc == NULL ||
        groups == NULL) {
        if (uc == NULL || fc == NULL || groups == NULL) {
            PyErr_NoMemory();
        }
        goto done;
    }
    for (Py_ssize_t i = 0; i < n && ours; i++) {
        PyObject *v = PyList_GET_ITEM(flats, i), *day = PyList_GET_ITEM(days, i);
        PyObject *kind = value_at(v, 1);
        if (kind == NULL) {
            ours = 0;
            break;
        }
        int request = PySet_Contains(kinds, kind);
        if (request < 0) {
            goto done;
        }
        if (!request) {
            continue;
        }
        PyObject *org = value_at(v, 2), *user = value_at(v, 3), *feature = value_at(v, 4);
        PyObject *bucket = value_at(v, 5), *tokens = value_at(v, 6);
        long long t = 0;
        if (org == NULL || user == NULL || feature == NULL || bucket == NULL || tokens == NULL ||
            !PyUnicode_CheckExact(day) ||
            (PyUnicode_GET_LENGTH(tokens) && !small_int(tokens, &t))) {
            ours = 0;
            break;
        }
        int same = group != NULL ? same_text(org, group_org) : 0;
        if (same == 1) {
            same = same_text(day, group_day);
        }
        if (same < 0) {
            goto done;
        }
        if (!same) {
            PyObject *key = PyTuple_Pack(2, org, day);
            if (key == NULL) {
                goto done;
            }
            Py_ssize_t g = cell_of(index, key, &ng);
            Py_DECREF(key);
            if (g < 0) {
                goto done;
            }
            group = &groups[g];
            if (group->users == NULL &&
                ((group->users = PyDict_New()) == NULL ||
                 (group->features = PyDict_New()) == NULL)) {
                goto done;
            }
            group_org = org;
            group_day = day;
        }
        Py_ssize_t k = cell_of(group->users, user, &nu);
        if (k < 0) {
            goto done;
        }
        if (uc[k].count == 0) {
            uc[k].first = i;
            uc[k].org = org;
            uc[k].day = day;
            uc[k].name = user;
        }
        if (!add(&uc[k], t)) {
            ours = 0;
            break;
        }
        k = cell_of(group->features, feature, &nf);
        if (k < 0) {
            goto done;
        }
        if (fc[k].count == 0) {
            fc[k].first = i;
            fc[k].bucket = bucket;
            fc[k].org = org;
            fc[k].day = day;
            fc[k].name = feature;
        } else {
            int less = PyUnicode_Compare(bucket, fc[k].bucket);
            if (less == -1 && PyErr_Occurred()) {
                goto done;
            }
            if (less < 0) {
                fc[k].bucket = bucket;
            }
        }
        if (!add(&fc[k], t)) {
            ours = 0;
            break;
        }
    }
    if (!ours) {
        answer = Py_None;
        Py_INCREF(answer);
        goto done;
    }
    /* The columns: users' org, day, user, count, sum; features' org, day, feature, bucket,
     * count, sum (sync/aggregate.py rollups). */
    cols = PyTuple_New(11);
    if (cols == NULL) {
        goto done;
    }
    for (int c = 0; c < 11; c++) {
        PyObject *list = PyList_New(0);
        if (list == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(cols, c, list);
    }
    for (Py_ssize_t k = 0; k < nu; k++) {
        Cell *c = &uc[k];
        if (PyList_Append(PyTuple_GET_ITEM(cols, 0), c->org) < 0 ||
            PyList_Append(PyTuple_GET_ITEM(cols, 1), c->day) < 0 ||
            PyList_Append(PyTuple_GET_ITEM(cols, 2), c->name) < 0 ||
            append_new(PyTuple_GET_ITEM(cols, 3), count_text(c, one)) < 0 ||
            append_new(PyTuple_GET_ITEM(cols, 4), sum_text(c, flats, zero)) < 0) {
            goto done;
        }
    }
    for (Py_ssize_t k = 0; k < nf; k++) {
        Cell *c = &fc[k];
        if (PyList_Append(PyTuple_GET_ITEM(cols, 5), c->org) < 0 ||
            PyList_Append(PyTuple_GET_ITEM(cols, 6), c->day) < 0 ||
            PyList_Append(PyTuple_GET_ITEM(cols, 7), c->name) < 0 ||
            PyList_Append(PyTuple_GET_ITEM(cols, 8), c->bucket) < 0 ||
            append_new(PyTuple_GET_ITEM(cols, 9), count_text(c, one)) < 0 ||
            append_new(PyTuple_GET_ITEM(cols, 10), sum_text(c, flats, zero)) < 0) {
            goto done;
        }
    }
    answer = cols;
    cols = NULL;
done:
    Py_XDECREF(cols);
    Py_XDECREF(index);
    Py_XDECREF(one);
    Py_XDECREF(zero);
    if (groups != NULL) {
        for (Py_ssize_t g = 0; g < ng; g++) {
            Py_XDECREF(groups[g].users);
            Py_XDECREF(groups[g].features);
        }
    }
    PyMem_Free(groups);
    PyMem_Free(uc);
    PyMem_Free(fc);
    return answer;
}

/* newest(flats) -> (full, partial) as sync/aggregate.py _newest_each, or None. */
static PyObject *newest(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *flats;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &flats)) {
        return NULL;
    }
    PyObject *full = _PyDict_NewPresized(PyList_GET_SIZE(flats));
    PyObject *partial = PySet_New(NULL), *answer = NULL;
    if (full == NULL || partial == NULL) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(flats);
    int ours = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(flats, i);
        PyObject *seq = value_at(v, 12);
        if (seq == NULL) {
            ours = 0;
            break;
        }
        if (PyUnicode_GET_LENGTH(seq) == 0) {
            continue;
        }
        int set = 0, all = 1;
        static const int COLUMNS[] = {7, 8, 9, 10, 11}; /* bal x a used per */
        for (int j = 0; j < 5; j++) {
            PyObject *c = value_at(v, COLUMNS[j]);
            if (c == NULL) {
                ours = 0;
                break;
            }
            if (PyUnicode_GET_LENGTH(c)) {
                set = 1;
            } else {
                all = 0;
            }
        }
        if (!ours) {
            break;
        }
        if (!set) {
            continue;
        }
        PyObject *org = value_at(v, 2), *bucket = value_at(v, 5);
        if (org == NULL || bucket == NULL) {
            ours = 0;
            break;
        }
        PyObject *key = PyTuple_Pack(2, org, bucket);
        if (key == NULL) {
            goto done;
        }
        if (!all) {
            int r = PySet_Add(partial, key);
            Py_DECREF(key);
            if (r < 0) {
                goto done;
            }
            continue;
        }
        long long s, cur_s;
        PyObject *cur = PyDict_GetItemWithError(full, key);
        if (cur == NULL && PyErr_Occurred()) {
            Py_DECREF(key);
            goto done;
        }
        if (!small_int(seq, &s) || (cur != NULL && !small_int(value_at(cur, 12), &cur_s))) {
            Py_DECREF(key);
            ours = 0;
            break;
        }
        int r = 0;
        if (cur == NULL || s > cur_s) {
            r = PyDict_SetItem(full, key, v);
        }
        Py_DECREF(key);
        if (r < 0) {
            goto done;
        }
    }
    if (ours) {
        answer = PyTuple_Pack(2, full, partial);
    } else {
        answer = Py_None;
        Py_INCREF(answer);
    }
done:
    Py_XDECREF(full);
    Py_XDECREF(partial);
    return answer;
}

/* org_order(flats) -> sync/records.py org_order_each's answer: the positions with each
   org's together (orgs in first-seen order, stream order within), True when they are
   together already (its None), or None when a flat is not ours (the Python form runs). */
static PyObject *org_order(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *flats;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &flats)) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(flats), groups = 0, runs = 0, prev = -1;
    PyObject *index = PyDict_New(), *answer = NULL;
    Py_ssize_t *group_of = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    Py_ssize_t *start = PyMem_Calloc((size_t)(n ? n : 1) + 1, sizeof(Py_ssize_t));
    if (index == NULL || group_of == NULL || start == NULL) {
        if (index != NULL) {
            PyErr_NoMemory();
        }
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *org = value_at(PyList_GET_ITEM(flats, i), 2);
        if (org == NULL) {
            answer = Py_None;
            Py_INCREF(answer);
            goto done;
        }
        Py_ssize_t g = cell_of(index, org, &groups);
        if (g < 0) {
            goto done;
        }
        group_of[i] = g;
        start[g + 1]++;
        if (g != prev) {
            runs++;
            prev = g;
        }
    }
    if (runs == groups) {
        answer = Py_True;
        Py_INCREF(answer);
        goto done;
    }
    for (Py_ssize_t g = 0; g < groups; g++) {
        start[g + 1] += start[g];
    }
    answer = PyList_New(n);
    if (answer == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *at = PyLong_FromSsize_t(i);
        if (at == NULL) {
            Py_CLEAR(answer);
            goto done;
        }
        PyList_SET_ITEM(answer, start[group_of[i]]++, at);
    }
done:
    Py_XDECREF(index);
    PyMem_Free(group_of);
    PyMem_Free(start);
    return answer;
}

static PyMethodDef methods[] = {
    {"org_order", org_order, METH_VARARGS,
     "org_order(flats): the positions with each org's together, True when they are already, "
     "or None (see sync/records.py org_order)."},
    {"decode_v2", decode_v2, METH_VARARGS,
     "decode_v2(entries, times, kinds, max_digits): a read of v2 entries as sync/batch.py "
     "decode_each decodes it, or None (see _entries.c)."},
    {"rollups", rollups, METH_VARARGS,
     "rollups(flats, days, request_kinds): sync/aggregate.py rollups' columns (as lists), or "
     "None when a value is not one this pass reads (the Python form then reduces)."},
    {"newest", newest, METH_VARARGS,
     "newest(flats): (full, partial) as sync/aggregate.py _newest_each answers, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sync._entries", "A read of v2 stream entries decoded in one pass.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__entries(void) { return PyModule_Create(&module); }
