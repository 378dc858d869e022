/* rtvamp bridge — an LV2 plugin that streams the host's audio through a running `rtvamp serve`
 * (bridge/PROTOCOL.md) and plays what comes back, `latency` samples later.
 *
 * Threads. The host's audio thread (run) never blocks, allocates or locks: it copies each
 * block into a lock-free single-producer ring (tx) and wakes the network thread through an
 * eventfd; it reads the engine's replies from a second ring (rx). The network thread owns the
 * ZeroMQ sockets: handshake, sending frames, receiving replies, reconnecting. A reply must be
 * back within `latency` samples (2 blocks: 11.6 ms at 256 frames, 44.1 kHz), so when the host's
 * audio thread runs real-time (SCHED_FIFO/RR), the network thread and ZeroMQ's I/O thread ask
 * for real-time scheduling too, at priority 1: below the host's audio thread, above every
 * normal thread (on a loaded machine a normal-priority round trip misses that deadline often).
 * Without the permission (RLIMIT_RTPRIO, CAP_SYS_NICE) they stay as they are.
 *
 * Timeline. `pos` counts samples since activate(). The output at pos is the engine's reply
 * for pos − latency when it has arrived, else the plugin's own input at pos − latency (the
 * dry signal: never silence), so the delay reported on the latency port holds with the engine
 * present, late or absent. latency = jitter × block (block: the host's first block length).
 *
 * Freewheeling (offline render, lv2:freeWheeling): the audio thread may wait, so it waits for
 * the handshake and for each reply (bounded), and the render holds the engine's output.
 *
 * The endpoint comes from RTVAMP_ENDPOINT (default tcp://127.0.0.1:47800); RTVAMP_KEYS names a
 * folder from `rtvamp keys` (server.key, client.key_secret) for an engine behind CURVE. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include <lv2/atom/atom.h>
#include <lv2/atom/util.h>
#include <lv2/core/lv2.h>
#include <lv2/midi/midi.h>
#include <lv2/time/time.h>
#include <lv2/urid/urid.h>

#include "rtvb_wire.h"

#define PLUGIN_URI "urn:rtvamp:bridge"
#define CHANNELS 2
#define MAX_BLOCK 4096
#define HISTORY (1 << 16) /* frames of dry and wet history (≥ 2 × MAX_BLOCK + latency) */
#define SLOTS 64          /* frames in each ring */
#define SEQ_MAP 1024
#define MIDI_SLOTS 256
#define HANDSHAKE_MS 1000
#define RETRY_MS 1000
#define SILENCE_MS 1500 /* no reply for this long while sending: the engine is gone */
#define FREEWHEEL_WAIT_S 3.0
#define MAX_SKIP_BLOCKS 16 /* a jump of the host's frame up to this many blocks, same tempo: the same grid */
#define NET_PRIORITY 1 /* SCHED_FIFO priority of the network thread, when the host's audio thread is real-time */

static const char *PRESETS[] = {"timbre-transfer",   "small-variation",
                                "small-variation-follow-beat", "medium-variation",
                                "medium-variation-follow-beat", "large-variation",
                                "large-variation-follow-beat",  "unconditional"};
#define N_PRESETS (sizeof PRESETS / sizeof PRESETS[0])

enum {
    P_IN_L, P_IN_R, P_OUT_L, P_OUT_R, P_EVENTS, P_LATENCY, P_TRIGGER, P_BARS, P_PRESET, P_TEMPERATURE,
    P_DRYWET, P_FREEWHEEL, P_JITTER, P_CONNECTED, P_CONCEALED, N_PORTS
};

enum { LINK_DOWN = 0, LINK_CONNECTING = 1, LINK_UP = 2 };

typedef struct {
    int64_t pos;          /* plugin timeline position of the first frame */
    rtvb_header h;        /* stream_id and sequence are filled in by the network thread */
    float x[MAX_BLOCK * CHANNELS];
} tx_slot;

typedef struct {
    int64_t pos;
    uint32_t frames;
    float y[MAX_BLOCK * CHANNELS];
} rx_slot;

typedef struct {
    uint8_t data[3];
    uint8_t size;
} midi_slot;

