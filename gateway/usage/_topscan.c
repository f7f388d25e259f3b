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
    if (p < end && *p > ' ')
        return p; /* the usual: no whitespace here at all */
    if (p >= end || !WS[*p])
        return p;
    p++;
    if (p < end && *p > ' ')
        return p; /* one space: compact JSON's ": " and ", " */
#if defined(__SSE2__)
    /* A pretty-printed answer's line break and indentation: 16 bytes at a time. */
    const __m128i space = _mm_set1_epi8(' '), lf = _mm_set1_epi8('\n');
    const __m128i tab = _mm_set1_epi8('\t'), cr = _mm_set1_epi8('\r');
    while (end - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
        __m128i ws = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, space), _mm_cmpeq_epi8(x, lf)),
                                  _mm_or_si128(_mm_cmpeq_epi8(x, tab), _mm_cmpeq_epi8(x, cr)));
        unsigned mask = ~(unsigned)_mm_movemask_epi8(ws) & 0xFFFFu;
        if (mask != 0)
            return p + __builtin_ctz(mask);
        p += 16;
    }
#endif
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

/* The top-level pass shared by scan() and usage(): 1 when the body is on the happy path
 * (then found_at/found_end hold the last occurrence of each wanted key's value, NULL when
 * absent), 0 when it is not. */
static int scan_top(ptr start, ptr end, const wanted_key *wanted, Py_ssize_t nkeys,
                    ptr *found_at, ptr *found_end)
{
    for (Py_ssize_t i = 0; i < nkeys; i++)
        found_at[i] = NULL, found_end[i] = NULL;
    ptr p = skip_ws(start, end);
    if (p >= end || *p != '{')
        return 0; /* arrays, scalars, BOMs, UTF-16/32, empty: the Python path */
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        p++;
    } else {
        for (;;) {
            if (p >= end || *p != '"')
                return 0;
            int escaped = 0;
            ptr key = p + 1;
            p = scan_string(key, end, &escaped);
            if (p == NULL || escaped)
                return 0;
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
                return 0;
            ptr value = skip_ws(p + 1, end);
            p = scan_value(value, end, 1);
            if (p == NULL)
                return 0;
            if (which >= 0) { /* the last occurrence wins, as in json.loads */
                found_at[which] = value;
                found_end[which] = p;
            }
            p = skip_ws(p, end);
            if (p >= end)
                return 0;
            if (*p == '}') {
                p++;
                break;
            }
            if (*p != ',')
                return 0;
            p = skip_ws(p + 1, end);
        }
    }
    return skip_ws(p, end) == end; /* nothing after the object */
}

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
    if (!scan_top(start, end, wanted, nkeys, found_at, found_end))
        Py_RETURN_NONE;

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

/* ---- usage(): the counts themselves, for the known shapes ------------------------------
 *
 * usage(body, mode) -> (provider, model, input, cached, output, reasoning) | None
 *
 * mode: 0 auto, 1 openai, 2 anthropic, 3 gemini (gateway/usage/responses.py: MODE_CODES).
 * The tuple is exactly what gateway/usage/responses.py's usage_from_json reads from the
 * body (a Usage's provider, model and four counts), for the happy path only: the scan
 * above vouches for the whole body, the provider is told by the same rules (auto: by
 * usageMetadata, "type": "message" or a known "object"; any other body: None), and the
 * usage object holds only plain counts (digits, at most MAX_TOKENS), null, and for OpenAI
 * detail objects of the same. Anything else answers None ("don't know"): a usage that is
 * missing, null or not believable, a count written as 1.0 or -1, a key spelt with an
 * escape, a model name with an escape, a non-ASCII byte or DEL. The caller then reads the
 * body the general way, whose verdict stands. The compiled answer builds no dict and
 * decodes no JSON into Python objects: one tuple, four ints and (cached) the model. */

#define MAX_TOKENS 1000000000000LL /* gateway/usage/model.py: MAX_TOKENS */
#define MAX_MODEL_LENGTH 256        /* gateway/usage/model.py: MAX_MODEL_LENGTH */
#define ABSENT (-1LL)               /* a count absent or null */
#define UNKNOWN (-2LL)              /* a value that is not a plain count: don't know */

