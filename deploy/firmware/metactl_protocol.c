/*
 * metactl serial protocol v1, robot side: CRC-32, COBS, frames and messages (see metactl_protocol.h).
 */
#include "metactl_protocol.h"

#include <float.h>
#include <string.h>

/* The wire carries IEEE-754 binary32 / binary64; floats are moved to and from integers with memcpy. */
#if FLT_MANT_DIG != 24 || DBL_MANT_DIG != 53
#error "metactl_protocol needs IEEE-754 binary32 float and binary64 double (avr-gcc: -mdouble=64)"
#endif
typedef char metactl_check_float_size[(sizeof(float) == 4u) ? 1 : -1];
typedef char metactl_check_double_size[(sizeof(double) == 8u) ? 1 : -1];

const char *metactl_status_name(metactl_status status) {
    switch (status) {
    case METACTL_OK:
        return "ok";
    case METACTL_ERR_OVERSIZE:
        return "oversize";
    case METACTL_ERR_COBS:
        return "cobs";
    case METACTL_ERR_SHORT:
        return "short";
    case METACTL_ERR_CRC:
        return "crc";
    case METACTL_ERR_VERSION:
        return "version";
    case METACTL_ERR_LENGTH:
        return "length";
    case METACTL_ERR_TYPE:
        return "type";
    case METACTL_ERR_PAYLOAD:
        return "payload";
    case METACTL_ERR_BUFFER:
        return "buffer";
    case METACTL_ERR_INVALID:
        return "invalid";
    }
    return "unknown";
}

/* -- CRC-32 (zlib / IEEE 802.3, reflected polynomial 0xEDB88320) ------------------------------------ */

/* One entry per 4-bit nibble: 64 bytes of table, two lookups per byte (a 1 KiB byte table is faster,
 * bit-by-bit needs no table; this is the middle ground for small flash). */
static const uint32_t crc_nibble_table[16] = {
    0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
    0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu, 0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu,
};

/* Advance the raw (not inverted) register by one byte, low nibble first as the reflected CRC reads it. */
static uint32_t crc_step(uint32_t reg, uint8_t byte) {
    reg = crc_nibble_table[(reg ^ byte) & 0x0Fu] ^ (reg >> 4);
    reg = crc_nibble_table[(reg ^ (uint32_t)(byte >> 4)) & 0x0Fu] ^ (reg >> 4);
    return reg;
}

uint32_t metactl_crc32(uint32_t crc, const uint8_t *data, size_t length) {
    uint32_t reg = ~crc; /* zlib inverts in and out, so chunks chain by passing the last result */
    size_t i;
    for (i = 0; i < length; i++) {
        reg = crc_step(reg, data[i]);
    }
    return ~reg;
}

/* -- little-endian helpers -------------------------------------------------------------------------- */

static uint16_t read_u16(const uint8_t *p) { return (uint16_t)((uint16_t)p[0] | (uint16_t)((uint16_t)p[1] << 8)); }

static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* -- writer: plain payload bytes, a byte count, or a COBS-stuffed CRC-summed frame ------------------- */

typedef struct {
    uint8_t *dst;    /* NULL: only count */
    size_t capacity;
    size_t length;   /* bytes produced (or counted) so far */
    bool overflow;
    bool framed;     /* COBS-stuff every byte; CRC the header and payload */
    uint32_t crc;    /* raw CRC register */
    size_t code_pos; /* where the open COBS block's code byte goes */
    uint8_t code;    /* 1 + non-zero bytes in the open block */
    bool block_open;
} writer;

static void writer_init(writer *w, uint8_t *dst, size_t capacity, bool framed) {
    memset(w, 0, sizeof(*w));
    w->dst = dst;
    w->capacity = capacity;
    w->framed = framed;
    w->crc = 0xFFFFFFFFu;
}

static void emit(writer *w, uint8_t byte) {
    if (w->dst != NULL) {
        if (w->length < w->capacity) {
            w->dst[w->length] = byte;
        } else {
            w->overflow = true;
        }
    }
    w->length++;
}

static void cobs_open_block(writer *w) {
    w->code_pos = w->length;
    emit(w, 0); /* placeholder for the code byte */
    w->code = 1;
    w->block_open = true;
}