typedef struct {
    /* ports */
    const float *in[CHANNELS];
    float *out[CHANNELS];
    const LV2_Atom_Sequence *events;
    float *latency_port, *connected_port, *concealed_port;
    const float *trigger, *bars, *preset, *temperature, *drywet, *freewheel, *jitter;

    /* URIDs */
    LV2_URID atom_Object, atom_Blank, atom_Float, atom_Double, atom_Int, atom_Long, time_Position, time_bar,
        time_barBeat, time_beatsPerBar, time_beatsPerMinute, time_speed, time_frame, midi_Event;

    /* audio thread */
    double rate;
    int64_t pos;
    uint32_t block;    /* frames per bridge frame, fixed at the first run() */
    int64_t latency;   /* samples */
    float *dry;        /* [HISTORY × CHANNELS] */
    float *wet;
    int64_t *wet_pos;  /* the timeline position each wet frame holds (−1: none) */
    int transport_valid, discontinuity;
    double bpm, bar_beat, beats_per_bar, speed;
    int64_t bar, daw_frame;
    int last_trigger;
    uint64_t concealed;

    /* rings (single producer, single consumer) */
    tx_slot *tx;
    rx_slot *rx;
    midi_slot *midi;
    _Atomic uint64_t tx_head, tx_tail, rx_head, rx_tail, midi_head, midi_tail;

    /* shared state */
    _Atomic int link;
    _Atomic int attempts;            /* handshakes resolved (up or down) */
    _Atomic int64_t latency_stated;  /* from the Welcome (0 before) */
    _Atomic int64_t next_pos;        /* the timeline position of the next frame the audio thread queues */
    _Atomic int64_t first_pos;       /* the first position sent in the current stream */
    _Atomic uint32_t triggers;       /* rising edges of the trigger port */
    _Atomic uint32_t trigger_bars, trigger_preset;
    _Atomic uint32_t trigger_temperature_milli;
    _Atomic uint32_t block_atomic, jitter_atomic;
    _Atomic int host_policy, host_priority; /* the host's audio thread's scheduling (its first run) */
    _Atomic int running;

    /* network thread */
    pthread_t thread;
    int thread_started;
    int efd;
    char endpoint[256];
    char control_endpoint[256];
    char host[200];
    char keys[512];
} Bridge;

/* -- small helpers -------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void nap_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

/* -- LV2 lifecycle --------------------------------------------------------------------------- */

static LV2_Handle instantiate(const LV2_Descriptor *d, double rate, const char *path,
                              const LV2_Feature *const *features) {
    (void)d;
    (void)path;
    LV2_URID_Map *map = NULL;
    for (int i = 0; features && features[i]; i++)
        if (!strcmp(features[i]->URI, LV2_URID__map)) map = (LV2_URID_Map *)features[i]->data;
    Bridge *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->rate = rate;
    b->dry = calloc((size_t)HISTORY * CHANNELS, sizeof(float));
    b->wet = calloc((size_t)HISTORY * CHANNELS, sizeof(float));
    b->wet_pos = malloc((size_t)HISTORY * sizeof(int64_t));
    b->tx = calloc(SLOTS, sizeof(tx_slot));
    b->rx = calloc(SLOTS, sizeof(rx_slot));
    b->midi = calloc(MIDI_SLOTS, sizeof(midi_slot));
    b->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!b->dry || !b->wet || !b->wet_pos || !b->tx || !b->rx || !b->midi || b->efd < 0) {
        free(b->dry), free(b->wet), free(b->wet_pos), free(b->tx), free(b->rx), free(b->midi);
        if (b->efd >= 0) close(b->efd);
        free(b);
        return NULL;
    }
    const char *endpoint = getenv("RTVAMP_ENDPOINT");
    snprintf(b->endpoint, sizeof b->endpoint, "%s", endpoint && *endpoint ? endpoint : "tcp://127.0.0.1:47800");
    const char *keys = getenv("RTVAMP_KEYS");
    snprintf(b->keys, sizeof b->keys, "%s", keys ? keys : "");
    /* host = between "tcp://" and the last ':' */
    const char *h = strstr(b->endpoint, "://");
    h = h ? h + 3 : b->endpoint;
    const char *colon = strrchr(h, ':');
    size_t n = colon ? (size_t)(colon - h) : strlen(h);
    if (n >= sizeof b->host) n = sizeof b->host - 1;
    memcpy(b->host, h, n);
    b->host[n] = 0;
    /* without urid:map (a bare host) the events port is ignored: audio only, no transport */
#define URID(field, uri) b->field = map ? map->map(map->handle, uri) : 0
    URID(atom_Object, LV2_ATOM__Object);
    URID(atom_Blank, LV2_ATOM__Blank);
    URID(atom_Float, LV2_ATOM__Float);
    URID(atom_Double, LV2_ATOM__Double);
    URID(atom_Int, LV2_ATOM__Int);
    URID(atom_Long, LV2_ATOM__Long);
    URID(time_Position, LV2_TIME__Position);
    URID(time_bar, LV2_TIME__bar);
    URID(time_barBeat, LV2_TIME__barBeat);
    URID(time_beatsPerBar, LV2_TIME__beatsPerBar);
    URID(time_beatsPerMinute, LV2_TIME__beatsPerMinute);
    URID(time_speed, LV2_TIME__speed);
    URID(time_frame, LV2_TIME__frame);
    URID(midi_Event, LV2_MIDI__MidiEvent);