enum { TOP_USAGE, TOP_META, TOP_MODEL_VERSION, TOP_MODEL, TOP_TYPE, TOP_OBJECT, TOP_KEYS };
static const wanted_key TOP[TOP_KEYS] = {
    {"usage", 5}, {"usageMetadata", 13}, {"modelVersion", 12}, {"model", 5},
    {"type", 4},  {"object", 6},
};

static PyObject *PROVIDER_NAMES[4]; /* NULL, "openai", "anthropic", "gemini" */

/* A count's value bytes [p, e): the count, ABSENT for null, UNKNOWN for anything else. */
static long long count_of(ptr p, ptr e)
{
    if (e - p == 4 && memcmp(p, "null", 4) == 0)
        return ABSENT;
    if (p >= e || e - p > 13)
        return UNKNOWN;
    if (*p == '0' && e - p > 1)
        return UNKNOWN; /* cannot happen in vouched JSON; kept for safety */
    long long n = 0;
    for (; p < e; p++) {
        if (!is_digit(*p))
            return UNKNOWN; /* a minus, a fraction, an exponent, a string, ... */
        n = n * 10 + (*p - '0');
    }
    return n <= MAX_TOKENS ? n : UNKNOWN;
}

/* The object starting at p ('{'), nested inside `depth` containers, checked as
 * scan_value checks it: the pointer just after it, or NULL (not on the happy path, or a
 * key spelt with an escape: it could be one of the names). On the way, the last value of
 * each of `names` among its members (at/to: NULL when absent). */
static ptr members_of(ptr p, ptr e, int depth, const wanted_key *names, int n, ptr *at, ptr *to,
                      const wanted_key *inner, ptr *in_at, ptr *in_to);

/* The object starting at p, as members_of reads it, without inner picks. */
static inline ptr object_members(ptr p, ptr e, int depth, const wanted_key *names, int n, ptr *at,
                                 ptr *to)
{
    return members_of(p, e, depth, names, n, at, to, NULL, NULL, NULL);
}

/* ... With `inner` (one name per entry of names, or a zero length: none): a member that is
 * an object is read by members_of too (checked once, not twice), and the last value of its
 * inner name goes to in_at[i]/in_to[i] (NULL when absent; untouched when the member is not
 * an object). */
static ptr members_of(ptr p, ptr e, int depth, const wanted_key *names, int n, ptr *at, ptr *to,
                      const wanted_key *inner, ptr *in_at, ptr *in_to)
{
    for (int i = 0; i < n; i++)
        at[i] = NULL, to[i] = NULL;
    if (depth + 1 > MAX_DEPTH)
        return NULL;
    p = skip_ws(p + 1, e); /* after '{' */
    if (p < e && *p == '}')
        return p + 1;
    for (;;) {
        if (p >= e || *p != '"')
            return NULL;
        int escaped = 0;
        ptr key = p + 1;
        p = scan_string(key, e, &escaped);
        if (p == NULL || escaped)
            return NULL;
        Py_ssize_t klen = (p - 1) - key;
        p = skip_ws(p, e);
        if (p >= e || *p != ':')
            return NULL;
        ptr value = skip_ws(p + 1, e);
        int which = -1;
        for (int i = 0; i < n; i++) {
            if (names[i].len == klen && memcmp(names[i].text, key, (size_t)klen) == 0) {
                which = i;
                break;
            }
        }
        if (which >= 0 && inner != NULL && inner[which].len > 0 && value < e && *value == '{')
            p = object_members(value, e, depth + 1, &inner[which], 1, &in_at[which],
                               &in_to[which]);
        else
            p = scan_value(value, e, depth + 1);
        if (p == NULL)
            return NULL;
        if (which >= 0) {
            at[which] = value;
            to[which] = p;
        }
        p = skip_ws(p, e);
        if (p >= e)
            return NULL;
        if (*p == '}')
            return p + 1;
        if (*p != ',')
            return NULL;
        p = skip_ws(p + 1, e);
    }
}

/* The count under names[i] (found by members_of), ABSENT when the key is not there. */
static inline long long member_count(ptr *at, ptr *to, int i)
{
    return at[i] == NULL ? ABSENT : count_of(at[i], to[i]);
}

/* An OpenAI detail object's one count (cached_tokens, reasoning_tokens), the detail's value
 * being [p, e) and its count's (read with it, members_of's inner pick) [c, ce): 0 when the
 * detail or the count is absent or null, UNKNOWN when the detail is not an object or null. */
