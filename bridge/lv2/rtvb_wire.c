/* The rtvamp bridge wire format in C: see rtvb_wire.h and bridge/PROTOCOL.md. */
#include "rtvb_wire.h"

#include <math.h>
#include <string.h>

static const uint8_t MAGIC[4] = {'R', 'T', 'V', 'B'};

void rtvb_pack_header(const rtvb_header *h, uint8_t out[RTVB_HEADER_BYTES]) {
    memcpy(out, MAGIC, 4);
    out[4] = h->version;
    out[5] = h->format;
    out[6] = h->channels;
    out[7] = h->flags;
    memcpy(out + 8, &h->stream_id, 4);
    memcpy(out + 12, &h->frames, 4);
    memcpy(out + 16, &h->sequence, 8);
    memcpy(out + 24, &h->sample_time, 8);
    memcpy(out + 32, &h->wall_ns, 8);
    memcpy(out + 40, &h->sample_rate, 4);
    memcpy(out + 44, &h->bar, 4);
    memcpy(out + 48, &h->beat, 8);
    memcpy(out + 56, &h->tempo, 8);
    memcpy(out + 64, &h->beats_per_bar, 4);
}

enum rtvb_status rtvb_unpack_frame(const uint8_t *buf, size_t size, rtvb_header *h) {
    if (size > RTVB_MAX_FRAME_BYTES) return RTVB_OVERSIZED;
    if (size < RTVB_HEADER_BYTES || memcmp(buf, MAGIC, 4) != 0) return RTVB_MALFORMED;
    h->version = buf[4];
    h->format = buf[5];
    h->channels = buf[6];
    h->flags = buf[7];
    memcpy(&h->stream_id, buf + 8, 4);
    memcpy(&h->frames, buf + 12, 4);
    memcpy(&h->sequence, buf + 16, 8);
    memcpy(&h->sample_time, buf + 24, 8);
    memcpy(&h->wall_ns, buf + 32, 8);
    memcpy(&h->sample_rate, buf + 40, 4);
    memcpy(&h->bar, buf + 44, 4);
    memcpy(&h->beat, buf + 48, 8);
    memcpy(&h->tempo, buf + 56, 8);
    memcpy(&h->beats_per_bar, buf + 64, 4);
    if (h->version != RTVB_VERSION) return RTVB_WRONG_VERSION;
    if (h->format != RTVB_FORMAT_F32 || h->channels < 1 || h->channels > RTVB_MAX_CHANNELS) return RTVB_MALFORMED;
    if (h->frames > RTVB_MAX_FRAMES) return RTVB_OVERSIZED;
    if (h->frames < 1 || h->sample_rate < 8000 || h->sample_rate > 384000) return RTVB_MALFORMED;
    if ((h->flags & RTVB_TRANSPORT) &&
        !(isfinite(h->tempo) && h->tempo >= 1.0 && h->tempo <= 1000.0 && isfinite(h->beat) && h->beat >= 0.0 &&
          h->beat <= 64.0 && isfinite(h->beats_per_bar) && h->beats_per_bar >= 1.0f && h->beats_per_bar <= 64.0f))
        return RTVB_MALFORMED;
    if (size != RTVB_HEADER_BYTES + (size_t)h->frames * h->channels * 4) return RTVB_MALFORMED;
    return RTVB_OK;
}

const char *rtvb_status_name(enum rtvb_status status) {
    switch (status) {
    case RTVB_OK: return "ok";
    case RTVB_MALFORMED: return "malformed";
    case RTVB_OVERSIZED: return "oversized";
    case RTVB_WRONG_VERSION: return "version";
    }
    return "malformed";
}

