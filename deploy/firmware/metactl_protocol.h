/*
 * metactl serial protocol v1, robot side: CRC-32, COBS, frames and messages.
 *
 * The specification is docs/protocol.md; the reference codec is deploy/protocol.py (messages: deploy/messages.py), and
 * tests/deploy/test_firmware.py checks this file against it byte for byte.
 *
 * Portable C99: no malloc, no OS calls, fixed-size buffers, wire bytes read and written one by one
 * in little-endian order (never by casting a struct onto a buffer). Needs IEEE-754 binary32 `float`
 * and binary64 `double` (checked at compile time), <string.h> for memcpy/memset, nothing else.
 */
#ifndef METACTL_PROTOCOL_H
#define METACTL_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define METACTL_PROTOCOL_VERSION 1u
#define METACTL_HEADER_SIZE 6u /* u8 version, u8 type, u16 seq, u16 payload length */
#define METACTL_CRC_SIZE 4u
#define METACTL_MAX_PAYLOAD 1024u
#define METACTL_MAX_FRAME_SIZE (METACTL_HEADER_SIZE + METACTL_MAX_PAYLOAD + METACTL_CRC_SIZE) /* 1034 */
/* COBS adds one code byte per started block of 254 bytes: n + n / 254 + 1 bounds it. */
#define METACTL_MAX_ENCODED_SIZE (METACTL_MAX_FRAME_SIZE + METACTL_MAX_FRAME_SIZE / 254u + 1u) /* 1039 */
#define METACTL_MAX_WIRE_SIZE (METACTL_MAX_ENCODED_SIZE + 1u) /* with the 0x00 delimiter */
#define METACTL_MAX_STRING 255u                             /* u8 byte count */

/* Joint arrays are sized for this many joints; frames with more are rejected as "payload" errors.
 * Override with -DMETACTL_MAX_JOINTS=N (the protocol itself allows up to 79 in a State). */
#ifndef METACTL_MAX_JOINTS
#define METACTL_MAX_JOINTS 32u
#endif

typedef enum {
    METACTL_MSG_HELLO = 0x01,
    METACTL_MSG_CAPABILITIES = 0x02,
    METACTL_MSG_STATE = 0x10,
    METACTL_MSG_COMMAND = 0x11,
    METACTL_MSG_MODE = 0x12,
    METACTL_MSG_RESET = 0x13,
    METACTL_MSG_HEARTBEAT = 0x20,
    METACTL_MSG_ESTOP = 0x30,
    METACTL_MSG_FAULT = 0x31
} metactl_message_type;

typedef enum {
    METACTL_MODE_PASSIVE = 0,  /* no torque */
    METACTL_MODE_DAMPING = 1,  /* kp = 0, kd > 0 on every joint */
    METACTL_MODE_POSITION = 2, /* PD to the targets of the latest Command */
    METACTL_MODE_ESTOP = 3     /* damping, latched until a Reset */
} metactl_mode;

typedef enum {
    METACTL_FAULT_WATCHDOG = 1,      /* no Command for 50 ms in POSITION: dropped to DAMPING */
    METACTL_FAULT_LIMIT_CLAMPED = 2, /* a target, gain or torque was clamped to the limits */
    METACTL_FAULT_ESTOP_LATCHED = 3, /* ModeRequest or Command while in ESTOP: send Reset first */
    METACTL_FAULT_BAD_COMMAND = 4,   /* wrong joint count or non-finite values; ignored */
    METACTL_FAULT_BAD_REQUEST = 5    /* a message the robot cannot serve now; the text says why */
} metactl_fault_code;

#define METACTL_CAP_RESET_SUPPORTED 0x0001u
#define METACTL_CAP_LOCKSTEP 0x0002u
#define METACTL_CAP_BASE_VELOCITY 0x0004u

#define METACTL_STATE_FALLEN 0x01u
#define METACTL_STATE_EPISODE_START 0x02u

#define METACTL_RESET_REQUEST 0u
#define METACTL_RESET_DONE 0u
#define METACTL_RESET_REFUSED 1u

/* Result of every call that can fail. The frame errors come in the order the decoder checks them
 * and carry the names of `ProtocolError.kind` in deploy/protocol.py (see metactl_status_name). */