static long long detail_count(ptr p, ptr e, ptr c, ptr ce)
{
    if (p == NULL || (e - p == 4 && memcmp(p, "null", 4) == 0))
        return 0;
    if (*p != '{')
        return UNKNOWN;
    long long n = c == NULL ? ABSENT : count_of(c, ce);
    return n == ABSENT ? 0 : n;
}

/* A small cache of model names: the same few names come back on every answer, and the
 * same str object keeps its hash for the price table's lookups. */
#define MODEL_CACHE 8
static PyObject *model_cache[MODEL_CACHE];
static unsigned model_next;

/* The model of [p, e) as usage_from_json reads it: a new reference to the name, Py_None
 * (not a plausible name, or absent: p NULL), or NULL with *unknown set (don't know: an
 * escape, a non-ASCII byte or DEL, which only the Python reading decides). */
static PyObject *model_of(ptr p, ptr e, int *unknown)
{
    if (p == NULL || *p != '"')
        Py_RETURN_NONE; /* absent, or not a string: no model */
    p++, e--;           /* the bytes between the quotes */
    Py_ssize_t n = e - p;
    for (ptr q = p; q < e; q++) {
        if (*q == '\\' || *q >= 0x7F) {
            *unknown = 1;
            return NULL;
        }
    }
    if (n == 0 || n > MAX_MODEL_LENGTH)
        Py_RETURN_NONE; /* clean_model: empty or too long is no model */
    for (unsigned i = 0; i < MODEL_CACHE; i++) {
        PyObject *m = model_cache[i];
        if (m != NULL && PyUnicode_GET_LENGTH(m) == n &&
            memcmp(PyUnicode_DATA(m), p, (size_t)n) == 0) {
            Py_INCREF(m);
            return m;
        }
    }
    PyObject *m = PyUnicode_DecodeASCII((const char *)p, n, NULL);
    if (m == NULL)
        return NULL;
    unsigned slot = model_next++ % MODEL_CACHE;
    PyObject *old = model_cache[slot];
    Py_INCREF(m);
    model_cache[slot] = m;
    Py_XDECREF(old);
    return m;
}

static int string_is(ptr p, ptr e, const char *text, Py_ssize_t n)
{
    return p != NULL && e - p == n + 2 && *p == '"' && memcmp(p + 1, text, (size_t)n) == 0;
}

static int string_escaped(ptr p, ptr e)
{
    return p != NULL && *p == '"' && memchr(p, '\\', (size_t)(e - p)) != NULL;
}

enum { OPENAI = 1, ANTHROPIC = 2, GEMINI = 3 };

/* The usage object's members read, for either provider: OpenAI's (Chat Completions, then
 * the Responses API's), then Anthropic's two cache counts (its input_tokens and
 * output_tokens are U_INPUT and U_OUTPUT). */
enum {
    U_PROMPT, U_COMPLETION, U_PROMPT_DETAILS, U_COMPLETION_DETAILS,
    U_INPUT, U_OUTPUT, U_INPUT_DETAILS, U_OUTPUT_DETAILS,
    U_CACHE_CREATION, U_CACHE_READ, U_KEYS
};
static const wanted_key USAGE_KEYS[U_KEYS] = {
    {"prompt_tokens", 13},        {"completion_tokens", 17},
    {"prompt_tokens_details", 21}, {"completion_tokens_details", 25},
    {"input_tokens", 12},         {"output_tokens", 13},
    {"input_tokens_details", 20},  {"output_tokens_details", 21},
    {"cache_creation_input_tokens", 27}, {"cache_read_input_tokens", 23},
};
/* The one count read in each detail object (a zero length: not a detail). */
static const wanted_key USAGE_INNER[U_KEYS] = {
    [U_PROMPT_DETAILS] = {"cached_tokens", 13},
    [U_COMPLETION_DETAILS] = {"reasoning_tokens", 16},
    [U_INPUT_DETAILS] = {"cached_tokens", 13},
    [U_OUTPUT_DETAILS] = {"reasoning_tokens", 16},
};
static const wanted_key GEMINI_KEYS[5] = {
    {"promptTokenCount", 16},        {"cachedContentTokenCount", 23},
    {"toolUsePromptTokenCount", 23}, {"candidatesTokenCount", 20},
    {"thoughtsTokenCount", 18},
};

