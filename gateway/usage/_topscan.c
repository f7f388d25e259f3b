/* gateway.usage._topscan: one structural pass over a JSON answer that either vouches for
 * it and hands back its wanted top-level members, or says "don't know".
 *
 * scan(body: bytes, keys: tuple[bytes, ...]) -> bytes | None
 *
 * Returns None ("don't know") for anything outside a narrow happy path; the caller then
 * decodes the body the pure-Python way, whose verdict is authoritative. Otherwise the body
 * is a JSON document that json.loads decodes (to the same value) whose top level is an
 * object, and the answer is a small JSON object text made of the *last* occurrence of each
 * wanted key at the top level with its value's exact bytes: {"usage":{...},"model":"m"}.
 * Decoding that text gives the same values as decoding the whole body and picking the keys.
 *
 * Why a structural pass and not a search for "usage": a model-written object (a tool_use
 * input, JSON-mode content) can hold a key named "usage"; only nesting tells the real one.
 *
 * The happy path (anything else answers None):
 * - leading/trailing whitespace only space, tab, LF, CR; first byte of the document '{'
 *   (so no BOM, no UTF-16/32: json.loads's encoding detection then picks UTF-8);
 * - strings: strict UTF-8 (no overlong forms, no encoded surrogates, nothing past
 *   U+10FFFF), no control character below 0x20, escapes \" \\ \/ \b \f \n \r \t \uXXXX;
 * - a top-level key spelt with a backslash escape is refused (it could decode to "usage");
 * - numbers per RFC 8259; NaN/Infinity refused; integers of more than 640 digits refused
 *   (Python's int-from-string limit can be lowered to 640, past which json.loads raises);
 * - containers nested at most MAX_DEPTH levels (the top-level object is level 1);
 * - the body must be exactly `bytes`.
 *
 * Safety on hostile input: every read is bounded by the buffer's end, and nesting is tracked
 * with a fixed-size stack (no recursion on the C stack).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define MAX_DEPTH 254     /* gateway/usage/jsonload.py: _ORJSON_MAX_DEPTH */
#define MAX_INT_DIGITS 640 /* sys.set_int_max_str_digits' lowest allowed limit */
#define MAX_KEYS 16

typedef const unsigned char *ptr;

/* JSON's four whitespace bytes (RFC 8259): space, tab, LF, CR; nothing else. */
static const unsigned char WS[256] = {[' '] = 1, ['\t'] = 1, ['\n'] = 1, ['\r'] = 1};

static inline ptr skip_ws(ptr p, ptr end)
{
    while (p < end && WS[*p])
        p++;
    return p;
}

static inline int is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static inline int is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

/* The first byte from p on that needs a look in a string ('"', '\\', below 0x20 or from
 * 0x80 on), or end when none does: many plain ASCII bytes at a time, since most of an answer
 * is text. */
static inline ptr skip_plain(ptr p, ptr end)
{
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"'), slash = _mm_set1_epi8('\\');
    const __m128i space = _mm_set1_epi8(0x20);
    while (end - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
        /* Signed: below 0x20 is the control characters and every byte from 0x80 on. */
        __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, slash)),
                                   _mm_cmplt_epi8(x, space));
        int mask = _mm_movemask_epi8(hit);
        if (mask != 0)
            return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#elif defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint64_t ones = UINT64_C(0x0101010101010101), highs = UINT64_C(0x8080808080808080);
    while (end - p >= 8) {
        uint64_t x, quote, slash, t;
        memcpy(&x, p, 8);
        quote = x ^ (ones * '"');
        slash = x ^ (ones * '\\');
        /* A byte's high bit is set when it matched; the borrows only reach bytes above the
         * first match, so the lowest set bit is exact. */
        t = (((quote - ones) & ~quote) | ((slash - ones) & ~slash) | ((x - ones * 0x20) & ~x) | x) &
            highs;
        if (t != 0)
            return p + (__builtin_ctzll(t) >> 3);
        p += 8;
    }
#endif
    while (p < end && *p != '"' && *p != '\\' && *p >= 0x20 && *p < 0x80)
        p++;
    return p;
}

/* A string's body from just after its opening quote: the pointer just after its closing
 * quote, or NULL when it is not one json.loads decodes from strict UTF-8. Sets *escaped
 * when the string holds a backslash escape. */