#undef URID
    return b;
}

static void connect_port(LV2_Handle h, uint32_t port, void *data) {
    Bridge *b = h;
    switch (port) {
    case P_IN_L: b->in[0] = data; break;
    case P_IN_R: b->in[1] = data; break;
    case P_OUT_L: b->out[0] = data; break;
    case P_OUT_R: b->out[1] = data; break;
    case P_EVENTS: b->events = data; break;
    case P_LATENCY: b->latency_port = data; break;
    case P_TRIGGER: b->trigger = data; break;
    case P_BARS: b->bars = data; break;
    case P_PRESET: b->preset = data; break;
    case P_TEMPERATURE: b->temperature = data; break;
    case P_DRYWET: b->drywet = data; break;
    case P_FREEWHEEL: b->freewheel = data; break;
    case P_JITTER: b->jitter = data; break;
    case P_CONNECTED: b->connected_port = data; break;
    case P_CONCEALED: b->concealed_port = data; break;
    }
}

static void *network_main(void *arg);

static void activate(LV2_Handle h) {
    Bridge *b = h;
    b->pos = 0;
    b->block = 0;
    b->latency = 0;
    b->transport_valid = 0;
    b->discontinuity = 1;
    b->last_trigger = 0;
    b->concealed = 0;
    /* Touch every page the audio thread will write (calloc's large blocks are untouched
     * mappings): a first touch in run() would be a page fault on the host's audio thread. */
    memset(b->dry, 0, (size_t)HISTORY * CHANNELS * sizeof(float));
    memset(b->wet, 0, (size_t)HISTORY * CHANNELS * sizeof(float));
    memset(b->tx, 0, SLOTS * sizeof(tx_slot));
    memset(b->rx, 0, SLOTS * sizeof(rx_slot));
    memset(b->midi, 0, MIDI_SLOTS * sizeof(midi_slot));
    for (int i = 0; i < HISTORY; i++) b->wet_pos[i] = -1;
    atomic_store(&b->tx_head, 0);
    atomic_store(&b->tx_tail, 0);
    atomic_store(&b->rx_head, 0);
    atomic_store(&b->rx_tail, 0);
    atomic_store(&b->midi_head, 0);
    atomic_store(&b->midi_tail, 0);
    atomic_store(&b->link, LINK_CONNECTING);
    atomic_store(&b->attempts, 0);
    atomic_store(&b->latency_stated, 0);
    atomic_store(&b->triggers, 0);
    atomic_store(&b->next_pos, 0);
    atomic_store(&b->first_pos, INT64_MAX);
    atomic_store(&b->block_atomic, 0);
    atomic_store(&b->host_policy, SCHED_OTHER);
    atomic_store(&b->host_priority, 0);
    atomic_store(&b->running, 1);
    b->thread_started = pthread_create(&b->thread, NULL, network_main, b) == 0;
}

static void deactivate(LV2_Handle h) {
    Bridge *b = h;
    atomic_store(&b->running, 0);
    uint64_t one = 1;
    if (write(b->efd, &one, sizeof one) < 0) { /* the thread also wakes by its poll timeout */
    }
    if (b->thread_started) pthread_join(b->thread, NULL);
    b->thread_started = 0;
}

static void cleanup(LV2_Handle h) {
    Bridge *b = h;
    close(b->efd);
    free(b->dry), free(b->wet), free(b->wet_pos), free(b->tx), free(b->rx), free(b->midi);
    free(b);
}

/* -- audio thread ---------------------------------------------------------------------------- */

/* The host's position m frames on (m < 0: back), at its tempo (transport valid and rolling). */
static void advance_position(Bridge *b, int64_t m) {
    b->daw_frame += m;
    b->bar_beat += (double)m * b->bpm * b->speed / (60.0 * b->rate);
    while (b->bar_beat >= b->beats_per_bar) {
        b->bar_beat -= b->beats_per_bar;
        b->bar++;
    }
    while (b->bar_beat < 0.0 && b->bar > 0) {
        b->bar_beat += b->beats_per_bar;
        b->bar--;
    }
    if (b->bar_beat < 0.0) b->bar_beat = 0.0; /* rounding just before bar 0 */
}