/* scan_top for TOP, except that the values of "usage" and "usageMetadata" that are objects
 * are checked by members_of, which also picks their members: USAGE_KEYS of the last
 * "usage" object, GEMINI_KEYS of the last "usageMetadata" object. A later
 * occurrence that is not an object leaves the earlier members in place, but at[] then
 * points at it (the caller reads members only when at[] is an object). */
static int scan_top_usage(ptr start, ptr end, ptr *at, ptr *to, ptr *u_at, ptr *u_to,
                          ptr *d_at, ptr *d_to, ptr *meta_at, ptr *meta_to)
{
    for (int i = 0; i < U_KEYS; i++)
        d_at[i] = NULL, d_to[i] = NULL;
    for (int i = 0; i < TOP_KEYS; i++)
        at[i] = NULL, to[i] = NULL;
    for (int i = 0; i < U_KEYS; i++)
        u_at[i] = NULL, u_to[i] = NULL;
    for (int i = 0; i < 5; i++)
        meta_at[i] = NULL, meta_to[i] = NULL;
    ptr p = skip_ws(start, end);
    if (p >= end || *p != '{')
        return 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        p++;
    } else {
        for (;;) {
            if (p >= end || *p != '"')
                return 0;
            int escaped = 0;
            ptr key = p + 1;
            p = scan_string(key, end, &escaped);
            if (p == NULL || escaped)
                return 0;
            Py_ssize_t klen = (p - 1) - key;
            int which = -1;
            for (int i = 0; i < TOP_KEYS; i++) {
                if (TOP[i].len == klen && memcmp(TOP[i].text, key, (size_t)klen) == 0) {
                    which = i;
                    break;
                }
            }
            p = skip_ws(p, end);
            if (p >= end || *p != ':')
                return 0;
            ptr value = skip_ws(p + 1, end);
            if (which == TOP_USAGE && value < end && *value == '{')
                p = members_of(value, end, 1, USAGE_KEYS, U_KEYS, u_at, u_to, USAGE_INNER, d_at,
                               d_to);
            else if (which == TOP_META && value < end && *value == '{')
                p = object_members(value, end, 1, GEMINI_KEYS, 5, meta_at, meta_to);
            else
                p = scan_value(value, end, 1);
            if (p == NULL)
                return 0;
            if (which >= 0) { /* the last occurrence wins, as in json.loads */
                at[which] = value;
                to[which] = p;
            }
            p = skip_ws(p, end);
            if (p >= end)
                return 0;
            if (*p == '}') {
                p++;
                break;
            }
            if (*p != ',')
                return 0;
            p = skip_ws(p + 1, end);
        }
    }
    return skip_ws(p, end) == end; /* nothing after the object */
}

/* The usage of a JSON answer of a known shape, as usage() answers it: 1 with *kind set (the
 * provider), *model a new reference (a str or Py_None) and out[] = input, cached, output,
 * reasoning; 0 for "don't know"; -1 with an exception set. */
