/* jack_probe — a measuring JACK client for the plugin-in-a-real-host tests (tests/test_lv2_host.py).
 *
 *   jack_probe NAME SIGNAL FRAMES INPUTS OUT [options]
 *
 * Two JACK clients, so that a path src → host → rec has no feedback loop (JACK runs the three
 * in one cycle, in graph order, and adds no delay of its own on such a path):
 *   NAME-src  outputs out_1, out_2 and a MIDI output midi_out: from JACK frame START on it plays
 *             SIGNAL (raw float32, 2 channels interleaved; zeros after its end) and its MIDI events;
 *   NAME-rec  INPUTS audio inputs in_1 … in_INPUTS: records frames [START, START + FRAMES) of JACK's
 *             frame clock, and each cycle's transport state and position.
 * START = the JACK frame of the cycle in which the ports are connected, plus 16 periods (a cycle
 * boundary: recorded blocks of one period are the host's blocks). Both clients index
 * everything by JACK's frame clock (jack_last_frame_time), so a cycle that a client misses
 * leaves a gap (NaN in the recording) but never shifts anything.
 *
 * Options:
 *   -c SRC DST        connect two ports first (any number; "src:" and "rec:" abbreviate this
 *                     probe's clients, e.g. -c src:out_1 jalv:in_l -c jalv:out_l rec:in_2)
 *   -t BPM BPB        be JACK's timebase master: BBT from the transport frame, exactly, every
 *                     cycle (bar 1 beat 1 tick 0 at frame 0), ticks_per_beat 1920, beat_type 4
 *   -r                locate the transport to frame 0 and start it when recording starts (and
 *                     stop it when recording ends)
 *   -m FRAME B0 B1 B2 a MIDI event on midi_out at FRAME frames after START (any number)
 *
 * Writes OUT (float32 [FRAMES, INPUTS], NaN where rec did not run), OUT.cycles (one line per
 * recorded rec cycle: JACK frame, transport state, transport frame, BBT valid, bar, beat, tick,
 * bpm), OUT.src (the JACK frame of each cycle src played) and OUT.xruns (JACK's frame clock when
 * each xrun was reported: a cycle that a client did not finish in time), then prints a summary line
 * ("done start=… xruns=…") on stdout. Real-time rule: the process callbacks only copy into
 * buffers allocated before activation.
 *
 * Needs only libjack.so.0 (in jackd2): where <jack/jack.h> is missing (no libjack-jackd2-dev)
 * the few declarations used are made here; JACK's client ABI is stable, and with the real
 * headers present the layout of jack_position_t is checked against them at compile time. */
#define _GNU_SOURCE
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__has_include) && !defined(PROBE_OWN_JACK_DECLARATIONS)
#if __has_include(<jack/jack.h>)
#define PROBE_JACK_HEADERS 1
#endif
#endif

#ifdef PROBE_JACK_HEADERS
#include <jack/jack.h>
#include <jack/midiport.h>
#include <jack/transport.h>
_Static_assert(offsetof(jack_position_t, frame) == 20 && offsetof(jack_position_t, valid) == 24 &&
                   offsetof(jack_position_t, bar) == 28 && offsetof(jack_position_t, tick) == 36 &&
                   offsetof(jack_position_t, bar_start_tick) == 40 &&
                   offsetof(jack_position_t, beats_per_bar) == 48 &&
                   offsetof(jack_position_t, ticks_per_beat) == 56 &&
                   offsetof(jack_position_t, beats_per_minute) == 64 && sizeof(jack_position_t) <= 256,
               "jack_position_t differs from the declarations below");