static void read_events(Bridge *b) {
    if (!b->events || !b->time_Position) return;
    LV2_ATOM_SEQUENCE_FOREACH(b->events, ev) {
        if (ev->body.type == b->midi_Event) {
            const uint8_t *msg = (const uint8_t *)(ev + 1);
            uint64_t head = atomic_load_explicit(&b->midi_head, memory_order_relaxed);
            uint8_t kind = msg[0] & 0xF0;
            if (ev->body.size == 3 && (kind == 0x80 || kind == 0x90 || kind == 0xB0) &&
                head - atomic_load_explicit(&b->midi_tail, memory_order_acquire) < MIDI_SLOTS) {
                midi_slot *s = &b->midi[head % MIDI_SLOTS];
                memcpy(s->data, msg, 3);
                s->size = 3;
                atomic_store_explicit(&b->midi_head, head + 1, memory_order_release);
            }
        } else if (ev->body.type == b->atom_Object || ev->body.type == b->atom_Blank) {
            const LV2_Atom_Object *obj = (const LV2_Atom_Object *)&ev->body;
            if (obj->body.otype != b->time_Position) continue;
            const LV2_Atom *bar = NULL, *beat = NULL, *bpb = NULL, *bpm = NULL, *speed = NULL, *frame = NULL;
            lv2_atom_object_get(obj, b->time_bar, &bar, b->time_barBeat, &beat, b->time_beatsPerBar, &bpb,
                                b->time_beatsPerMinute, &bpm, b->time_speed, &speed, b->time_frame, &frame, 0);
#define NUM(atom)                                                                                               \
    ((atom)->type == b->atom_Float    ? (double)((const LV2_Atom_Float *)(atom))->body                        \
     : (atom)->type == b->atom_Double ? ((const LV2_Atom_Double *)(atom))->body                               \
     : (atom)->type == b->atom_Int    ? (double)((const LV2_Atom_Int *)(atom))->body                          \
     : (atom)->type == b->atom_Long   ? (double)((const LV2_Atom_Long *)(atom))->body                         \
                                      : NAN)
            double old_bpm = b->bpm, old_bpb = b->beats_per_bar;
            int rolling = b->transport_valid && b->speed != 0.0;
            if (bpm) b->bpm = NUM(bpm);
            if (bpb) b->beats_per_bar = NUM(bpb);
            if (speed) b->speed = NUM(speed);
            int64_t skip = frame ? (int64_t)NUM(frame) - b->daw_frame : 0;
            int same_grid = frame && rolling && b->speed != 0.0 && b->bpm == old_bpm &&
                            b->beats_per_bar == old_bpb && llabs(skip) <= MAX_SKIP_BLOCKS * (int64_t)b->block &&
                            (double)b->bar * b->beats_per_bar + b->bar_beat >=
                                -(double)skip * b->bpm / (60.0 * b->rate); /* not before bar 0 */
            if (same_grid) {
                /* The running timeline, or a small jump on it (the host's xrun, or a position
                 * misread for one cycle): the position follows the frame on the same grid,
                 * exactly. The host's BBT is not taken here: JACK's has tick precision (1/1920
                 * beat) and, around an xrun, can lag its frame by a cycle (the timebase master
                 * computes it a cycle ahead). */
                advance_position(b, skip);
                if (skip) b->discontinuity = 1;
            } else {
                if (beat) b->bar_beat = NUM(beat);
                if (bar) b->bar = (int64_t)NUM(bar);
                if (frame) {
                    int64_t f = (int64_t)NUM(frame);
                    if (f != b->daw_frame || b->bpm != old_bpm) b->discontinuity = 1;
                    b->daw_frame = f;
                }
            }
#undef NUM
            b->transport_valid = isfinite(b->bpm) && b->bpm >= 1 && b->bpm <= 1000 && isfinite(b->beats_per_bar) &&
                                 b->beats_per_bar >= 1 && b->beats_per_bar <= 64 && isfinite(b->bar_beat) &&
                                 b->bar_beat >= 0 && b->bar_beat <= 64;
        }
    }
}

/* Queue frames [off, off + m) of this run() as one bridge frame (dropped when the ring is full:
 * the dry signal covers it). */
