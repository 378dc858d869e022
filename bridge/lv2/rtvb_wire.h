/* The rtvamp bridge wire format in C (bridge/PROTOCOL.md): audio frame headers and the few
 * msgpack messages a plugin sends (hello, trigger, midi) and reads (welcome, reject, bye,
 * notice). No allocation; every function works on caller buffers. */
#ifndef RTVB_WIRE_H
#define RTVB_WIRE_H

#include <stddef.h>
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "rtvb_wire assumes a little-endian host"
#endif

#define RTVB_VERSION 1
#define RTVB_HEADER_BYTES 68
#define RTVB_FORMAT_F32 1
#define RTVB_MAX_CHANNELS 8
#define RTVB_MAX_FRAMES 8192
#define RTVB_MAX_FRAME_BYTES (RTVB_HEADER_BYTES + RTVB_MAX_FRAMES * RTVB_MAX_CHANNELS * 4)

enum rtvb_flag {
    RTVB_PLAYING = 1,
    RTVB_TRANSPORT = 2,
    RTVB_DISCONTINUITY = 4,
    RTVB_CONCEALED = 8,
};

/* Decoding results; the nonzero ones name the counter a receiver increments. */
enum rtvb_status { RTVB_OK = 0, RTVB_MALFORMED = 1, RTVB_OVERSIZED = 2, RTVB_WRONG_VERSION = 3 };

typedef struct {
    uint8_t version, format, channels, flags;
    uint32_t stream_id, frames;
    uint64_t sequence, sample_time, wall_ns; /* frames, frames, ns since the Unix epoch */
    uint32_t sample_rate;                     /* Hz */
    int32_t bar;
    double beat, tempo; /* beat within the bar, BPM */
    float beats_per_bar;
} rtvb_header;

/* Write the 68-byte header. */
void rtvb_pack_header(const rtvb_header *h, uint8_t out[RTVB_HEADER_BYTES]);

/* Check a whole frame (header + samples) of `size` bytes and read its header. The samples
 * start at buf + RTVB_HEADER_BYTES. */
enum rtvb_status rtvb_unpack_frame(const uint8_t *buf, size_t size, rtvb_header *h);

const char *rtvb_status_name(enum rtvb_status status);

/* msgpack messages. Writers return the bytes written, 0 when `cap` is too small. */
size_t rtvb_write_hello(uint8_t *out, size_t cap, uint32_t sample_rate, uint32_t channels, uint32_t block_frames,
                        uint32_t jitter_blocks, const char *client);
size_t rtvb_write_trigger(uint8_t *out, size_t cap, uint64_t id, uint32_t bars, const char *preset,
                          double temperature);
size_t rtvb_write_midi(uint8_t *out, size_t cap, uint64_t id, const uint8_t *data, size_t n);
size_t rtvb_write_bye(uint8_t *out, size_t cap, uint32_t stream_id, const char *reason);

/* The fields of a session message the plugin reads (absent ones stay 0 / ""). */
typedef struct {
    char type[16];
    int64_t version, stream_id, sample_rate, channels, block_frames, jitter_blocks, latency_samples, control_port,
        state_port;
    char code[32];
    char message[160];
    char engine[64];
} rtvb_session;

/* Parse a msgpack session message; 0 on success, -1 when it is not a map with a "type". */
int rtvb_read_session(const uint8_t *buf, size_t size, rtvb_session *out);

#endif
