/* Checks the C wire format against bridge/vectors (driven by tests/test_lv2.py):
 *   wire_test frame FILE        decode a frame → JSON (status, header, samples, reencoded)
 *   wire_test session FILE      decode a session message → JSON
 *   wire_test hello RATE CH BLOCK JITTER CLIENT    write a hello to stdout
 *   wire_test bye STREAM REASON                    write a bye to stdout */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rtvb_wire.h"

static size_t slurp(const char *path, uint8_t *buf, size_t cap) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    size_t n = fread(buf, 1, cap, f);
    fclose(f);
    return n;
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') putchar('\\');
        putchar(*s);
    }
    putchar('"');
}

static uint8_t buf[RTVB_MAX_FRAME_BYTES + 16];
static uint8_t again[RTVB_MAX_FRAME_BYTES + 16];

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "frame") == 0) {
        size_t n = slurp(argv[2], buf, sizeof buf);
        rtvb_header h;
        enum rtvb_status st = rtvb_unpack_frame(buf, n, &h);
        printf("{\"status\": \"%s\"", rtvb_status_name(st));
        if (st == RTVB_OK) {
            printf(", \"header\": {\"version\": %u, \"format\": %u, \"channels\": %u, \"flags\": %u, "
                   "\"stream_id\": %u, \"frames\": %u, \"sequence\": %llu, \"sample_time\": %llu, "
                   "\"wall_ns\": %llu, \"sample_rate\": %u, \"bar\": %d, \"beat\": %.17g, \"tempo\": %.17g, "
                   "\"beats_per_bar\": %.9g}, \"samples\": [",
                   h.version, h.format, h.channels, h.flags, h.stream_id, h.frames,
                   (unsigned long long)h.sequence, (unsigned long long)h.sample_time,
                   (unsigned long long)h.wall_ns, h.sample_rate, h.bar, h.beat, h.tempo, h.beats_per_bar);
            const float *x = (const float *)(buf + RTVB_HEADER_BYTES);
            for (size_t i = 0; i < (size_t)h.frames * h.channels; i++) printf(i ? ", %.9g" : "%.9g", x[i]);
            rtvb_pack_header(&h, again);
            memcpy(again + RTVB_HEADER_BYTES, buf + RTVB_HEADER_BYTES, n - RTVB_HEADER_BYTES);
            printf("], \"reencoded\": %s", memcmp(again, buf, n) == 0 ? "true" : "false");
        }
        printf("}\n");
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "session") == 0) {
        size_t n = slurp(argv[2], buf, sizeof buf);
        rtvb_session s;
        int rc = rtvb_read_session(buf, n, &s);
        printf("{\"status\": \"%s\", \"type\": ", rc == 0 ? "ok" : "malformed");
        json_str(s.type);
        printf(", \"version\": %lld, \"stream_id\": %lld, \"sample_rate\": %lld, \"channels\": %lld, "
               "\"block_frames\": %lld, \"jitter_blocks\": %lld, \"latency_samples\": %lld, "
               "\"control_port\": %lld, \"state_port\": %lld, \"code\": ",
               (long long)s.version, (long long)s.stream_id, (long long)s.sample_rate, (long long)s.channels,
               (long long)s.block_frames, (long long)s.jitter_blocks, (long long)s.latency_samples,
               (long long)s.control_port, (long long)s.state_port);
        json_str(s.code);
        printf(", \"message\": ");
        json_str(s.message);
        printf(", \"engine\": ");
        json_str(s.engine);
        printf("}\n");
        return 0;
    }
    size_t n = 0;
    if (argc == 7 && strcmp(argv[1], "hello") == 0)
        n = rtvb_write_hello(buf, sizeof buf, (uint32_t)atoi(argv[2]), (uint32_t)atoi(argv[3]),
                             (uint32_t)atoi(argv[4]), (uint32_t)atoi(argv[5]), argv[6]);
    else if (argc == 4 && strcmp(argv[1], "bye") == 0)
        n = rtvb_write_bye(buf, sizeof buf, (uint32_t)atoi(argv[2]), argv[3]);
    else {
        fprintf(stderr, "usage: wire_test frame|session FILE | hello RATE CH BLOCK JITTER CLIENT | bye ID REASON\n");
        return 2;
    }
    fwrite(buf, 1, n, stdout);
    return n ? 0 : 1;
}