static void send_block(Bridge *b, uint32_t off, uint32_t m) {
    uint64_t head = atomic_load_explicit(&b->tx_head, memory_order_relaxed);
    if (head - atomic_load_explicit(&b->tx_tail, memory_order_acquire) >= SLOTS) return;
    tx_slot *s = &b->tx[head % SLOTS];
    s->pos = b->pos;
    rtvb_header *h = &s->h;
    memset(h, 0, sizeof *h);
    h->version = RTVB_VERSION;
    h->format = RTVB_FORMAT_F32;
    h->channels = CHANNELS;
    h->frames = m;
    h->sample_rate = (uint32_t)b->rate;
    h->sample_time = (uint64_t)(b->transport_valid ? b->daw_frame : b->pos);
    if (b->transport_valid) {
        h->flags = RTVB_TRANSPORT | (b->speed != 0.0 ? RTVB_PLAYING : 0) | (b->discontinuity ? RTVB_DISCONTINUITY : 0);
        h->tempo = b->bpm;
        h->bar = (int32_t)b->bar;
        h->beat = b->bar_beat;
        h->beats_per_bar = (float)b->beats_per_bar;
    }
    b->discontinuity = 0;
    for (uint32_t i = 0; i < m; i++)
        for (int c = 0; c < CHANNELS; c++) s->x[i * CHANNELS + c] = b->in[c][off + i];
    atomic_store_explicit(&b->tx_head, head + 1, memory_order_release);
    if (b->transport_valid && b->speed != 0.0) advance_position(b, m);
}

static void drain_replies(Bridge *b) {
    uint64_t tail = atomic_load_explicit(&b->rx_tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&b->rx_head, memory_order_acquire);
    for (; tail < head; tail++) {
        const rx_slot *s = &b->rx[tail % SLOTS];
        for (uint32_t i = 0; i < s->frames; i++) {
            int64_t q = s->pos + i;
            size_t k = (size_t)(q & (HISTORY - 1));
            b->wet[k * CHANNELS] = s->y[i * CHANNELS];
            b->wet[k * CHANNELS + 1] = s->y[i * CHANNELS + 1];
            b->wet_pos[k] = q;
        }
    }
    atomic_store_explicit(&b->rx_tail, tail, memory_order_release);
}

/* Freewheeling only: wait (bounded) until the reply covering timeline position q is in. */
static void wait_for_reply(Bridge *b, int64_t q) {
    double deadline = now_s() + FREEWHEEL_WAIT_S;
    while (atomic_load(&b->attempts) == 0 && now_s() < deadline) nap_us(200);
    while (atomic_load(&b->link) == LINK_UP && q >= atomic_load(&b->first_pos) && now_s() < deadline) {
        drain_replies(b);
        if (b->wet_pos[q & (HISTORY - 1)] == q) return;
        nap_us(50);
    }
}

static void run(LV2_Handle h, uint32_t n) {
    Bridge *b = h;
    if (!b->block && n) { /* the first block fixes the frame size and so the latency */
        b->block = n > MAX_BLOCK ? MAX_BLOCK : (n < 16 ? 16 : n);
        uint32_t jitter = b->jitter ? (uint32_t)clampf(roundf(*b->jitter), 1, 2) : 2;
        b->latency = (int64_t)jitter * b->block;
        atomic_store(&b->jitter_atomic, jitter);
        int policy;
        struct sched_param param;
        if (!pthread_getschedparam(pthread_self(), &policy, &param)) { /* a syscall, once, that never waits */
            atomic_store(&b->host_policy, policy);
            atomic_store(&b->host_priority, param.sched_priority);
        }
        atomic_store(&b->block_atomic, b->block);
    }
    int64_t stated = atomic_load_explicit(&b->latency_stated, memory_order_relaxed);
    if (stated > 0) b->latency = stated;
    if (b->latency_port) *b->latency_port = (float)b->latency;

    int pressed = b->trigger && *b->trigger >= 0.5f;
    if (pressed && !b->last_trigger) {
        atomic_store(&b->trigger_bars, b->bars ? (uint32_t)clampf(roundf(*b->bars), 1, 16) : 2);
        atomic_store(&b->trigger_preset, b->preset ? (uint32_t)clampf(roundf(*b->preset), 0, N_PRESETS - 1) : 3);
        atomic_store(&b->trigger_temperature_milli,
                     (uint32_t)(1000 * (b->temperature ? clampf(*b->temperature, 0.05f, 4.0f) : 1.0f)));
        atomic_fetch_add(&b->triggers, 1);
    }
    b->last_trigger = pressed;
    read_events(b);
    if (!n) return;

    int64_t start = b->pos;
    for (uint32_t off = 0; off < n;) { /* dry history, then one bridge frame per ≤ block frames */
        uint32_t m = n - off < b->block ? n - off : b->block;
        for (uint32_t i = 0; i < m; i++) {
            size_t k = (size_t)((b->pos + i) & (HISTORY - 1));
            b->dry[k * CHANNELS] = b->in[0][off + i];
            b->dry[k * CHANNELS + 1] = b->in[1][off + i];
        }
        send_block(b, off, m);
        b->pos += m;
        off += m;
    }
    atomic_store_explicit(&b->next_pos, b->pos, memory_order_release);
    uint64_t one = 1;
    if (write(b->efd, &one, sizeof one) < 0) { /* counter full: the network thread is awake anyway */
    }

    int64_t last = start + n - 1 - b->latency;
    if (b->freewheel && *b->freewheel >= 0.5f && last >= 0) wait_for_reply(b, last);
    drain_replies(b);

    float mix = b->drywet ? clampf(*b->drywet, 0.0f, 1.0f) : 1.0f;
    int concealed = 0;
    for (uint32_t i = 0; i < n; i++) {
        int64_t q = start + i - b->latency;
        if (q < 0) {
            b->out[0][i] = b->out[1][i] = 0.0f;
            continue;
        }
        size_t k = (size_t)(q & (HISTORY - 1));
        const float *dry = &b->dry[k * CHANNELS];
        if (b->wet_pos[k] == q) {
            const float *wet = &b->wet[k * CHANNELS];
            b->out[0][i] = (1.0f - mix) * dry[0] + mix * wet[0];
            b->out[1][i] = (1.0f - mix) * dry[1] + mix * wet[1];
        } else {
            b->out[0][i] = dry[0];
            b->out[1][i] = dry[1];
            concealed = 1;
        }
    }
    b->concealed += (uint64_t)concealed;
    if (b->concealed_port) *b->concealed_port = (float)b->concealed;
    if (b->connected_port) *b->connected_port = atomic_load(&b->link) == LINK_UP ? 1.0f : 0.0f;
}