static void cobs_close_block(writer *w) {
    if (w->dst != NULL && w->code_pos < w->capacity) {
        w->dst[w->code_pos] = w->code;
    }
    w->block_open = false;
}

/* Same block boundaries as Python's cobs.encode: a block ends at a zero or after 254 data bytes; a
 * full block that ends the data gets no trailing empty block. */
static void cobs_put(writer *w, uint8_t byte) {
    if (!w->block_open) {
        cobs_open_block(w);
    }
    if (byte == 0) {
        cobs_close_block(w);
        cobs_open_block(w);
        return;
    }
    emit(w, byte);
    w->code++;
    if (w->code == 0xFFu) {
        cobs_close_block(w);
    }
}

static void put(writer *w, uint8_t byte) {
    if (w->framed) {
        w->crc = crc_step(w->crc, byte);
        cobs_put(w, byte);
    } else {
        emit(w, byte);
    }
}

static void put_u16(writer *w, uint16_t value) {
    put(w, (uint8_t)(value & 0xFFu));
    put(w, (uint8_t)(value >> 8));
}

static void put_u32(writer *w, uint32_t value) {
    put(w, (uint8_t)(value & 0xFFu));
    put(w, (uint8_t)((value >> 8) & 0xFFu));
    put(w, (uint8_t)((value >> 16) & 0xFFu));
    put(w, (uint8_t)(value >> 24));
}

/* Floats travel by pointer and memcpy, never through an FPU register: an x87 load would quiet a
 * signalling NaN, and a Heartbeat must come back bit for bit. */
static void put_f64(writer *w, const double *value) {
    uint64_t bits;
    memcpy(&bits, value, sizeof(bits));
    put_u32(w, (uint32_t)(bits & 0xFFFFFFFFu));
    put_u32(w, (uint32_t)(bits >> 32));
}

static void put_f32_array(writer *w, const float *values, size_t count) {
    size_t i;
    for (i = 0; i < count; i++) {
        uint32_t bits;
        memcpy(&bits, &values[i], sizeof(bits));
        put_u32(w, bits);
    }
}

static void put_bytes(writer *w, const char *bytes, size_t length) {
    size_t i;
    for (i = 0; i < length; i++) {
        put(w, (uint8_t)bytes[i]);
    }
}

static void put_string(writer *w, const metactl_string *string) {
    put(w, string->length);
    put_bytes(w, string->bytes, string->length);
}

/* -- UTF-8 ------------------------------------------------------------------------------------------ */

bool metactl_utf8_valid(const uint8_t *bytes, size_t length) {
    size_t i = 0;
    while (i < length) {
        uint8_t lead = bytes[i];
        size_t continuation;
        size_t k;
        /* The range allowed for the first continuation byte rules out overlong forms, surrogates
         * (ED A0..BF) and code points above U+10FFFF (F4 90..); Unicode 15, table 3-7. */
        uint8_t low = 0x80u;
        uint8_t high = 0xBFu;
        if (lead < 0x80u) {
            i++;
            continue;
        }
        if (lead >= 0xC2u && lead <= 0xDFu) {
            continuation = 1;
        } else if (lead == 0xE0u) {
            continuation = 2;
            low = 0xA0u;
        } else if (lead == 0xEDu) {
            continuation = 2;
            high = 0x9Fu;
        } else if (lead >= 0xE1u && lead <= 0xEFu) {
            continuation = 2;
        } else if (lead == 0xF0u) {
            continuation = 3;
            low = 0x90u;
        } else if (lead == 0xF4u) {
            continuation = 3;
            high = 0x8Fu;
        } else if (lead >= 0xF1u && lead <= 0xF3u) {
            continuation = 3;
        } else {
            return false; /* 0x80..0xC1 (stray continuation, overlong 2-byte) and 0xF5..0xFF */
        }
        if (length - i - 1u < continuation) {
            return false;
        }
        if (bytes[i + 1u] < low || bytes[i + 1u] > high) {
            return false;
        }
        for (k = 2; k <= continuation; k++) {
            if (bytes[i + k] < 0x80u || bytes[i + k] > 0xBFu) {
                return false;
            }
        }
        i += continuation + 1u;
    }
    return true;
}