#else
typedef uint32_t jack_nframes_t;
typedef struct _jack_client jack_client_t;
typedef struct _jack_port jack_port_t;
typedef enum { JackTransportStopped = 0, JackTransportRolling = 1, JackTransportStarting = 3 } jack_transport_state_t;
typedef enum { JackPositionBBT = 0x10 } jack_position_bits_t;
typedef enum { JackCaptureLatency, JackPlaybackLatency } jack_latency_callback_mode_t;
enum { JackNullOption = 0, JackNoStartServer = 1, JackUseExactName = 2 };
enum { JackPortIsInput = 1, JackPortIsOutput = 2 };
#define JACK_DEFAULT_AUDIO_TYPE "32 bit float mono audio"
#define JACK_DEFAULT_MIDI_TYPE "8 bit raw midi"
typedef struct __attribute__((packed)) {
    uint64_t unique_1, usecs;
    jack_nframes_t frame_rate, frame;
    jack_position_bits_t valid;
    int32_t bar, beat, tick;
    double bar_start_tick;
    float beats_per_bar, beat_type;
    double ticks_per_beat, beats_per_minute;
    uint8_t rest[256 - 72]; /* JACK's own fields after these (136 bytes in all in jackd2 1.9) */
} jack_position_t;
typedef int (*JackProcessCallback)(jack_nframes_t, void *);
typedef int (*JackXRunCallback)(void *);
typedef void (*JackTimebaseCallback)(jack_transport_state_t, jack_nframes_t, jack_position_t *, int, void *);
jack_client_t *jack_client_open(const char *name, int options, int *status, ...);
int jack_client_close(jack_client_t *);
int jack_activate(jack_client_t *);
int jack_deactivate(jack_client_t *);
const char *jack_get_client_name(jack_client_t *);
jack_nframes_t jack_get_buffer_size(jack_client_t *);
jack_nframes_t jack_get_sample_rate(jack_client_t *);
int jack_set_process_callback(jack_client_t *, JackProcessCallback, void *);
int jack_set_xrun_callback(jack_client_t *, JackXRunCallback, void *);
jack_port_t *jack_port_register(jack_client_t *, const char *name, const char *type, unsigned long flags,
                                unsigned long buffer_size);
void *jack_port_get_buffer(jack_port_t *, jack_nframes_t);
int jack_connect(jack_client_t *, const char *src, const char *dst);
jack_nframes_t jack_frame_time(const jack_client_t *);
jack_nframes_t jack_last_frame_time(const jack_client_t *);
jack_transport_state_t jack_transport_query(const jack_client_t *, jack_position_t *);
int jack_transport_locate(jack_client_t *, jack_nframes_t);
void jack_transport_start(jack_client_t *);
void jack_transport_stop(jack_client_t *);
int jack_set_timebase_callback(jack_client_t *, int conditional, JackTimebaseCallback, void *);
void jack_midi_clear_buffer(void *);
int jack_midi_event_write(void *, jack_nframes_t time, const uint8_t *data, size_t size);
#endif

#define MAX_INPUTS 8
#define MAX_MIDI 64
#define MAX_CONNECTIONS 32
#define LEAD_PERIODS 16
#define MAX_XRUNS 1024

typedef struct {
    int64_t at; /* frames after START */
    uint8_t data[3];
} midi_event;

typedef struct {
    uint32_t jack_frame, transport_frame;
    int state, valid, bar, beat, tick;
    double bpm;
} cycle_record;

typedef struct {
    jack_client_t *src, *rec;
    jack_port_t *out[2], *midi_out, *in[MAX_INPUTS];
    int inputs;
    uint32_t rate, period;
    const float *signal; /* [signal_frames × 2] */
    int64_t signal_frames, frames;
    float *take;         /* [frames × inputs] */
    cycle_record *cycles;
    uint32_t *src_cycles;
    int64_t max_cycles;
    _Atomic int64_t n_cycles, n_src_cycles;
    midi_event midi[MAX_MIDI];
    int n_midi;
    _Atomic int armed;   /* START is valid */
    _Atomic uint32_t start;
    _Atomic int done;
    _Atomic int xruns;
    uint32_t xrun_frames[MAX_XRUNS]; /* JACK's frame clock when each xrun was reported */
    double bpm, bpb;     /* timebase master when bpm > 0 */
} probe;

/* frames from START to JACK frame f (JACK's frame clock wraps at 2^32) */
static int64_t since_start(probe *p, uint32_t f) { return (int64_t)(int32_t)(f - atomic_load(&p->start)); }