/* -- network thread -------------------------------------------------------------------------- */

typedef struct {
    void *ctx, *audio, *control;
    uint32_t stream_id;
    uint64_t next_seq, request_id;
    uint32_t triggers_sent;
    int64_t seq_pos[SEQ_MAP];
    uint64_t seq_of[SEQ_MAP];
    double last_reply, last_send;
    uint8_t buf[RTVB_MAX_FRAME_BYTES];
} net;

/* Read a ZeroMQ certificate's key ("public-key" or "secret-key") as Z85 text. */
static int read_key(const char *folder, const char *file, const char *name, char out[41]) {
    char path[700], line[256];
    snprintf(path, sizeof path, "%s/%s", folder, file);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        char *p = strstr(line, name);
        char *q = p ? strchr(p, '"') : NULL;
        if (q && strlen(q + 1) >= 41 && q[41] == '"') {
            memcpy(out, q + 1, 40);
            out[40] = 0;
            found = 0;
            break;
        }
    }
    fclose(f);
    return found;
}

static void *dealer(Bridge *b, net *s, const char *endpoint) {
    void *sock = zmq_socket(s->ctx, ZMQ_DEALER);
    int zero = 0, hwm = SLOTS;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (b->keys[0]) {
        char server[41], pub[41], sec[41];
        if (!read_key(b->keys, "server.key", "public-key", server) &&
            !read_key(b->keys, "client.key_secret", "public-key", pub) &&
            !read_key(b->keys, "client.key_secret", "secret-key", sec)) {
            zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server, 41);
            zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, pub, 41);
            zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, sec, 41);
        }
    }
    zmq_connect(sock, endpoint);
    return sock;
}

static void close_sockets(net *s) {
    if (s->audio) zmq_close(s->audio);
    if (s->control) zmq_close(s->control);
    s->audio = s->control = NULL;
}

/* Frames queued while no stream is open are dropped (their dry signal plays). */
static void drop_queued(Bridge *b) {
    atomic_store_explicit(&b->tx_tail, atomic_load_explicit(&b->tx_head, memory_order_acquire),
                          memory_order_release);
}

static void go_down(Bridge *b, net *s) {
    close_sockets(s);
    atomic_store(&b->first_pos, INT64_MAX);
    atomic_store(&b->latency_stated, 0);
    atomic_store(&b->link, LINK_DOWN);
}