metactl_status metactl_string_set(metactl_string *string, const char *bytes, size_t length) {
    if (length > METACTL_MAX_STRING || (length > 0 && bytes == NULL) ||
        !metactl_utf8_valid((const uint8_t *)bytes, length)) {
        return METACTL_ERR_INVALID;
    }
    if (length > 0) {
        memcpy(string->bytes, bytes, length);
    }
    string->bytes[length] = '\0';
    string->length = (uint8_t)length;
    return METACTL_OK;
}

metactl_status metactl_capabilities_add_joint(metactl_capabilities *capabilities, const char *name, size_t length) {
    size_t offset = 0;
    uint8_t n = capabilities->num_joints;
    if (n >= METACTL_MAX_JOINTS || length > METACTL_MAX_STRING || (length > 0 && name == NULL) ||
        !metactl_utf8_valid((const uint8_t *)name, length)) {
        return METACTL_ERR_INVALID;
    }
    if (n > 0) {
        offset = (size_t)capabilities->name_offset[n - 1u] + capabilities->name_length[n - 1u];
    }
    if (offset + length > sizeof(capabilities->name_bytes)) {
        return METACTL_ERR_INVALID;
    }
    if (length > 0) {
        memcpy(capabilities->name_bytes + offset, name, length);
    }
    capabilities->name_offset[n] = (uint16_t)offset;
    capabilities->name_length[n] = (uint8_t)length;
    capabilities->num_joints = (uint8_t)(n + 1u);
    return METACTL_OK;
}

/* -- packing ---------------------------------------------------------------------------------------- */

static bool string_valid(const metactl_string *string) {
    return metactl_utf8_valid((const uint8_t *)string->bytes, string->length);
}

/* The checks the Python message constructors make, so C refuses to send what Python would refuse. */
static metactl_status check_message(const metactl_message *message) {
    size_t i;
    switch (message->type) {
    case METACTL_MSG_HELLO:
        return string_valid(&message->as.hello.host_name) ? METACTL_OK : METACTL_ERR_INVALID;
    case METACTL_MSG_CAPABILITIES: {
        const metactl_capabilities *caps = &message->as.capabilities;
        if (!string_valid(&caps->robot) || caps->num_joints > METACTL_MAX_JOINTS) {
            return METACTL_ERR_INVALID;
        }
        for (i = 0; i < caps->num_joints; i++) {
            size_t end = (size_t)caps->name_offset[i] + caps->name_length[i];
            if (end > sizeof(caps->name_bytes) ||
                !metactl_utf8_valid((const uint8_t *)caps->name_bytes + caps->name_offset[i], caps->name_length[i])) {
                return METACTL_ERR_INVALID;
            }
        }
        return METACTL_OK;
    }
    case METACTL_MSG_STATE:
        return (message->as.state.mode <= METACTL_MODE_ESTOP && message->as.state.num_joints <= METACTL_MAX_JOINTS)
                   ? METACTL_OK
                   : METACTL_ERR_INVALID;
    case METACTL_MSG_COMMAND:
        return message->as.command.num_joints <= METACTL_MAX_JOINTS ? METACTL_OK : METACTL_ERR_INVALID;
    case METACTL_MSG_MODE:
        return message->as.mode.mode <= METACTL_MODE_ESTOP ? METACTL_OK : METACTL_ERR_INVALID;
    case METACTL_MSG_RESET:
    case METACTL_MSG_HEARTBEAT:
    case METACTL_MSG_ESTOP:
        return METACTL_OK;
    case METACTL_MSG_FAULT:
        return string_valid(&message->as.fault.message) ? METACTL_OK : METACTL_ERR_INVALID;
    default:
        return METACTL_ERR_INVALID;
    }
}