static int read_usage(PyObject *body, int kind, int *kind_out, PyObject **model_out,
                      long long *out)
{
    if (!PyBytes_CheckExact(body))
        return 0;
    ptr start = (ptr)PyBytes_AS_STRING(body);
    ptr end = start + PyBytes_GET_SIZE(body);
    ptr at[TOP_KEYS], to[TOP_KEYS];
    /* The members of both usage objects, read in the top-level pass itself (each object
     * checked once: by members_of instead of scan_value); the last occurrence wins. */
    ptr m[U_KEYS], me[U_KEYS], d[U_KEYS], de[U_KEYS], meta_at[5], meta_to[5];
    if (!scan_top_usage(start, end, at, to, m, me, d, de, meta_at, meta_to))
        return 0;

    if (kind == 0) { /* responses.detect_provider, for the shapes it tells at once */
        if (at[TOP_META] != NULL) {
            kind = GEMINI;
        } else if (string_is(at[TOP_TYPE], to[TOP_TYPE], "message", 7)) {
            kind = ANTHROPIC;
        } else if (string_escaped(at[TOP_TYPE], to[TOP_TYPE])) {
            return 0; /* could decode to "message" */
        } else if (string_is(at[TOP_OBJECT], to[TOP_OBJECT], "chat.completion", 15) ||
                   string_is(at[TOP_OBJECT], to[TOP_OBJECT], "text_completion", 15) ||
                   string_is(at[TOP_OBJECT], to[TOP_OBJECT], "response", 8)) {
            kind = OPENAI;
        } else {
            return 0; /* told by the usage's keys, or by nothing: the Python reading */
        }
    }
    int member = kind == GEMINI ? TOP_META : TOP_USAGE;
    int named = kind == GEMINI ? TOP_MODEL_VERSION : TOP_MODEL;
    ptr u = at[member];
    if (u == NULL || *u != '{')
        return 0; /* missing, null or not an object: the Python reading says so */

    long long input, cached, output, reasoning;
    if (kind == OPENAI) {
        long long prompt = member_count(m, me, U_PROMPT);
        long long completion = member_count(m, me, U_COMPLETION);
        int details = U_PROMPT_DETAILS;
        if (prompt == ABSENT && completion == ABSENT) { /* the Responses API's names */
            prompt = member_count(m, me, U_INPUT);
            completion = member_count(m, me, U_OUTPUT);
            details = U_INPUT_DETAILS;
            if (prompt == ABSENT && completion == ABSENT)
                return 0; /* no count: missing */
        }
        if (prompt == UNKNOWN || completion == UNKNOWN)
            return 0;
        cached = detail_count(m[details], me[details], d[details], de[details]);
        reasoning = detail_count(m[details + 1], me[details + 1], d[details + 1], de[details + 1]);
        if (cached == UNKNOWN || reasoning == UNKNOWN)
            return 0;
        if (prompt == ABSENT)
            prompt = 0;
        if (completion == ABSENT)
            completion = 0;
        if (cached > prompt || reasoning > completion)
            return 0; /* a part larger than its whole: not believable */
        input = prompt - cached;
        output = completion - reasoning;
    } else if (kind == ANTHROPIC) {
        static const int names[4] = {U_INPUT, U_CACHE_CREATION, U_CACHE_READ, U_OUTPUT};
        long long c[4];
        int any = 0;
        for (int i = 0; i < 4; i++) {
            c[i] = member_count(m, me, names[i]);
            if (c[i] == UNKNOWN)
                return 0;
            if (c[i] == ABSENT)
                c[i] = 0;
            else
                any = 1;
        }
        if (!any)
            return 0;
        input = c[0] + c[1];
        cached = c[2];
        output = c[3];
        reasoning = 0;
    } else {
        long long c[5];
        int any = 0;
        for (int i = 0; i < 5; i++) {
            c[i] = member_count(meta_at, meta_to, i);
            if (c[i] == UNKNOWN)
                return 0;
            if (c[i] == ABSENT)
                c[i] = 0;
            else
                any = 1;
        }
        if (!any || c[1] > c[0])
            return 0;
        input = c[0] - c[1] + c[2];
        cached = c[1];
        output = c[3];
        reasoning = c[4];
    }
    if (input > MAX_TOKENS)
        return 0; /* a sum of believable parts that is not: the Python reading */

    int unknown = 0;
    PyObject *model = model_of(at[named], to[named], &unknown);
    if (model == NULL)
        return unknown ? 0 : -1;
    *kind_out = kind;
    *model_out = model;
    out[0] = input, out[1] = cached, out[2] = output, out[3] = reasoning;
    return 1;
}