/* Say Hello and wait for the answer; LINK_UP on Welcome. */
static void handshake(Bridge *b, net *s) {
    close_sockets(s);
    atomic_store(&b->link, LINK_CONNECTING);
    s->audio = dealer(b, s, b->endpoint);
    size_t n = rtvb_write_hello(s->buf, sizeof s->buf, (uint32_t)b->rate, CHANNELS, atomic_load(&b->block_atomic),
                                atomic_load(&b->jitter_atomic), "rtvamp-lv2");
    zmq_send(s->audio, s->buf, n, ZMQ_DONTWAIT);
    double deadline = now_s() + HANDSHAKE_MS / 1000.0;
    while (atomic_load(&b->running) && now_s() < deadline) {
        zmq_pollitem_t item = {s->audio, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, 50) <= 0) continue;
        int got = zmq_recv(s->audio, s->buf, sizeof s->buf, ZMQ_DONTWAIT);
        rtvb_session m;
        if (got <= 0 || (size_t)got > sizeof s->buf || rtvb_read_session(s->buf, (size_t)got, &m)) continue;
        if (!strcmp(m.type, "welcome")) {
            s->stream_id = (uint32_t)m.stream_id;
            s->next_seq = 0;
            s->last_reply = s->last_send = now_s();
            char control[300];
            snprintf(control, sizeof control, "tcp://%s:%lld", b->host, (long long)m.control_port);
            s->control = dealer(b, s, control);
            int linger = 200; /* ms: a trigger sent just before the host stops still leaves */
            zmq_setsockopt(s->control, ZMQ_LINGER, &linger, sizeof linger);
            uint64_t tail = atomic_load(&b->tx_tail), head = atomic_load(&b->tx_head);
            atomic_store(&b->first_pos, tail < head ? b->tx[tail % SLOTS].pos : atomic_load(&b->next_pos));
            atomic_store(&b->latency_stated, m.latency_samples);
            atomic_store(&b->link, LINK_UP);
            atomic_fetch_add(&b->attempts, 1);
            return;
        }
        if (!strcmp(m.type, "reject")) break;
    }
    go_down(b, s);
    atomic_fetch_add(&b->attempts, 1);
}

static void send_frames(Bridge *b, net *s) {
    uint64_t tail = atomic_load_explicit(&b->tx_tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&b->tx_head, memory_order_acquire);
    for (; tail < head; tail++) {
        tx_slot *slot = &b->tx[tail % SLOTS];
        slot->h.stream_id = s->stream_id;
        slot->h.sequence = s->next_seq;
        slot->h.wall_ns = wall_ns();
        rtvb_pack_header(&slot->h, s->buf);
        size_t bytes = (size_t)slot->h.frames * CHANNELS * sizeof(float);
        memcpy(s->buf + RTVB_HEADER_BYTES, slot->x, bytes);
        s->seq_pos[s->next_seq % SEQ_MAP] = slot->pos;
        s->seq_of[s->next_seq % SEQ_MAP] = s->next_seq;
        s->next_seq++;
        if (zmq_send(s->audio, s->buf, RTVB_HEADER_BYTES + bytes, ZMQ_DONTWAIT) >= 0) s->last_send = now_s();
    }
    atomic_store_explicit(&b->tx_tail, tail, memory_order_release);
}

static void receive_replies(Bridge *b, net *s) {
    for (;;) {
        int got = zmq_recv(s->audio, s->buf, sizeof s->buf, ZMQ_DONTWAIT);
        if (got < 0) return;
        if ((size_t)got > sizeof s->buf) continue; /* truncated: not ours */
        rtvb_header h;
        if (rtvb_unpack_frame(s->buf, (size_t)got, &h) == RTVB_OK) {
            if (h.stream_id != s->stream_id || h.channels != CHANNELS || s->seq_of[h.sequence % SEQ_MAP] != h.sequence)
                continue;
            s->last_reply = now_s();
            uint64_t head = atomic_load_explicit(&b->rx_head, memory_order_relaxed);
            if (head - atomic_load_explicit(&b->rx_tail, memory_order_acquire) >= SLOTS || h.frames > MAX_BLOCK)
                continue; /* the audio thread is behind: this reply is lost, the dry covers it */
            rx_slot *slot = &b->rx[head % SLOTS];
            slot->pos = s->seq_pos[h.sequence % SEQ_MAP];
            slot->frames = h.frames;
            memcpy(slot->y, s->buf + RTVB_HEADER_BYTES, (size_t)h.frames * CHANNELS * sizeof(float));
            atomic_store_explicit(&b->rx_head, head + 1, memory_order_release);
            continue;
        }
        rtvb_session m;
        if (!rtvb_read_session(s->buf, (size_t)got, &m) && (!strcmp(m.type, "bye") || !strcmp(m.type, "notice"))) {
            go_down(b, s); /* replaced, timed out or restarted: Hello again */
            return;
        }
    }
}