/* Payload layouts of docs/protocol.md, field by field; call check_message first. */
static void pack_fields(writer *w, const metactl_message *message) {
    size_t i;
    switch (message->type) {
    case METACTL_MSG_HELLO:
        put(w, message->as.hello.protocol_version);
        put_string(w, &message->as.hello.host_name);
        break;
    case METACTL_MSG_CAPABILITIES: {
        const metactl_capabilities *caps = &message->as.capabilities;
        put(w, caps->protocol_version);
        put_string(w, &caps->robot);
        put_u16(w, caps->control_rate_hz);
        put_u16(w, caps->flags);
        put(w, caps->num_joints);
        for (i = 0; i < caps->num_joints; i++) {
            put(w, caps->name_length[i]);
            put_bytes(w, caps->name_bytes + caps->name_offset[i], caps->name_length[i]);
        }
        break;
    }
    case METACTL_MSG_STATE: {
        const metactl_state *state = &message->as.state;
        put_u32(w, state->tick);
        put_f64(w, &state->time);
        put(w, state->mode);
        put(w, state->flags);
        put(w, state->num_joints);
        put_f32_array(w, state->joint_pos, state->num_joints);
        put_f32_array(w, state->joint_vel, state->num_joints);
        put_f32_array(w, state->joint_torque, state->num_joints);
        put_f32_array(w, state->quat, 4);
        put_f32_array(w, state->gyro, 3);
        put_f32_array(w, state->accel, 3);
        put_f32_array(w, state->base_vel, 3);
        break;
    }
    case METACTL_MSG_COMMAND: {
        const metactl_command *command = &message->as.command;
        put_u32(w, command->tick);
        put(w, command->num_joints);
        put_f32_array(w, command->targets, command->num_joints);
        put_f32_array(w, command->kp, command->num_joints);
        put_f32_array(w, command->kd, command->num_joints);
        break;
    }
    case METACTL_MSG_MODE:
        put(w, message->as.mode.mode);
        break;
    case METACTL_MSG_RESET:
        put(w, message->as.reset.status);
        break;
    case METACTL_MSG_HEARTBEAT:
        put_u32(w, message->as.heartbeat.nonce);
        put_f64(w, &message->as.heartbeat.time);
        break;
    case METACTL_MSG_ESTOP:
        put(w, message->as.estop.reason);
        break;
    case METACTL_MSG_FAULT:
        put_u16(w, message->as.fault.code);
        put_string(w, &message->as.fault.message);
        break;
    default:
        break;
    }
}

/* Payload size in bytes, or METACTL_ERR_INVALID when the message cannot be sent. */
static metactl_status payload_size(const metactl_message *message, size_t *size) {
    writer counter;
    metactl_status status = check_message(message);
    if (status != METACTL_OK) {
        return status;
    }
    writer_init(&counter, NULL, 0, false);
    pack_fields(&counter, message);
    if (counter.length > METACTL_MAX_PAYLOAD) {
        return METACTL_ERR_INVALID;
    }
    *size = counter.length;
    return METACTL_OK;
}

metactl_status metactl_pack_payload(const metactl_message *message, uint8_t *dst, size_t capacity,
                                    size_t *out_length) {
    writer w;
    size_t size = 0;
    metactl_status status = payload_size(message, &size);
    if (status != METACTL_OK) {
        return status;
    }
    if (size > capacity) {
        return METACTL_ERR_BUFFER;
    }
    writer_init(&w, dst, capacity, false);
    pack_fields(&w, message);
    *out_length = w.length;
    return METACTL_OK;
}

metactl_status metactl_encode_frame(const metactl_message *message, uint16_t seq, uint8_t *dst, size_t capacity,
                                    size_t *out_length) {
    writer w;
    size_t size = 0;
    uint32_t crc;
    metactl_status status = payload_size(message, &size);
    if (status != METACTL_OK) {
        return status;
    }
    /* Header and payload are CRC-summed and COBS-stuffed as they are written: no frame-sized scratch buffer. */
    writer_init(&w, dst, capacity, true);
    cobs_open_block(&w);
    put(&w, (uint8_t)METACTL_PROTOCOL_VERSION);
    put(&w, message->type);
    put_u16(&w, seq);
    put_u16(&w, (uint16_t)size);
    pack_fields(&w, message);
    crc = ~w.crc;
    /* The CRC itself is stuffed but not summed. */
    cobs_put(&w, (uint8_t)(crc & 0xFFu));
    cobs_put(&w, (uint8_t)((crc >> 8) & 0xFFu));
    cobs_put(&w, (uint8_t)((crc >> 16) & 0xFFu));
    cobs_put(&w, (uint8_t)(crc >> 24));
    if (w.block_open) {
        cobs_close_block(&w);
    }
    emit(&w, 0x00);
    if (w.overflow) {
        return METACTL_ERR_BUFFER;
    }
    *out_length = w.length;
    return METACTL_OK;
}

/* -- COBS ------------------------------------------------------------------------------------------- */