/* -- msgpack writing (the encodings msgspec chooses: smallest int, float64, fixstr/str8) ----- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
    int ok;
} writer;

static void put(writer *w, const void *src, size_t n) {
    if (w->n + n > w->cap) {
        w->ok = 0;
        return;
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}

static void put_byte(writer *w, uint8_t b) { put(w, &b, 1); }

static void put_be(writer *w, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--) put_byte(w, (uint8_t)(v >> (8 * i)));
}

static void mp_map(writer *w, uint8_t n) { put_byte(w, (uint8_t)(0x80 | n)); }
static void mp_array(writer *w, uint8_t n) { put_byte(w, (uint8_t)(0x90 | n)); }

static void mp_str(writer *w, const char *s) {
    size_t n = strlen(s);
    if (n < 32) {
        put_byte(w, (uint8_t)(0xa0 | n));
    } else if (n < 256) {
        put_byte(w, 0xd9);
        put_byte(w, (uint8_t)n);
    } else {
        w->ok = 0;
        return;
    }
    put(w, s, n);
}

static void mp_uint(writer *w, uint64_t v) {
    if (v < 128) {
        put_byte(w, (uint8_t)v);
    } else if (v < 256) {
        put_byte(w, 0xcc);
        put_be(w, v, 1);
    } else if (v < 65536) {
        put_byte(w, 0xcd);
        put_be(w, v, 2);
    } else if (v < 4294967296ull) {
        put_byte(w, 0xce);
        put_be(w, v, 4);
    } else {
        put_byte(w, 0xcf);
        put_be(w, v, 8);
    }
}

static void mp_double(writer *w, double d) {
    uint64_t bits;
    memcpy(&bits, &d, 8);
    put_byte(w, 0xcb);
    put_be(w, bits, 8);
}

static size_t done(writer *w) { return w->ok ? w->n : 0; }

size_t rtvb_write_hello(uint8_t *out, size_t cap, uint32_t sample_rate, uint32_t channels, uint32_t block_frames,
                        uint32_t jitter_blocks, const char *client) {
    writer w = {out, 0, cap, 1};
    mp_map(&w, 7);
    mp_str(&w, "type");
    mp_str(&w, "hello");
    mp_str(&w, "versions");
    mp_array(&w, 1);
    mp_uint(&w, RTVB_VERSION);
    mp_str(&w, "sample_rate");
    mp_uint(&w, sample_rate);
    mp_str(&w, "channels");
    mp_uint(&w, channels);
    mp_str(&w, "block_frames");
    mp_uint(&w, block_frames);
    mp_str(&w, "jitter_blocks");
    mp_uint(&w, jitter_blocks);
    mp_str(&w, "client");
    mp_str(&w, client);
    return done(&w);
}

size_t rtvb_write_trigger(uint8_t *out, size_t cap, uint64_t id, uint32_t bars, const char *preset,
                          double temperature) {
    writer w = {out, 0, cap, 1};
    mp_map(&w, 6);
    mp_str(&w, "type");
    mp_str(&w, "trigger");
    mp_str(&w, "id");
    mp_uint(&w, id);
    mp_str(&w, "source");
    mp_str(&w, "input");
    mp_str(&w, "bars");
    mp_uint(&w, bars);
    mp_str(&w, "preset");
    mp_str(&w, preset);
    mp_str(&w, "temperature");
    mp_double(&w, temperature);
    return done(&w);
}

size_t rtvb_write_midi(uint8_t *out, size_t cap, uint64_t id, const uint8_t *data, size_t n) {
    writer w = {out, 0, cap, 1};
    if (n < 1 || n > 3) return 0;
    mp_map(&w, 3);
    mp_str(&w, "type");
    mp_str(&w, "midi");
    mp_str(&w, "id");
    mp_uint(&w, id);
    mp_str(&w, "data");
    put_byte(&w, 0xc4); /* bin8 */
    put_byte(&w, (uint8_t)n);
    put(&w, data, n);
    return done(&w);
}

size_t rtvb_write_bye(uint8_t *out, size_t cap, uint32_t stream_id, const char *reason) {
    writer w = {out, 0, cap, 1};
    mp_map(&w, 3);
    mp_str(&w, "type");
    mp_str(&w, "bye");
    mp_str(&w, "stream_id");
    mp_uint(&w, stream_id);
    mp_str(&w, "reason");
    mp_str(&w, reason);
    return done(&w);
}