static void send_control(Bridge *b, net *s) {
    uint32_t triggers = atomic_load(&b->triggers);
    if (triggers != s->triggers_sent) {
        s->triggers_sent = triggers;
        size_t n = rtvb_write_trigger(s->buf, sizeof s->buf, ++s->request_id, atomic_load(&b->trigger_bars),
                                      PRESETS[atomic_load(&b->trigger_preset) % N_PRESETS],
                                      atomic_load(&b->trigger_temperature_milli) / 1000.0);
        zmq_send(s->control, s->buf, n, ZMQ_DONTWAIT);
    }
    uint64_t tail = atomic_load_explicit(&b->midi_tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&b->midi_head, memory_order_acquire);
    for (; tail < head; tail++) {
        const midi_slot *m = &b->midi[tail % MIDI_SLOTS];
        size_t n = rtvb_write_midi(s->buf, sizeof s->buf, ++s->request_id, m->data, m->size);
        zmq_send(s->control, s->buf, n, ZMQ_DONTWAIT);
    }
    atomic_store_explicit(&b->midi_tail, tail, memory_order_release);
    while (zmq_recv(s->control, s->buf, sizeof s->buf, ZMQ_DONTWAIT) >= 0) {
        /* replies (ok / failed) need no action: the engine's state shows the outcome */
    }
}

/* Once the host's audio thread has run: real-time scheduling below it for this thread and for
 * ZeroMQ's threads (set on the context before its first socket starts them). libzmq aborts
 * the process when it cannot apply a scheduling policy, so the context gets one only after
 * this thread obtained the same. */
static void follow_host_scheduling(Bridge *b, void *ctx) {
    int policy = atomic_load(&b->host_policy);
    if ((policy != SCHED_FIFO && policy != SCHED_RR) || atomic_load(&b->host_priority) <= NET_PRIORITY) return;
    struct sched_param param = {.sched_priority = NET_PRIORITY};
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &param)) return; /* not permitted */
    zmq_ctx_set(ctx, ZMQ_THREAD_SCHED_POLICY, SCHED_FIFO);
    zmq_ctx_set(ctx, ZMQ_THREAD_PRIORITY, NET_PRIORITY);
}

static void *network_main(void *arg) {
    Bridge *b = arg;
    net *s = calloc(1, sizeof *s);
    if (!s) {
        atomic_store(&b->link, LINK_DOWN);
        atomic_fetch_add(&b->attempts, 1);
        return NULL;
    }
    s->ctx = zmq_ctx_new();
    double next_try = 0.0;
    int scheduled = 0;
    while (atomic_load(&b->running)) {
        int link = atomic_load(&b->link);
        if (link != LINK_UP) {
            if (!atomic_load(&b->block_atomic) || now_s() < next_try) { /* no block size yet, or resting */
                if (atomic_load(&b->attempts) > 0) drop_queued(b);
                nap_us(5000);
                continue;
            }
            if (!scheduled) { /* before the first socket */
                follow_host_scheduling(b, s->ctx);
                scheduled = 1;
            }
            handshake(b, s); /* frames queued meanwhile are sent once the stream is open */
            if (atomic_load(&b->link) != LINK_UP) {
                drop_queued(b);
                next_try = now_s() + RETRY_MS / 1000.0;
            }
            continue;
        }
        zmq_pollitem_t items[3] = {{s->audio, 0, ZMQ_POLLIN, 0}, {s->control, 0, ZMQ_POLLIN, 0},
                                   {NULL, b->efd, ZMQ_POLLIN, 0}};
        zmq_poll(items, 3, 50);
        uint64_t count;
        if (read(b->efd, &count, sizeof count) < 0 && errno != EAGAIN) break;
        send_frames(b, s);
        receive_replies(b, s);
        if (atomic_load(&b->link) != LINK_UP) continue;
        send_control(b, s);
        if (s->last_send - s->last_reply > SILENCE_MS / 1000.0) { /* sending into the void: engine gone */
            go_down(b, s);
            next_try = now_s() + RETRY_MS / 1000.0;
        }
    }
    if (s->audio && atomic_load(&b->link) == LINK_UP) {
        size_t n = rtvb_write_bye(s->buf, sizeof s->buf, s->stream_id, "client");
        zmq_send(s->audio, s->buf, n, ZMQ_DONTWAIT);
    }
    close_sockets(s);
    zmq_ctx_term(s->ctx);
    free(s);
    return NULL;
}

/* -- descriptor ------------------------------------------------------------------------------ */

static const void *extension_data(const char *uri) {
    (void)uri;
    return NULL;
}

static const LV2_Descriptor descriptor = {PLUGIN_URI, instantiate, connect_port, activate, run, deactivate, cleanup,
                                          extension_data};

LV2_SYMBOL_EXPORT const LV2_Descriptor *lv2_descriptor(uint32_t index) { return index == 0 ? &descriptor : NULL; }