metactl_status metactl_cobs_encode(const uint8_t *src, size_t length, uint8_t *dst, size_t capacity,
                                   size_t *out_length) {
    writer w;
    size_t i;
    writer_init(&w, dst, capacity, false);
    cobs_open_block(&w);
    for (i = 0; i < length; i++) {
        cobs_put(&w, src[i]);
    }
    if (w.block_open) {
        cobs_close_block(&w);
    }
    if (w.overflow) {
        return METACTL_ERR_BUFFER;
    }
    *out_length = w.length;
    return METACTL_OK;
}

metactl_status metactl_cobs_decode(const uint8_t *src, size_t length, uint8_t *dst, size_t capacity,
                                   size_t *out_length) {
    size_t in = 0;
    size_t out = 0;
    /* Reads always run ahead of writes (each code byte read frees one slot), so dst == src is safe. */
    while (in < length) {
        uint8_t code = src[in];
        size_t end;
        size_t stop;
        size_t i;
        if (code == 0) {
            return METACTL_ERR_COBS;
        }
        in++;
        end = in + code - 1u;
        stop = end < length ? end : length;
        for (i = in; i < stop; i++) {
            if (src[i] == 0) {
                return METACTL_ERR_COBS;
            }
            if (out >= capacity) {
                return METACTL_ERR_BUFFER;
            }
            dst[out++] = src[i];
        }
        if (end > length) {
            return METACTL_ERR_COBS; /* the code byte promises more bytes than there are */
        }
        in = end;
        /* A block shorter than 254 bytes stood for a zero, except at the very end. */
        if (in < length && code < 0xFFu) {
            if (out >= capacity) {
                return METACTL_ERR_BUFFER;
            }
            dst[out++] = 0;
        }
    }
    *out_length = out;
    return METACTL_OK;
}

/* -- unpacking -------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *data;
    size_t length;
    size_t offset;
    bool error; /* sticky: once a read overruns, every later read returns zeros */
} reader;

static const uint8_t *take(reader *r, size_t size) {
    const uint8_t *p;
    if (r->error || size > r->length - r->offset) {
        r->error = true;
        return NULL;
    }
    p = r->data + r->offset;
    r->offset += size;
    return p;
}

static uint8_t get_u8(reader *r) {
    const uint8_t *p = take(r, 1);
    return p == NULL ? 0u : p[0];
}

static uint16_t get_u16(reader *r) {
    const uint8_t *p = take(r, 2);
    return p == NULL ? 0u : read_u16(p);
}

static uint32_t get_u32(reader *r) {
    const uint8_t *p = take(r, 4);
    return p == NULL ? 0u : read_u32(p);
}

static void get_f64(reader *r, double *value) {
    uint64_t low = get_u32(r);
    uint64_t bits = low | ((uint64_t)get_u32(r) << 32);
    memcpy(value, &bits, sizeof(bits));
}

static void get_f32_array(reader *r, float *values, size_t count) {
    size_t i;
    for (i = 0; i < count; i++) {
        uint32_t bits = get_u32(r);
        memcpy(&values[i], &bits, sizeof(bits));
    }
}

/* Copy `length` bytes that must be valid UTF-8 into dst (NUL-terminated when room is left). */
static void get_utf8(reader *r, char *dst, size_t length, size_t room) {
    const uint8_t *p = take(r, length);
    if (p == NULL) {
        return;
    }
    if (!metactl_utf8_valid(p, length)) {
        r->error = true;
        return;
    }
    if (length > 0) {
        memcpy(dst, p, length);
    }
    if (length < room) {
        dst[length] = '\0';
    }
}

static void get_string(reader *r, metactl_string *string) {
    uint8_t length = get_u8(r);
    string->length = length;
    string->bytes[0] = '\0';
    get_utf8(r, string->bytes, length, sizeof(string->bytes));
}

/* The joint count of an array message, refused when it exceeds what this build can hold. */
static uint8_t get_count(reader *r) {
    uint8_t count = get_u8(r);
    if (count > METACTL_MAX_JOINTS) {
        r->error = true;
        return 0;
    }
    return count;
}

static metactl_status finish(const reader *r) {
    return (r->error || r->offset != r->length) ? METACTL_ERR_PAYLOAD : METACTL_OK;
}

/* Messages whose payload is one fixed layout: the size must match exactly. */
static bool fixed_size(reader *r, size_t size) {
    if (r->length != size) {
        r->error = true;
    }
    return !r->error;
}