static int src_process(jack_nframes_t n, void *arg) {
    probe *p = arg;
    float *out[2] = {jack_port_get_buffer(p->out[0], n), jack_port_get_buffer(p->out[1], n)};
    void *midi = jack_port_get_buffer(p->midi_out, n);
    jack_midi_clear_buffer(midi);
    int64_t k0 = atomic_load(&p->armed) ? since_start(p, jack_last_frame_time(p->src)) : INT64_MIN / 2;
    for (jack_nframes_t i = 0; i < n; i++) {
        int64_t k = k0 + i;
        int inside = k >= 0 && k < p->signal_frames;
        out[0][i] = inside ? p->signal[2 * k] : 0.0f;
        out[1][i] = inside ? p->signal[2 * k + 1] : 0.0f;
    }
    for (int e = 0; e < p->n_midi; e++)
        if (p->midi[e].at >= k0 && p->midi[e].at < k0 + n)
            jack_midi_event_write(midi, (jack_nframes_t)(p->midi[e].at - k0), p->midi[e].data, 3);
    if (k0 + (int64_t)n > 0 && k0 < p->frames) {
        int64_t c = atomic_load(&p->n_src_cycles);
        if (c < p->max_cycles) {
            p->src_cycles[c] = jack_last_frame_time(p->src);
            atomic_store(&p->n_src_cycles, c + 1);
        }
    }
    return 0;
}

static int rec_process(jack_nframes_t n, void *arg) {
    probe *p = arg;
    if (!atomic_load(&p->armed)) return 0;
    uint32_t f = jack_last_frame_time(p->rec);
    int64_t k0 = since_start(p, f);
    if (k0 + (int64_t)n <= 0 || k0 >= p->frames) {
        if (k0 >= p->frames) atomic_store(&p->done, 1);
        return 0;
    }
    for (int c = 0; c < p->inputs; c++) {
        const float *in = jack_port_get_buffer(p->in[c], n);
        for (jack_nframes_t i = 0; i < n; i++) {
            int64_t k = k0 + i;
            if (k >= 0 && k < p->frames) p->take[k * p->inputs + c] = in[i];
        }
    }
    int64_t c = atomic_load(&p->n_cycles);
    if (c < p->max_cycles) {
        jack_position_t pos;
        memset(&pos, 0, sizeof pos);
        cycle_record *r = &p->cycles[c];
        r->jack_frame = f;
        r->state = (int)jack_transport_query(p->rec, &pos);
        r->transport_frame = pos.frame;
        r->valid = (pos.valid & JackPositionBBT) != 0;
        r->bar = pos.bar;
        r->beat = pos.beat;
        r->tick = pos.tick;
        r->bpm = pos.beats_per_minute;
        atomic_store(&p->n_cycles, c + 1);
    }
    return 0;
}

/* Exact BBT from the transport frame, every cycle. */
static void timebase(jack_transport_state_t state, jack_nframes_t n, jack_position_t *pos, int new_pos, void *arg) {
    (void)state, (void)n, (void)new_pos;
    probe *p = arg;
    const double ticks_per_beat = 1920.0;
    double beats = (double)pos->frame * p->bpm / (60.0 * pos->frame_rate);
    double whole = floor(beats);
    int64_t bar = (int64_t)floor(whole / p->bpb);
    pos->valid = JackPositionBBT;
    pos->bar = (int32_t)bar + 1;
    pos->beat = (int32_t)(whole - (double)bar * p->bpb) + 1;
    pos->tick = (int32_t)floor((beats - whole) * ticks_per_beat);
    pos->bar_start_tick = (double)bar * p->bpb * ticks_per_beat;
    pos->beats_per_bar = (float)p->bpb;
    pos->beat_type = 4.0f;
    pos->ticks_per_beat = ticks_per_beat;
    pos->beats_per_minute = p->bpm;
}

static int on_xrun(void *arg) {
    probe *p = arg;
    int k = atomic_fetch_add(&p->xruns, 1);
    if (k < MAX_XRUNS) p->xrun_frames[k] = jack_frame_time(p->rec);
    return 0;
}