static PyObject *topscan_usage(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyLong_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "usage(body, mode) takes bytes and an int");
        return NULL;
    }
    long mode = PyLong_AsLong(args[1]);
    if (mode < 0 || mode > 3) {
        PyErr_SetString(PyExc_ValueError, "mode must be 0 (auto) to 3 (gemini)");
        return NULL;
    }
    int kind;
    PyObject *model;
    long long counts[4];
    int read = read_usage(args[0], (int)mode, &kind, &model, counts);
    if (read <= 0) {
        if (read < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_New(6);
    if (out == NULL) {
        Py_DECREF(model);
        return NULL;
    }
    Py_INCREF(PROVIDER_NAMES[kind]);
    PyTuple_SET_ITEM(out, 0, PROVIDER_NAMES[kind]);
    PyTuple_SET_ITEM(out, 1, model);
    for (int i = 0; i < 4; i++) {
        PyObject *n = PyLong_FromLongLong(counts[i]);
        if (n == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, 2 + i, n);
    }
    return out;
}

/* The decimal digits of n >= 0 written at p; the end. */
static char *put_count(char *p, long long n)
{
    char digits[24];
    int k = 0;
    do {
        digits[k++] = (char)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    while (k > 0)
        *p++ = digits[--k];
    return p;
}

static PyObject *count_bytes(long long n)
{
    char text[24];
    return PyBytes_FromStringAndSize(text, put_count(text, n) - text);
}

/* A price's term as charge() computes with it, when it is an int in [0, 2**62): else -1
 * (the caller answers "don't know"; the Python form computes it exactly). */
static long long term_of(PyObject *t)
{
    if (!PyLong_Check(t))
        return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(t, &overflow);
    if (overflow || v < 0 || v >= (1LL << 62)) {
        PyErr_Clear();
        return -1;
    }
    return v;
}

/* Whether an answer's headers `head` (a list of (name, value) pairs of bytes) are surely a
 * plain JSON answer's as the usage tap tells it (usage_tap.py ResponseTap.answer): the last
 * Content-Encoding absent, "" or "identity", the last Content-Type not an event stream.
 * 0 for anything else, including what the tap's own test would still call plain (" Identity"). */
static int plain_answer(PyObject *head)
{
    if (!PyList_CheckExact(head))
        return 0;
    PyObject *encoding = NULL, *kind = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(head); i++) {
        PyObject *h = PyList_GET_ITEM(head, i);
        if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 2)
            return 0;
        PyObject *name = PyTuple_GET_ITEM(h, 0), *value = PyTuple_GET_ITEM(h, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value))
            return 0;
        Py_ssize_t n = PyBytes_GET_SIZE(name);
        const char *text = PyBytes_AS_STRING(name);
        if (n == 12 && memcmp(text, "content-type", 12) == 0)
            kind = value;
        else if (n == 16 && memcmp(text, "content-encoding", 16) == 0)
            encoding = value;
    }
    if (encoding != NULL) {
        Py_ssize_t n = PyBytes_GET_SIZE(encoding);
        if (n != 0 && !(n == 8 && memcmp(PyBytes_AS_STRING(encoding), "identity", 8) == 0))
            return 0;
    }
    if (kind != NULL && PyBytes_GET_SIZE(kind) >= 17) {
        const char *k = PyBytes_AS_STRING(kind);
        static const char stream[] = "text/event-stream";
        int same = 1;
        for (int i = 0; i < 17 && same; i++) {
            char c = k[i];
            if (c >= 'A' && c <= 'Z')
                c = (char)(c - 'A' + 'a');
            same = c == stream[i];
        }
        if (same)
            return 0;
    }
    return 1;
}

/* priced(body, mode, memo, terms_for, maximum, left, head): usage(body, mode) priced and told
 * (gateway/metering/usage_tap.py priced_counts is the Python form, with the same answers):
 * (tokens, (settle value,), X-Tokens-Cost value, X-Tokens-Remaining value or None,
 *  provider, model, input, cached, output, reasoning), or None ("don't know"); with `head`
 * (not None), False when those are not surely a plain JSON answer's (plain_answer). */
static PyObject *topscan_priced(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7 || !PyLong_CheckExact(args[1]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "priced(body, mode, memo, terms_for, maximum, left, head) takes bytes, an "
                        "int, a dict, a callable, two ints or None and a list or None");
        return NULL;
    }
    long mode = PyLong_AsLong(args[1]);
    if (mode < 0 || mode > 3) {
        PyErr_SetString(PyExc_ValueError, "mode must be 0 (auto) to 3 (gemini)");
        return NULL;
    }
    /* First: None says the headers are a plain answer's (the body or a price is not known). */
    if (args[6] != Py_None && !plain_answer(args[6]))
        Py_RETURN_FALSE;