metactl_status metactl_unpack_payload(uint8_t type, const uint8_t *payload, size_t length, metactl_message *message) {
    reader r;
    size_t i;
    r.data = payload;
    r.length = length;
    r.offset = 0;
    r.error = false;
    message->type = type;
    switch (type) {
    case METACTL_MSG_HELLO:
        message->as.hello.protocol_version = get_u8(&r);
        get_string(&r, &message->as.hello.host_name);
        break;
    case METACTL_MSG_CAPABILITIES: {
        metactl_capabilities *caps = &message->as.capabilities;
        size_t offset = 0;
        caps->protocol_version = get_u8(&r);
        get_string(&r, &caps->robot);
        caps->control_rate_hz = get_u16(&r);
        caps->flags = get_u16(&r);
        caps->num_joints = get_count(&r);
        for (i = 0; i < caps->num_joints && !r.error; i++) {
            uint8_t name_length = get_u8(&r);
            if (offset + name_length > sizeof(caps->name_bytes)) {
                r.error = true;
                break;
            }
            get_utf8(&r, caps->name_bytes + offset, name_length, 0);
            caps->name_offset[i] = (uint16_t)offset;
            caps->name_length[i] = name_length;
            offset += name_length;
        }
        break;
    }
    case METACTL_MSG_STATE: {
        metactl_state *state = &message->as.state;
        state->tick = get_u32(&r);
        get_f64(&r, &state->time);
        state->mode = get_u8(&r);
        state->flags = get_u8(&r);
        state->num_joints = get_count(&r);
        get_f32_array(&r, state->joint_pos, state->num_joints);
        get_f32_array(&r, state->joint_vel, state->num_joints);
        get_f32_array(&r, state->joint_torque, state->num_joints);
        get_f32_array(&r, state->quat, 4);
        get_f32_array(&r, state->gyro, 3);
        get_f32_array(&r, state->accel, 3);
        get_f32_array(&r, state->base_vel, 3);
        if (state->mode > METACTL_MODE_ESTOP) {
            r.error = true;
        }
        break;
    }
    case METACTL_MSG_COMMAND: {
        metactl_command *command = &message->as.command;
        command->tick = get_u32(&r);
        command->num_joints = get_count(&r);
        get_f32_array(&r, command->targets, command->num_joints);
        get_f32_array(&r, command->kp, command->num_joints);
        get_f32_array(&r, command->kd, command->num_joints);
        break;
    }
    case METACTL_MSG_MODE:
        if (fixed_size(&r, 1)) {
            message->as.mode.mode = get_u8(&r);
            if (message->as.mode.mode > METACTL_MODE_ESTOP) {
                r.error = true;
            }
        }
        break;
    case METACTL_MSG_RESET:
        if (fixed_size(&r, 1)) {
            message->as.reset.status = get_u8(&r);
        }
        break;
    case METACTL_MSG_HEARTBEAT:
        if (fixed_size(&r, 12)) {
            message->as.heartbeat.nonce = get_u32(&r);
            get_f64(&r, &message->as.heartbeat.time);
        }
        break;
    case METACTL_MSG_ESTOP:
        if (fixed_size(&r, 1)) {
            message->as.estop.reason = get_u8(&r);
        }
        break;
    case METACTL_MSG_FAULT:
        message->as.fault.code = get_u16(&r);
        get_string(&r, &message->as.fault.message);
        break;
    default:
        return METACTL_ERR_TYPE;
    }
    return finish(&r);
}

static bool known_type(uint8_t type) {
    switch (type) {
    case METACTL_MSG_HELLO:
    case METACTL_MSG_CAPABILITIES:
    case METACTL_MSG_STATE:
    case METACTL_MSG_COMMAND:
    case METACTL_MSG_MODE:
    case METACTL_MSG_RESET:
    case METACTL_MSG_HEARTBEAT:
    case METACTL_MSG_ESTOP:
    case METACTL_MSG_FAULT:
        return true;
    default:
        return false;
    }
}

/* -- frames ----------------------------------------------------------------------------------------- */