static void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void die(const char *what) {
    fprintf(stderr, "jack_probe: %s\n", what);
    exit(2);
}

/* "src:out_1" → "NAME-src:out_1"; any other name unchanged */
static void port_name(const char *name, const char *client, char *out, size_t cap) {
    if (!strncmp(name, "src:", 4) || !strncmp(name, "rec:", 4))
        snprintf(out, cap, "%s-%.3s:%s", client, name, name + 4);
    else
        snprintf(out, cap, "%s", name);
}

static void write_all(const char *path, const void *data, size_t bytes) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, bytes, f) != bytes || fclose(f)) die("cannot write the recording");
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: jack_probe NAME SIGNAL FRAMES INPUTS OUT [-c SRC DST]... [-t BPM BPB] [-r] "
                        "[-m FRAME B0 B1 B2]...\n");
        return 2;
    }
    probe *p = calloc(1, sizeof *p);
    const char *name = argv[1], *out_path = argv[5];
    p->frames = atoll(argv[3]);
    p->inputs = atoi(argv[4]);
    if (p->frames <= 0 || p->inputs < 1 || p->inputs > MAX_INPUTS) die("bad FRAMES or INPUTS");
    const char *connections[MAX_CONNECTIONS][2];
    int n_connections = 0, roll = 0;
    for (int i = 6; i < argc; i++) {
        if (!strcmp(argv[i], "-c") && i + 2 < argc && n_connections < MAX_CONNECTIONS) {
            connections[n_connections][0] = argv[i + 1];
            connections[n_connections++][1] = argv[i + 2];
            i += 2;
        } else if (!strcmp(argv[i], "-t") && i + 2 < argc) {
            p->bpm = atof(argv[i + 1]);
            p->bpb = atof(argv[i + 2]);
            i += 2;
        } else if (!strcmp(argv[i], "-r")) {
            roll = 1;
        } else if (!strcmp(argv[i], "-m") && i + 4 < argc && p->n_midi < MAX_MIDI) {
            midi_event *e = &p->midi[p->n_midi++];
            e->at = atoll(argv[i + 1]);
            for (int b = 0; b < 3; b++) e->data[b] = (uint8_t)strtol(argv[i + 2 + b], NULL, 0);
            i += 4;
        } else {
            die("bad option");
        }
    }

    /* the signal */
    FILE *f = fopen(argv[2], "rb");
    if (!f) die("cannot read SIGNAL");
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *signal = malloc((size_t)bytes + 8);
    if (!signal || fread(signal, 1, (size_t)bytes, f) != (size_t)bytes) die("cannot read SIGNAL");
    fclose(f);
    p->signal = signal;
    p->signal_frames = bytes / (long)(2 * sizeof(float));

    /* the clients */
    char client_name[128];
    snprintf(client_name, sizeof client_name, "%s-src", name);
    p->src = jack_client_open(client_name, JackNoStartServer | JackUseExactName, NULL);
    snprintf(client_name, sizeof client_name, "%s-rec", name);
    p->rec = jack_client_open(client_name, JackNoStartServer | JackUseExactName, NULL);
    if (!p->src || !p->rec) die("cannot open the JACK clients (is the server running?)");
    p->rate = jack_get_sample_rate(p->rec);
    p->period = jack_get_buffer_size(p->rec);
    p->out[0] = jack_port_register(p->src, "out_1", JACK_DEFAULT_AUDIO_TYPE, JackPortIsOutput, 0);
    p->out[1] = jack_port_register(p->src, "out_2", JACK_DEFAULT_AUDIO_TYPE, JackPortIsOutput, 0);
    p->midi_out = jack_port_register(p->src, "midi_out", JACK_DEFAULT_MIDI_TYPE, JackPortIsOutput, 0);
    for (int c = 0; c < p->inputs; c++) {
        char port[32];
        snprintf(port, sizeof port, "in_%d", c + 1);
        p->in[c] = jack_port_register(p->rec, port, JACK_DEFAULT_AUDIO_TYPE, JackPortIsInput, 0);
        if (!p->in[c]) die("cannot register ports");
    }
    if (!p->out[0] || !p->out[1] || !p->midi_out) die("cannot register ports");
    p->take = malloc((size_t)p->frames * p->inputs * sizeof(float));
    p->max_cycles = p->frames / p->period + 4;
    p->cycles = calloc((size_t)p->max_cycles, sizeof(cycle_record));
    p->src_cycles = calloc((size_t)p->max_cycles, sizeof(uint32_t));
    if (!p->take || !p->cycles || !p->src_cycles) die("out of memory");
    for (int64_t k = 0; k < p->frames * p->inputs; k++) p->take[k] = NAN;
    /* touched here, not first in a process callback (a page fault there is an xrun risk) */
    memset(p->cycles, 0, (size_t)p->max_cycles * sizeof(cycle_record));
    memset(p->src_cycles, 0, (size_t)p->max_cycles * sizeof(uint32_t));

    jack_set_process_callback(p->src, src_process, p);
    jack_set_process_callback(p->rec, rec_process, p);
    jack_set_xrun_callback(p->rec, on_xrun, p);
    if (p->bpm > 0 && jack_set_timebase_callback(p->rec, 0, timebase, p)) die("cannot become timebase master");
    if (jack_activate(p->src) || jack_activate(p->rec)) die("cannot activate");
    for (int i = 0; i < n_connections; i++) {
        char a[256], b[256];
        port_name(connections[i][0], name, a, sizeof a);
        port_name(connections[i][1], name, b, sizeof b);
        if (jack_connect(p->src, a, b)) {
            fprintf(stderr, "jack_probe: cannot connect %s to %s\n", a, b);
            return 2;
        }
    }

    /* start on a cycle boundary a few periods ahead (the new graph is in place by then): each
     * recorded period is then one cycle of the host, then wait for the end */
    atomic_store(&p->start, jack_last_frame_time(p->rec) + LEAD_PERIODS * p->period);
    atomic_store(&p->armed, 1);
    if (roll) {
        while (since_start(p, jack_frame_time(p->rec)) < 0) nap_ms(1);
        jack_transport_locate(p->rec, 0);
        jack_transport_start(p->rec);
    }
    double limit_s = 10.0 + 3.0 * (double)p->frames / p->rate;
    for (double waited = 0; !atomic_load(&p->done); waited += 0.005) {
        if (waited > limit_s) die("the recording did not finish (is JACK running its cycles?)");
        nap_ms(5);
    }
    if (roll) jack_transport_stop(p->rec);
    jack_deactivate(p->src);
    jack_deactivate(p->rec);

    write_all(out_path, p->take, (size_t)p->frames * p->inputs * sizeof(float));
    char path[1024];
    snprintf(path, sizeof path, "%s.cycles", out_path);
    FILE *cy = fopen(path, "w");
    if (!cy) die("cannot write the cycles");
    for (int64_t c = 0; c < atomic_load(&p->n_cycles); c++) {
        cycle_record *r = &p->cycles[c];
        fprintf(cy, "%u %d %u %d %d %d %d %.17g\n", r->jack_frame, r->state, r->transport_frame, r->valid,
                r->bar, r->beat, r->tick, r->bpm);
    }
    fclose(cy);
    snprintf(path, sizeof path, "%s.src", out_path);
    FILE *sc = fopen(path, "w");
    if (!sc) die("cannot write the src cycles");
    for (int64_t c = 0; c < atomic_load(&p->n_src_cycles); c++) fprintf(sc, "%u\n", p->src_cycles[c]);
    fclose(sc);
    snprintf(path, sizeof path, "%s.xruns", out_path);
    FILE *xr = fopen(path, "w");
    if (!xr) die("cannot write the xruns");
    for (int k = 0; k < atomic_load(&p->xruns) && k < MAX_XRUNS; k++) fprintf(xr, "%u\n", p->xrun_frames[k]);
    fclose(xr);
    printf("done start=%u period=%u rate=%u xruns=%d\n", atomic_load(&p->start), p->period, p->rate,
           atomic_load(&p->xruns));
    jack_client_close(p->src);
    jack_client_close(p->rec);
    return 0;
}