typedef enum {
    METACTL_OK = 0,
    METACTL_ERR_OVERSIZE, /* encoded frame longer than METACTL_MAX_ENCODED_SIZE */
    METACTL_ERR_COBS,     /* not valid COBS */
    METACTL_ERR_SHORT,    /* fewer than header + CRC bytes */
    METACTL_ERR_CRC,      /* CRC-32 mismatch: checked before any header field is trusted */
    METACTL_ERR_VERSION,  /* protocol version is not 1 */
    METACTL_ERR_LENGTH,   /* header length != payload size */
    METACTL_ERR_TYPE,     /* unknown message type */
    METACTL_ERR_PAYLOAD,  /* payload does not match its message layout */
    METACTL_ERR_BUFFER,   /* the output buffer is too small */
    METACTL_ERR_INVALID   /* a message or configuration that cannot be encoded or used */
} metactl_status;

/* A protocol string: UTF-8, `length` bytes. Decoding also NUL-terminates `bytes` for convenience;
 * `length` is what counts (UTF-8 may contain U+0000). */
typedef struct {
    uint8_t length;
    char bytes[METACTL_MAX_STRING + 1u];
} metactl_string;

typedef struct {
    uint8_t protocol_version;
    metactl_string host_name;
} metactl_hello;

/* Joint names are packed back to back in `name_bytes`: joint i is `name_length[i]` bytes from
 * `name_bytes + name_offset[i]` (a payload holds at most METACTL_MAX_PAYLOAD bytes of names). */
typedef struct {
    uint8_t protocol_version;
    metactl_string robot;
    uint16_t control_rate_hz;
    uint16_t flags; /* METACTL_CAP_* */
    uint8_t num_joints;
    uint16_t name_offset[METACTL_MAX_JOINTS];
    uint8_t name_length[METACTL_MAX_JOINTS];
    char name_bytes[METACTL_MAX_PAYLOAD];
} metactl_capabilities;

typedef struct {
    uint32_t tick;   /* robot control tick; a Command echoes it */
    double time;     /* robot clock, seconds */
    uint8_t mode;    /* metactl_mode */
    uint8_t flags;   /* METACTL_STATE_* */
    uint8_t num_joints;
    float joint_pos[METACTL_MAX_JOINTS];    /* rad */
    float joint_vel[METACTL_MAX_JOINTS];    /* rad/s */
    float joint_torque[METACTL_MAX_JOINTS]; /* N m */
    float quat[4];                          /* x, y, z, w */
    float gyro[3];                          /* rad/s, body frame */
    float accel[3];                         /* m/s^2, body frame */
    float base_vel[3];                      /* m/s, body frame; NaN when not measured */
} metactl_state;

typedef struct {
    uint32_t tick; /* the State tick this command answers */
    uint8_t num_joints;
    float targets[METACTL_MAX_JOINTS]; /* rad */
    float kp[METACTL_MAX_JOINTS];      /* N m / rad */
    float kd[METACTL_MAX_JOINTS];      /* N m s / rad */
} metactl_command;

typedef struct {
    uint8_t mode; /* metactl_mode */
} metactl_mode_request;

typedef struct {
    uint8_t status; /* METACTL_RESET_* */
} metactl_reset;

typedef struct {
    uint32_t nonce;
    double time; /* host clock, seconds; echoed bit for bit */
} metactl_heartbeat;

typedef struct {
    uint8_t reason; /* free code; 0 = unspecified / operator */
} metactl_estop;

typedef struct {
    uint16_t code; /* metactl_fault_code, or the robot's own from 0x100 up */
    metactl_string message;
} metactl_fault;

/* One message: `type` says which member of `as` holds it. */
typedef struct {
    uint8_t type; /* metactl_message_type */
    union {
        metactl_hello hello;
        metactl_capabilities capabilities;
        metactl_state state;
        metactl_command command;
        metactl_mode_request mode;
        metactl_reset reset;
        metactl_heartbeat heartbeat;
        metactl_estop estop;
        metactl_fault fault;
    } as;
} metactl_message;

/* What a metactl_decoder saw: the same counters as DecoderStats in deploy/protocol.py. Every dropped
 * frame lands in exactly one error count. */
typedef struct {
    uint32_t frames_ok;
    uint32_t crc_errors;
    uint32_t cobs_errors;
    uint32_t length_errors; /* short frames and header length != payload length */
    uint32_t unknown_types;
    uint32_t version_errors;
    uint32_t payload_errors;
    uint32_t oversize;      /* longer than METACTL_MAX_ENCODED_SIZE; discarded up to the next 0x00 */
    uint32_t seq_gaps;      /* sequence numbers missing between consecutive good frames */
    uint32_t duplicates;    /* good frame with the same seq as the previous one (still delivered) */
    uint32_t seq_resets;    /* seq jumped backwards: the peer restarted its counter */
    uint32_t skipped_bytes; /* discarded unread: rest of an oversize frame, a partial first frame */
} metactl_decoder_stats;