static ptr scan_string(ptr p, ptr end, int *escaped)
{
    for (;;) {
        p = skip_plain(p, end);
        if (p >= end)
            return NULL;
        unsigned char c = *p;
        if (c == '"')
            return p + 1;
        if (c == '\\') {
            *escaped = 1;
            if (end - p < 2)
                return NULL;
            switch (p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                break;
            case 'u':
                if (end - p < 6 || !is_hex(p[2]) || !is_hex(p[3]) || !is_hex(p[4]) || !is_hex(p[5]))
                    return NULL;
                p += 6;
                break;
            default:
                return NULL;
            }
            continue;
        }
        if (c < 0x20)
            return NULL;
        if (c < 0x80) {
            p++;
            continue;
        }
        /* Strict UTF-8 (RFC 3629 table): no overlongs, no surrogates, at most U+10FFFF. */
        if (c >= 0xC2 && c <= 0xDF) {
            if (end - p < 2 || !is_cont(p[1]))
                return NULL;
            p += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (end - p < 3 || !is_cont(p[1]) || !is_cont(p[2]))
                return NULL;
            if (c == 0xE0 && p[1] < 0xA0)
                return NULL; /* overlong */
            if (c == 0xED && p[1] > 0x9F)
                return NULL; /* U+D800-DFFF */
            p += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (end - p < 4 || !is_cont(p[1]) || !is_cont(p[2]) || !is_cont(p[3]))
                return NULL;
            if (c == 0xF0 && p[1] < 0x90)
                return NULL; /* overlong */
            if (c == 0xF4 && p[1] > 0x8F)
                return NULL; /* past U+10FFFF */
            p += 4;
        } else {
            return NULL;
        }
    }
}

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* A number per RFC 8259 from its first byte: the pointer after it, or NULL. */
static ptr scan_number(ptr p, ptr end)
{
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return NULL;
    ptr digits = p;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && is_digit(*p))
            p++;
    } else {
        return NULL;
    }
    int integer = 1;
    if (p < end && *p == '.') {
        integer = 0;
        p++;
        if (p >= end || !is_digit(*p))
            return NULL;
        while (p < end && is_digit(*p))
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        integer = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || !is_digit(*p))
            return NULL;
        while (p < end && is_digit(*p))
            p++;
    }
    if (integer && p - digits > MAX_INT_DIGITS)
        return NULL;
    return p;
}

static inline ptr scan_literal(ptr p, ptr end, const char *word, Py_ssize_t n)
{
    if (end - p < n || memcmp(p, word, (size_t)n) != 0)
        return NULL;
    return p + n;
}

/* One value from its first (non-whitespace) byte, nested inside `depth` containers: the
 * pointer just after it, or NULL. Iterative: a fixed stack of open containers. */
static ptr scan_value(ptr p, ptr end, int depth)
{
    unsigned char stack[MAX_DEPTH + 1];
    int top = 0;
    int escaped = 0;

value:
    p = skip_ws(p, end);
    if (p >= end)
        return NULL;
    switch (*p) {
    case '{':
        if (depth + top + 1 > MAX_DEPTH)
            return NULL;
        stack[top++] = '}';
        p = skip_ws(p + 1, end);
        if (p < end && *p == '}') {
            p++;
            top--;
            goto after;
        }
        goto key;
    case '[':
        if (depth + top + 1 > MAX_DEPTH)
            return NULL;
        stack[top++] = ']';
        p = skip_ws(p + 1, end);
        if (p < end && *p == ']') {
            p++;
            top--;
            goto after;
        }
        goto value;
    case '"':
        p = scan_string(p + 1, end, &escaped);
        break;
    case 't':
        p = scan_literal(p, end, "true", 4);
        break;
    case 'f':
        p = scan_literal(p, end, "false", 5);
        break;
    case 'n':
        p = scan_literal(p, end, "null", 4);
        break;
    default:
        p = scan_number(p, end);
        break;
    }
    if (p == NULL)
        return NULL;

after:
    if (top == 0)
        return p;
    p = skip_ws(p, end);
    if (p >= end)
        return NULL;
    if (*p == ',') {
        p++;
        if (stack[top - 1] == ']')
            goto value;
        goto key;
    }
    if (*p == stack[top - 1]) {
        p++;
        top--;
        goto after;
    }
    return NULL;

key:
    p = skip_ws(p, end);
    if (p >= end || *p != '"')
        return NULL;
    p = scan_string(p + 1, end, &escaped);
    if (p == NULL)
        return NULL;
    p = skip_ws(p, end);
    if (p >= end || *p != ':')
        return NULL;
    p++;
    goto value;
}