/* -- msgpack reading ------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *p;
    size_t n, i;
    int ok;
} reader;

static uint64_t get_be(reader *r, int bytes) {
    if (r->i + (size_t)bytes > r->n) {
        r->ok = 0;
        return 0;
    }
    uint64_t v = 0;
    for (int k = 0; k < bytes; k++) v = (v << 8) | r->p[r->i++];
    return v;
}

enum { V_NONE, V_INT, V_FLOAT, V_STR };

typedef struct {
    int kind;
    int64_t i;
    double f;
    const char *s;
    size_t len;
} value;

static int skip(reader *r, int depth);

/* Read one value; containers and binaries are skipped (kind V_NONE). */
static value read_value(reader *r, int depth) {
    value v = {V_NONE, 0, 0.0, NULL, 0};
    if (r->i >= r->n || depth > 16) {
        r->ok = 0;
        return v;
    }
    uint8_t b = r->p[r->i++];
    size_t len = 0, count = 0;
    if (b < 0x80) {
        v.kind = V_INT;
        v.i = b;
    } else if (b >= 0xe0) {
        v.kind = V_INT;
        v.i = (int8_t)b;
    } else if ((b & 0xe0) == 0xa0 || b == 0xd9 || b == 0xda || b == 0xdb) {
        len = (b & 0xe0) == 0xa0 ? (size_t)(b & 0x1f) : (size_t)get_be(r, b == 0xd9 ? 1 : b == 0xda ? 2 : 4);
        if (!r->ok || r->i + len > r->n) {
            r->ok = 0;
            return v;
        }
        v.kind = V_STR;
        v.s = (const char *)r->p + r->i;
        v.len = len;
        r->i += len;
    } else if (b == 0xcc || b == 0xcd || b == 0xce || b == 0xcf) {
        v.kind = V_INT;
        v.i = (int64_t)get_be(r, 1 << (b - 0xcc));
    } else if (b == 0xd0 || b == 0xd1 || b == 0xd2 || b == 0xd3) {
        int bytes = 1 << (b - 0xd0);
        uint64_t u = get_be(r, bytes);
        v.kind = V_INT;
        v.i = bytes == 1 ? (int8_t)u : bytes == 2 ? (int16_t)u : bytes == 4 ? (int32_t)u : (int64_t)u;
    } else if (b == 0xca) {
        uint32_t u = (uint32_t)get_be(r, 4);
        float f;
        memcpy(&f, &u, 4);
        v.kind = V_FLOAT;
        v.f = f;
    } else if (b == 0xcb) {
        uint64_t u = get_be(r, 8);
        memcpy(&v.f, &u, 8);
        v.kind = V_FLOAT;
    } else if (b == 0xc0 || b == 0xc2 || b == 0xc3) {
        /* nil, false, true: not needed by the plugin */
    } else if (b == 0xc4 || b == 0xc5 || b == 0xc6) {
        len = (size_t)get_be(r, 1 << (b - 0xc4));
        if (!r->ok || r->i + len > r->n) r->ok = 0;
        else r->i += len;
    } else if ((b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd) {
        count = (b & 0xf0) == 0x90 ? (size_t)(b & 0x0f) : (size_t)get_be(r, b == 0xdc ? 2 : 4);
        for (size_t k = 0; k < count && r->ok; k++) skip(r, depth + 1);
    } else if ((b & 0xf0) == 0x80 || b == 0xde || b == 0xdf) {
        count = (b & 0xf0) == 0x80 ? (size_t)(b & 0x0f) : (size_t)get_be(r, b == 0xde ? 2 : 4);
        for (size_t k = 0; k < 2 * count && r->ok; k++) skip(r, depth + 1);
    } else {
        r->ok = 0; /* ext types and the unused 0xc1 */
    }
    return v;
}

static int skip(reader *r, int depth) {
    read_value(r, depth);
    return r->ok;
}

static void copy_str(char *dst, size_t cap, const value *v) {
    size_t n = v->kind == V_STR ? (v->len < cap - 1 ? v->len : cap - 1) : 0;
    memcpy(dst, v->s ? v->s : "", n);
    dst[n] = 0;
}

static int key_is(const value *k, const char *name) {
    return k->kind == V_STR && k->len == strlen(name) && memcmp(k->s, name, k->len) == 0;
}

int rtvb_read_session(const uint8_t *buf, size_t size, rtvb_session *out) {
    memset(out, 0, sizeof *out);
    reader r = {buf, size, 0, 1};
    if (size < 1) return -1;
    uint8_t b = buf[0];
    size_t count;
    if ((b & 0xf0) == 0x80) {
        count = b & 0x0f;
        r.i = 1;
    } else if (b == 0xde) {
        r.i = 1;
        count = (size_t)get_be(&r, 2);
    } else {
        return -1;
    }
    struct {
        const char *name;
        int64_t *field;
    } ints[] = {{"version", &out->version},         {"stream_id", &out->stream_id},
                {"sample_rate", &out->sample_rate}, {"channels", &out->channels},
                {"block_frames", &out->block_frames}, {"jitter_blocks", &out->jitter_blocks},
                {"latency_samples", &out->latency_samples}, {"control_port", &out->control_port},
                {"state_port", &out->state_port}};
    for (size_t k = 0; k < count && r.ok; k++) {
        value key = read_value(&r, 1);
        value v = read_value(&r, 1);
        if (!r.ok) break;
        if (key_is(&key, "type")) copy_str(out->type, sizeof out->type, &v);
        else if (key_is(&key, "code")) copy_str(out->code, sizeof out->code, &v);
        else if (key_is(&key, "message")) copy_str(out->message, sizeof out->message, &v);
        else if (key_is(&key, "engine")) copy_str(out->engine, sizeof out->engine, &v);
        else if (v.kind == V_INT)
            for (size_t f = 0; f < sizeof ints / sizeof ints[0]; f++)
                if (key_is(&key, ints[f].name)) *ints[f].field = v.i;
    }
    return r.ok && r.i == size && out->type[0] ? 0 : -1;
}