metactl_status metactl_decode_frame(uint8_t *frame, size_t length, uint16_t *seq, metactl_message *message) {
    size_t raw_length = 0;
    size_t body_length;
    uint16_t declared_length;
    if (length > METACTL_MAX_ENCODED_SIZE) {
        return METACTL_ERR_OVERSIZE;
    }
    if (metactl_cobs_decode(frame, length, frame, length, &raw_length) != METACTL_OK) {
        return METACTL_ERR_COBS;
    }
    if (raw_length < METACTL_HEADER_SIZE + METACTL_CRC_SIZE) {
        return METACTL_ERR_SHORT;
    }
    body_length = raw_length - METACTL_CRC_SIZE;
    /* The CRC comes first: no header field is trusted before it matches. */
    if (read_u32(frame + body_length) != metactl_crc32(0, frame, body_length)) {
        return METACTL_ERR_CRC;
    }
    if (frame[0] != METACTL_PROTOCOL_VERSION) {
        return METACTL_ERR_VERSION;
    }
    declared_length = read_u16(frame + 4);
    if (declared_length != body_length - METACTL_HEADER_SIZE) {
        return METACTL_ERR_LENGTH;
    }
    if (!known_type(frame[1])) {
        return METACTL_ERR_TYPE;
    }
    if (metactl_unpack_payload(frame[1], frame + METACTL_HEADER_SIZE, declared_length, message) != METACTL_OK) {
        return METACTL_ERR_PAYLOAD;
    }
    *seq = read_u16(frame + 2);
    return METACTL_OK;
}

void metactl_decoder_init(metactl_decoder *decoder, bool resync) {
    memset(decoder, 0, sizeof(*decoder));
    decoder->resync = resync;
}

static void count_error(metactl_decoder_stats *stats, metactl_status status) {
    switch (status) {
    case METACTL_ERR_OVERSIZE:
        stats->oversize++;
        break;
    case METACTL_ERR_COBS:
        stats->cobs_errors++;
        break;
    case METACTL_ERR_SHORT:
    case METACTL_ERR_LENGTH:
        stats->length_errors++;
        break;
    case METACTL_ERR_CRC:
        stats->crc_errors++;
        break;
    case METACTL_ERR_VERSION:
        stats->version_errors++;
        break;
    case METACTL_ERR_TYPE:
        stats->unknown_types++;
        break;
    default:
        stats->payload_errors++;
        break;
    }
}

static void track_seq(metactl_decoder *decoder, uint16_t seq) {
    if (decoder->have_last_seq) {
        uint16_t step = (uint16_t)(seq - decoder->last_seq); /* wrap-aware: 65535 -> 0 is a step of 1 */
        if (step == 0) {
            decoder->stats.duplicates++;
        } else if (step > 32768u) {
            decoder->stats.seq_resets++;
        } else {
            decoder->stats.seq_gaps += (uint32_t)step - 1u;
        }
    }
    decoder->have_last_seq = true;
    decoder->last_seq = seq;
}

bool metactl_decoder_push(metactl_decoder *decoder, uint8_t byte, uint16_t *seq, metactl_message *message) {
    uint16_t length;
    bool resync;
    uint16_t frame_seq = 0;
    metactl_status status;
    if (byte != 0) {
        if (decoder->discarding) {
            decoder->stats.skipped_bytes++;
        } else if (decoder->length >= METACTL_MAX_ENCODED_SIZE) {
            /* Too long to be a frame: drop it all up to the next delimiter; the buffer stays bounded. */
            if (!decoder->resync) {
                decoder->stats.oversize++;
            }
            decoder->stats.skipped_bytes += (uint32_t)decoder->length + 1u;
            decoder->length = 0;
            decoder->discarding = true;
        } else {
            decoder->buffer[decoder->length++] = byte;
        }
        return false;
    }
    if (decoder->discarding) {
        decoder->discarding = false;
        decoder->resync = false;
        return false;
    }
    if (decoder->length == 0) {
        return false; /* consecutive delimiters: an idle line, not an error */
    }
    length = decoder->length;
    decoder->length = 0;
    resync = decoder->resync;
    decoder->resync = false;
    status = metactl_decode_frame(decoder->buffer, length, &frame_seq, message);
    if (status != METACTL_OK) {
        if (resync) {
            decoder->stats.skipped_bytes += length;
        } else {
            count_error(&decoder->stats, status);
        }
        return false;
    }
    track_seq(decoder, frame_seq);
    decoder->stats.frames_ok++;
    *seq = frame_seq;
    return true;
}