/* Incremental frame decoder: push received bytes one at a time (from a UART interrupt or a poll
 * loop). Its buffer never holds more than METACTL_MAX_ENCODED_SIZE bytes. */
typedef struct {
    uint8_t buffer[METACTL_MAX_ENCODED_SIZE];
    uint16_t length; /* bytes of the unfinished frame held now */
    bool discarding; /* inside an oversize frame: drop bytes up to the next 0x00 */
    bool resync;     /* the next frame may be a partial one: count its failure as skipped bytes */
    bool have_last_seq;
    uint16_t last_seq;
    metactl_decoder_stats stats;
} metactl_decoder;

#ifdef __cplusplus
extern "C" {
#endif

/* "ok", then the ProtocolError kinds of deploy/protocol.py ("oversize", "cobs", "short", "crc",
 * "version", "length", "type", "payload"), then "buffer", "invalid". */
const char *metactl_status_name(metactl_status status);

/* CRC-32 as zlib.crc32: start with crc = 0, feed chunks by passing the previous result.
 * metactl_crc32(0, "123456789", 9) == 0xCBF43926. */
uint32_t metactl_crc32(uint32_t crc, const uint8_t *data, size_t length);

/* COBS-encode `length` bytes (no delimiter appended); same output as Python's cobs.encode.
 * Returns METACTL_ERR_BUFFER when `capacity` is too small (length + length / 254 + 1 always fits). */
metactl_status metactl_cobs_encode(const uint8_t *src, size_t length, uint8_t *dst, size_t capacity,
                                   size_t *out_length);

/* COBS-decode; accepts and rejects exactly what Python's cobs.decode does. `dst` may equal `src`
 * (decoding in place is safe: output never overtakes input). */
metactl_status metactl_cobs_decode(const uint8_t *src, size_t length, uint8_t *dst, size_t capacity,
                                   size_t *out_length);

/* Payload bytes of `message` (no header, no CRC), with the same checks as the Python constructors:
 * valid mode, at most METACTL_MAX_JOINTS joints, UTF-8 strings, at most METACTL_MAX_PAYLOAD bytes. */
metactl_status metactl_pack_payload(const metactl_message *message, uint8_t *dst, size_t capacity,
                                    size_t *out_length);

/* Parse a payload of message type `type` into `message`; METACTL_ERR_TYPE for an unknown type,
 * METACTL_ERR_PAYLOAD for any layout error (short, trailing bytes, bad mode, bad UTF-8, too many joints). */
metactl_status metactl_unpack_payload(uint8_t type, const uint8_t *payload, size_t length, metactl_message *message);

/* A complete wire frame, COBS( header | payload | crc ) 0x00, into `dst`. METACTL_MAX_WIRE_SIZE
 * bytes of `dst` always suffice. */
metactl_status metactl_encode_frame(const metactl_message *message, uint16_t seq, uint8_t *dst, size_t capacity,
                                    size_t *out_length);

/* Decode one frame given without its 0x00 delimiter. Decodes IN PLACE: `frame` is overwritten.
 * Checks run in the order of decode_frame in deploy/protocol.py and the first failure is returned:
 * oversize, cobs, short, crc, version, length, type, payload. */
metactl_status metactl_decode_frame(uint8_t *frame, size_t length, uint16_t *seq, metactl_message *message);

/* Start (or restart) a decoder. `resync`: the stream may begin mid-frame, so a failing first frame
 * counts as skipped bytes rather than as an error. Stats are zeroed. */
void metactl_decoder_init(metactl_decoder *decoder, bool resync);

/* Feed one received byte. Returns true when it completed a good frame, now in *seq and *message;
 * every bad frame is counted in decoder->stats and dropped. */
bool metactl_decoder_push(metactl_decoder *decoder, uint8_t byte, uint16_t *seq, metactl_message *message);

/* True when `length` bytes are valid UTF-8 exactly as Python's strict decoder sees it (no overlong
 * forms, no surrogates, nothing above U+10FFFF). */
bool metactl_utf8_valid(const uint8_t *bytes, size_t length);

/* Set a protocol string from `length` bytes; METACTL_ERR_INVALID if longer than 255 bytes or not UTF-8. */
metactl_status metactl_string_set(metactl_string *string, const char *bytes, size_t length);

/* Append joint name `length` bytes to capabilities (num_joints grows by one). */
metactl_status metactl_capabilities_add_joint(metactl_capabilities *capabilities, const char *name, size_t length);

#ifdef __cplusplus
}
#endif

#endif /* METACTL_PROTOCOL_H */