#if defined(__SIZEOF_INT128__)
    long long maximum = -1, left = -1;
    int overflow = 0;
    if (args[4] != Py_None) {
        maximum = PyLong_Check(args[4]) ? PyLong_AsLongLongAndOverflow(args[4], &overflow) : -1;
        if (maximum < 0 || overflow) {
            PyErr_Clear();
            Py_RETURN_NONE; /* not a plain cap: the Python form */
        }
    }
    if (args[5] != Py_None) {
        left = PyLong_Check(args[5]) ? PyLong_AsLongLongAndOverflow(args[5], &overflow) : -1;
        if (overflow || (left == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
    }
    int kind;
    PyObject *model;
    long long c[4];
    int read = read_usage(args[0], (int)mode, &kind, &model, c);
    if (read <= 0) {
        if (read < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    /* PriceTable.cost_of: the terms remembered per model, else terms_for() finds them. */
    PyObject *terms = model == Py_None ? NULL : PyDict_GetItemWithError(args[2], model);
    if (terms != NULL) {
        Py_INCREF(terms);
    } else {
        if (PyErr_Occurred()) {
            Py_DECREF(model);
            return NULL;
        }
        terms = PyObject_CallOneArg(args[3], model);
        if (terms == NULL) {
            Py_DECREF(model);
            return NULL;
        }
    }
    long long t[4] = {-1, -1, -1, -1};
    if (PyTuple_CheckExact(terms) && PyTuple_GET_SIZE(terms) == 4) {
        for (int i = 0; i < 4; i++)
            t[i] = term_of(PyTuple_GET_ITEM(terms, i));
    }
    Py_DECREF(terms);
    if (t[0] < 0 || t[1] < 0 || t[2] < 0 || t[3] <= 0) {
        Py_DECREF(model);
        Py_RETURN_NONE;
    }
    /* charge(): ceil((input x i + cached x c + (output + reasoning) x o) / scale), capped.
     * Counts are at most 10**12 (2**40) each and terms below 2**62: no overflow in 128 bits. */
    unsigned __int128 numerator = (unsigned __int128)c[0] * (unsigned long long)t[0] +
                                  (unsigned __int128)c[1] * (unsigned long long)t[1] +
                                  (unsigned __int128)(c[2] + c[3]) * (unsigned long long)t[2];
    unsigned __int128 cost = (numerator + (unsigned long long)t[3] - 1) / (unsigned long long)t[3];
    if (maximum >= 0 && cost > (unsigned __int128)maximum)
        cost = (unsigned __int128)maximum;
    if (cost > (unsigned __int128)MAX_TOKENS * 1000000) {
        Py_DECREF(model);
        Py_RETURN_NONE; /* past any believable charge: the Python form says it exactly */
    }
    long long tokens = (long long)cost;

    /* counts_value (gateway/metering/settlement.py): "<tokens> usage  <input> <cached>
     * <output> <reasoning> <model>" (the model empty when there is none). */
    char text[6 * 24 + 16 + MAX_MODEL_LENGTH];
    char *p = put_count(text, tokens);
    memcpy(p, " usage  ", 8);
    p += 8;
    for (int i = 0; i < 4; i++) {
        p = put_count(p, c[i]);
        *p++ = ' ';
    }
    if (model != Py_None) { /* ASCII, at most MAX_MODEL_LENGTH (model_of) */
        Py_ssize_t n = PyUnicode_GET_LENGTH(model);
        memcpy(p, PyUnicode_DATA(model), (size_t)n);
        p += n;
    }
    PyObject *out = PyTuple_New(10);
    PyObject *value = PyUnicode_New(p - text, 127);
    if (out == NULL || value == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(value);
        Py_DECREF(model);
        return NULL;
    }
    memcpy(PyUnicode_DATA(value), text, (size_t)(p - text));
    PyTuple_SET_ITEM(out, 5, model);
    Py_INCREF(PROVIDER_NAMES[kind]);
    PyTuple_SET_ITEM(out, 4, PROVIDER_NAMES[kind]);
    PyObject *quiet = PyTuple_New(1);
    if (quiet == NULL) {
        Py_DECREF(value);
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(quiet, 0, value);
    PyTuple_SET_ITEM(out, 1, quiet);
    PyObject *item = PyLong_FromLongLong(tokens);
    if (item == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 0, item);
    if ((item = count_bytes(tokens)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 2, item);
    if (left == -1 && args[5] == Py_None) {
        Py_INCREF(Py_None);
        item = Py_None;
    } else {
        /* actual_headers: what is left once the difference is refunded or taken, >= 0. */
        item = left > tokens ? count_bytes(left - tokens) : PyBytes_FromStringAndSize("0", 1);
        if (item == NULL)
            goto fail;
    }
    PyTuple_SET_ITEM(out, 3, item);
    for (int i = 0; i < 4; i++) {
        if ((item = PyLong_FromLongLong(c[i])) == NULL)
            goto fail;
        PyTuple_SET_ITEM(out, 6 + i, item);
    }
    return out;
fail:
    Py_DECREF(out); /* its unset items are NULL, which a tuple's dealloc skips */
    return NULL;
#else
    (void)mode;
    Py_RETURN_NONE; /* no 128-bit integers here: the Python form prices every answer */
#endif
}

/* Whether the n bytes at s hold the 8 bytes "stream" in quotes: bytes.find(b'"stream"') >= 0,
 * the request side's test before any decode (usage_tap.py stream_usage_asked). The needle
 * begins and ends with a quote: 16 positions at a time, a candidate is a quote with another
 * 7 bytes on, and only a candidate's middle is compared. */
static int holds_stream_key(const unsigned char *s, Py_ssize_t n)
{
    static const char key[8] = {'"', 's', 't', 'r', 'e', 'a', 'm', '"'};
    Py_ssize_t i = 0;
    if (n < 8)
        return 0;
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"');
    for (; i + 7 + 16 <= n; i += 16) {
        __m128i first = _mm_loadu_si128((const __m128i *)(const void *)(s + i));
        __m128i last = _mm_loadu_si128((const __m128i *)(const void *)(s + i + 7));
        unsigned mask = (unsigned)_mm_movemask_epi8(
            _mm_and_si128(_mm_cmpeq_epi8(first, quote), _mm_cmpeq_epi8(last, quote)));
        while (mask != 0) {
            int at = __builtin_ctz(mask);
            if (memcmp(s + i + at + 1, key + 1, 6) == 0)
                return 1;
            mask &= mask - 1;
        }
    }
#endif
    for (; i + 8 <= n; i++) {
        if (s[i] == '"' && s[i + 7] == '"' && memcmp(s + i + 1, key + 1, 6) == 0)
            return 1;
    }
    return 0;
}

/* stream_key(body): holds_stream_key over any bytes-like body. */
static PyObject *topscan_stream_key(PyObject *self, PyObject *body)
{
    (void)self;
    if (PyBytes_CheckExact(body))
        return PyBool_FromLong(
            holds_stream_key((const unsigned char *)PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body)));
    Py_buffer view;
    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int found = holds_stream_key((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static PyMethodDef topscan_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))topscan_scan, METH_FASTCALL,
     "scan(body, keys) -> bytes | None: the wanted top-level members of a JSON object body "
     "as a small JSON object text, or None when the body is outside the checked happy path."},
    {"usage", (PyCFunction)(void (*)(void))topscan_usage, METH_FASTCALL,
     "usage(body, mode) -> (provider, model, input, cached, output, reasoning) | None: the "
     "usage of a JSON answer of a known shape (mode 0 auto, 1 openai, 2 anthropic, 3 gemini), "
     "or None when the answer is outside the checked happy path."},
    {"priced", (PyCFunction)(void (*)(void))topscan_priced, METH_FASTCALL,
     "priced(body, mode, memo, terms_for, maximum, left, head) -> (tokens, (settle value,), "
     "cost header value, remaining header value | None, provider, model, input, cached, "
     "output, reasoning) | None | False: usage(body, mode) priced as PriceTable.cost_of prices "
     "it and told as the usage tap tells it (gateway/metering/usage_tap.py priced_counts), or "
     "None; False when head is given and not surely a plain JSON answer's headers."},
    {"stream_key", (PyCFunction)topscan_stream_key, METH_O,
     "stream_key(body) -> bool: whether the bytes hold '\"stream\"' (body.find(b'\"stream\"') "
     ">= 0), the request side's test before any decode."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef topscan_module = {
    PyModuleDef_HEAD_INIT, "_topscan",
    "A compiled structural pass over JSON answers (see gateway/usage/topscan.py).", -1,
    topscan_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__topscan(void)
{
    static const char *names[4] = {NULL, "openai", "anthropic", "gemini"};
    for (int i = 1; i < 4; i++) {
        if (PROVIDER_NAMES[i] == NULL) {
            PROVIDER_NAMES[i] = PyUnicode_InternFromString(names[i]);
            if (PROVIDER_NAMES[i] == NULL)
                return NULL;
        }
    }
    return PyModule_Create(&topscan_module);
}