typedef struct {
    const char *text;
    Py_ssize_t len;
} wanted_key;

static PyObject *topscan_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "scan(body, keys) takes two arguments");
        return NULL;
    }
    PyObject *body = args[0], *keys = args[1];
    if (!PyTuple_CheckExact(keys) || PyTuple_GET_SIZE(keys) > MAX_KEYS) {
        PyErr_SetString(PyExc_TypeError, "keys must be a tuple of at most 16 bytes");
        return NULL;
    }
    Py_ssize_t nkeys = PyTuple_GET_SIZE(keys);
    wanted_key wanted[MAX_KEYS];
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        PyObject *k = PyTuple_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(k)) {
            PyErr_SetString(PyExc_TypeError, "keys must be a tuple of at most 16 bytes");
            return NULL;
        }
        wanted[i].text = PyBytes_AS_STRING(k);
        wanted[i].len = PyBytes_GET_SIZE(k);
    }
    if (!PyBytes_CheckExact(body))
        Py_RETURN_NONE;

    ptr start = (ptr)PyBytes_AS_STRING(body);
    ptr end = start + PyBytes_GET_SIZE(body);
    ptr found_at[MAX_KEYS], found_end[MAX_KEYS];
    for (Py_ssize_t i = 0; i < nkeys; i++)
        found_at[i] = NULL, found_end[i] = NULL;

    ptr p = skip_ws(start, end);
    if (p >= end || *p != '{')
        Py_RETURN_NONE; /* arrays, scalars, BOMs, UTF-16/32, empty: the Python path */
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        p++;
    } else {
        for (;;) {
            if (p >= end || *p != '"')
                Py_RETURN_NONE;
            int escaped = 0;
            ptr key = p + 1;
            p = scan_string(key, end, &escaped);
            if (p == NULL || escaped)
                Py_RETURN_NONE;
            Py_ssize_t klen = (p - 1) - key;
            Py_ssize_t which = -1;
            for (Py_ssize_t i = 0; i < nkeys; i++) {
                if (wanted[i].len == klen && memcmp(wanted[i].text, key, (size_t)klen) == 0) {
                    which = i;
                    break;
                }
            }
            p = skip_ws(p, end);
            if (p >= end || *p != ':')
                Py_RETURN_NONE;
            ptr value = skip_ws(p + 1, end);
            p = scan_value(value, end, 1);
            if (p == NULL)
                Py_RETURN_NONE;
            if (which >= 0) { /* the last occurrence wins, as in json.loads */
                found_at[which] = value;
                found_end[which] = p;
            }
            p = skip_ws(p, end);
            if (p >= end)
                Py_RETURN_NONE;
            if (*p == '}') {
                p++;
                break;
            }
            if (*p != ',')
                Py_RETURN_NONE;
            p = skip_ws(p + 1, end);
        }
    }
    if (skip_ws(p, end) != end)
        Py_RETURN_NONE; /* extra data */

    /* {"k":v,...} of the members found: "k": and the value, commas between. */
    Py_ssize_t size = 2, members = 0;
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        if (found_at[i] != NULL) {
            size += wanted[i].len + 3 + (found_end[i] - found_at[i]);
            members++;
        }
    }
    if (members > 1)
        size += members - 1;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    *o++ = '{';
    int first = 1;
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        if (found_at[i] == NULL)
            continue;
        if (!first)
            *o++ = ',';
        first = 0;
        *o++ = '"';
        memcpy(o, wanted[i].text, (size_t)wanted[i].len);
        o += wanted[i].len;
        *o++ = '"';
        *o++ = ':';
        memcpy(o, found_at[i], (size_t)(found_end[i] - found_at[i]));
        o += found_end[i] - found_at[i];
    }
    *o = '}';
    return out;
}

static PyMethodDef topscan_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))topscan_scan, METH_FASTCALL,
     "scan(body, keys) -> bytes | None: the wanted top-level members of a JSON object body "
     "as a small JSON object text, or None when the body is outside the checked happy path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef topscan_module = {
    PyModuleDef_HEAD_INIT, "_topscan",
    "A compiled structural pass over JSON answers (see gateway/usage/topscan.py).", -1,
    topscan_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__topscan(void) { return PyModule_Create(&topscan_module); }
