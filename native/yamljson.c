// SPDX-License-Identifier: Apache-2.0
// A YAML stream read by libyaml into the JSON of its documents (one array), for manifests: what PyYAML's
// SafeLoader (YAML 1.1, the reading kubectl shares) makes of the common case, 10x faster. Plain scalars are
// resolved by PyYAML's implicit resolvers, each regular expression matched here by hand (tests/unit/
// test_yamljson.py checks them against PyYAML's own on generated scalars). Whatever JSON cannot say the same
// way, or that this reader does not take, is declined, and the caller reads the stream with PyYAML instead:
// anchors and aliases, tags, merge keys, timestamps, integers and floats written other than in decimal,
// .inf/.nan, keys that are not strings, nesting deeper than MAX_DEPTH, and any error (PyYAML names it).
//
// noded_yaml_to_json(in, len, &out, &out_len): 0 and a malloc'd JSON text; NODED_YAML_DECLINED;
// NODED_YAML_ERROR (libyaml's parse failed); NODED_YAML_NOMEM. noded_yaml_free(out) frees it.
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#define NODED_YAML_DECLINED 1
#define NODED_YAML_ERROR 2
#define NODED_YAML_NOMEM 3
#define MAX_DEPTH 256

struct out {
    char *buf;
    size_t len, cap;
    int failed;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (o->failed)
        return;
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap : 4096;
        while (cap < o->len + n)
            cap *= 2;
        char *b = realloc(o->buf, cap);
        if (!b) {
            o->failed = 1;
            return;
        }
        o->buf = b;
        o->cap = cap;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

static void put_string(struct out *o, const unsigned char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t start = 0;
    put(o, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        put(o, (const char *)s + start, i - start);
        char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
        if (c == '"' || c == '\\') {
            esc[1] = (char)c;
            put(o, esc, 2);
        } else {
            put(o, esc, 6);
        }
        start = i + 1;
    }
    put(o, (const char *)s + start, n - start);
    put(o, "\"", 1);
}

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static int is_sign(unsigned char c) { return c == '-' || c == '+'; }

// [0-9_]* from i: the index after
static size_t digits_(const unsigned char *s, size_t i, size_t n)
{
    while (i < n && (is_digit(s[i]) || s[i] == '_'))
        i++;
    return i;
}

// (?:[eE][-+][0-9]+)? from i, ending at n
static int exponent_to_end(const unsigned char *s, size_t i, size_t n)
{
    if (i == n)
        return 1;
    if (s[i] != 'e' && s[i] != 'E')
        return 0;
    if (i + 1 >= n || !is_sign(s[i + 1]))
        return 0;
    i += 2;
    if (i >= n)
        return 0;
    while (i < n && is_digit(s[i]))
        i++;
    return i == n;
}

// (?::[0-5]?[0-9])+ from i: the index after the groups, or 0 when there is none or one is cut short. Each
// group's length is forced: after a group comes ':' or what follows them all ('.' or the end), never a
// digit, so two digits are one group of two (which then needs [0-5] first), not two groups.
static size_t groups(const unsigned char *s, size_t i, size_t n)
{
    size_t count = 0;
    while (i < n && s[i] == ':') {
        if (i + 1 >= n || !is_digit(s[i + 1]))
            return 0;
        if (i + 2 < n && is_digit(s[i + 2])) {
            if (s[i + 1] > '5')
                return 0;
            i += 3;
        } else {
            i += 2;
        }
        count++;
    }
    return count ? i : 0;
}

// PyYAML's float: [-+]?[0-9][0-9_]*\.[0-9_]*([eE][-+][0-9]+)? | \.[0-9][0-9_]*([eE][-+][0-9]+)?
//               | [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]* | [-+]?\.(inf|Inf|INF) | \.(nan|NaN|NAN)
static int match_float(const unsigned char *s, size_t n)
{
    static const char *inf[] = {".inf", ".Inf", ".INF"};
    static const char *nan[] = {".nan", ".NaN", ".NAN"};
    size_t i = (n && is_sign(s[0])) ? 1 : 0;
    if (i < n && s[i] == '.') {
        for (int k = 0; k < 3; k++)
            if (n == i + 4 && (memcmp(s + i, inf[k], 4) == 0 || (i == 0 && memcmp(s, nan[k], 4) == 0)))
                return 1;
        // \.[0-9][0-9_]*(exp)?: no sign
        return i == 0 && n > 1 && is_digit(s[1]) && exponent_to_end(s, digits_(s, 2, n), n);
    }
    if (i >= n || !is_digit(s[i]))
        return 0;
    size_t j = digits_(s, i + 1, n);  // [0-9_]* then '.' or ':', neither of them in it: no giving back
    if (j < n && s[j] == '.')
        return exponent_to_end(s, digits_(s, j + 1, n), n);
    size_t e = groups(s, j, n);
    return e && e < n && s[e] == '.' && digits_(s, e + 1, n) == n;
}

// PyYAML's int: [-+]?0b[0-1_]+ | [-+]?0[0-7_]+ | [-+]?(0|[1-9][0-9_]*) | [-+]?0x[0-9a-fA-F_]+
//             | [-+]?[1-9][0-9_]*(:[0-5]?[0-9])+
static int match_int(const unsigned char *s, size_t n)
{
    size_t i = (n && is_sign(s[0])) ? 1 : 0;
    if (i >= n || !is_digit(s[i]))
        return 0;
    if (s[i] == '0') {
        if (n == i + 1)
            return 1;
        unsigned char t = s[i + 1];
        size_t j = i + 2;
        if (t == 'b' || t == 'x') {
            if (j >= n)
                return 0;
            for (; j < n; j++) {
                unsigned char c = s[j];
                int ok = t == 'b' ? (c == '0' || c == '1' || c == '_')
                                  : (is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == '_');
                if (!ok)
                    return 0;
            }
            return 1;
        }
        for (j = i + 1; j < n; j++)
            if (!(s[j] >= '0' && s[j] <= '7') && s[j] != '_')
                return 0;
        return 1;
    }
    size_t j = digits_(s, i + 1, n);
    return j == n || groups(s, j, n) == n;
}

static int match_timestamp(const unsigned char *s, size_t n)
{
    // [0-9]{4}-[0-9][0-9]-[0-9][0-9]  |  [0-9]{4}-[0-9][0-9]?-[0-9][0-9]?([Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9]
    //                                    (\.[0-9]*)?([ \t]*(Z|[-+][0-9][0-9]?(:[0-9][0-9])?))?
    // Declined either way, so a superset is safe here: four digits and a dash start every timestamp.
    return n >= 8 && is_digit(s[0]) && is_digit(s[1]) && is_digit(s[2]) && is_digit(s[3]) && s[4] == '-';
}

enum kind { STRING, NUL, TRUE_, FALSE_, NUMBER, DECLINE };

static int word(const unsigned char *s, size_t n, const char *w)
{
    return strlen(w) == n && memcmp(s, w, n) == 0;
}

// What PyYAML's SafeLoader makes of a plain scalar (its resolvers, in their order), and whether JSON can say
// it: a number only in plain decimal
static enum kind resolve(const unsigned char *s, size_t n)
{
    if (n == 0)
        return NUL;
    unsigned char c = s[0];
    if (strchr("yYnNtTfFoO", c)) {
        static const char *yes[] = {"yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"};
        static const char *no[] = {"no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"};
        for (int k = 0; k < 9; k++) {
            if (word(s, n, yes[k]))
                return TRUE_;
            if (word(s, n, no[k]))
                return FALSE_;
        }
    }
    if (strchr("-+0123456789.", c)) {
        if (match_float(s, n) || match_int(s, n)) {
            // plain decimal only: [-+]?(0|[1-9][0-9]*) or [-+]?[0-9]+\.[0-9]*(exp)? or \.[0-9]+(exp)?
            for (size_t i = 0; i < n; i++)
                if (s[i] == '_' || s[i] == ':' || s[i] == 'x' || s[i] == 'b' || s[i] == 'n' || s[i] == 'N' ||
                    s[i] == 'i' || s[i] == 'I')
                    return DECLINE;
            size_t i = is_sign(c) ? 1 : 0;
            if (s[i] == '0' && i + 1 < n && is_digit(s[i + 1]))
                return DECLINE;  // octal
            return NUMBER;
        }
        if (is_digit(c) && match_timestamp(s, n))
            return DECLINE;
        return STRING;
    }
    if (c == '<' && word(s, n, "<<"))
        return DECLINE;  // a merge key
    if (c == '=' && n == 1)
        return DECLINE;  // the value tag
    if (word(s, n, "~") || word(s, n, "null") || word(s, n, "Null") || word(s, n, "NULL"))
        return NUL;
    return STRING;
}

// A number as JSON writes it: no '+', a digit before and after the dot
static void put_number(struct out *o, const unsigned char *s, size_t n)
{
    size_t i = 0;
    if (s[0] == '+')
        i = 1;
    else if (s[0] == '-') {
        put(o, "-", 1);
        i = 1;
    }
    if (s[i] == '.')
        put(o, "0", 1);
    for (; i < n; i++) {
        put(o, (const char *)s + i, 1);
        if (s[i] == '.' && (i + 1 == n || !is_digit(s[i + 1])))
            put(o, "0", 1);
    }
}

struct level {
    int mapping;  // else a sequence
    size_t items;  // values written (a mapping: keys and values)
};

int noded_yaml_to_json(const unsigned char *in, size_t len, char **out_text, size_t *out_len)
{
    yaml_parser_t parser;
    yaml_event_t event;
    struct out o = {0};
    struct level stack[MAX_DEPTH];
    int depth = 0;
    size_t documents = 0;
    int result = 0;
    if (!yaml_parser_initialize(&parser))
        return NODED_YAML_NOMEM;
    yaml_parser_set_input_string(&parser, in, len);
    yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING);  // as PyYAML reads a str
    put(&o, "[", 1);
    for (int done = 0; !done && !result;) {
        if (!yaml_parser_parse(&parser, &event)) {
            result = NODED_YAML_ERROR;
            break;
        }
        int value = 0;  // the event is a value (a node) to place in its parent
        switch (event.type) {
        case YAML_STREAM_END_EVENT:
            done = 1;
            break;
        case YAML_DOCUMENT_START_EVENT:
            if (event.data.document_start.tag_directives.start != event.data.document_start.tag_directives.end)
                result = NODED_YAML_DECLINED;
            if (documents++)
                put(&o, ",", 1);
            break;
        case YAML_ALIAS_EVENT:
            result = NODED_YAML_DECLINED;
            break;
        case YAML_SCALAR_EVENT:
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT:
            value = 1;
            break;
        default:
            break;
        }
        if (value && !result) {
            struct level *parent = depth ? &stack[depth - 1] : NULL;
            int is_key = parent && parent->mapping && parent->items % 2 == 0;
            if (parent && parent->items)
                put(&o, is_key ? "," : (parent->mapping ? ":" : ","), 1);
            if (parent)
                parent->items++;
            if (event.type == YAML_SCALAR_EVENT) {
                const unsigned char *s = event.data.scalar.value;
                size_t n = event.data.scalar.length;
                enum kind k = STRING;
                if (event.data.scalar.anchor || event.data.scalar.tag)
                    k = DECLINE;
                else if (event.data.scalar.plain_implicit && event.data.scalar.style == YAML_PLAIN_SCALAR_STYLE)
                    k = resolve(s, n);
                if (is_key && k != STRING)
                    k = DECLINE;  // JSON's keys are strings
                switch (k) {
                case STRING: put_string(&o, s, n); break;
                case NUL: put(&o, "null", 4); break;
                case TRUE_: put(&o, "true", 4); break;
                case FALSE_: put(&o, "false", 5); break;
                case NUMBER: put_number(&o, s, n); break;
                case DECLINE: result = NODED_YAML_DECLINED; break;
                }
            } else {
                int mapping = event.type == YAML_MAPPING_START_EVENT;
                const yaml_char_t *anchor = mapping ? event.data.mapping_start.anchor : event.data.sequence_start.anchor;
                const yaml_char_t *tag = mapping ? event.data.mapping_start.tag : event.data.sequence_start.tag;
                if (anchor || tag || is_key || depth == MAX_DEPTH) {
                    result = NODED_YAML_DECLINED;
                } else {
                    stack[depth].mapping = mapping;
                    stack[depth].items = 0;
                    depth++;
                    put(&o, mapping ? "{" : "[", 1);
                }
            }
        } else if (!result && (event.type == YAML_SEQUENCE_END_EVENT || event.type == YAML_MAPPING_END_EVENT)) {
            depth--;
            put(&o, event.type == YAML_MAPPING_END_EVENT ? "}" : "]", 1);
        }
        yaml_event_delete(&event);
    }
    yaml_parser_delete(&parser);
    put(&o, "]", 1);
    if (!result && o.failed)
        result = NODED_YAML_NOMEM;
    if (result) {
        free(o.buf);
        return result;
    }
    *out_text = o.buf;
    *out_len = o.len;
    return 0;
}

void noded_yaml_free(char *text)
{
    free(text);
}
