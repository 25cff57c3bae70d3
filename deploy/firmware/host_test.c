/*
 * Host-side harness for the firmware: lets tests/deploy/test_firmware.py drive the C code through
 * stdin/stdout. Not part of the firmware (it uses stdio); deterministic, one output line per input line.
 *
 *   host_test crc HEX...            CRC-32 of the bytes, 8 hex digits
 *   host_test decode [HEX...]       frames (COBS, no 0x00 delimiter) -> one JSON object per frame:
 *                                   {"seq":..,"type":"STATE",<fields>} or {"error":"crc"}
 *   host_test encode [LINE...]      message lines (below) -> wire frame hex, delimiter included,
 *                                   or "error <status>"
 *   host_test stream [--resync]     hex chunks fed to metactl_decoder -> a JSON line per decoded frame,
 *                                   then {"stats":{..},"pending_bytes":N,"peak_pending_bytes":N}
 *   host_test robot                 a metactl_robot driven by a script (below) -> a JSON line per command
 *   host_test sizes                 sizeof of the main structs
 *
 * With no arguments after the mode, lines come from stdin. Floats are written and read as the hex
 * of their IEEE bits (8 digits for f32, 16 for f64), so nothing is lost to decimal; strings as the
 * hex of their UTF-8 bytes, "-" when empty. Message lines (fields in wire order):
 *
 *   SEQ HELLO version host_name
 *   SEQ CAPABILITIES version robot control_rate_hz flags n name*n
 *   SEQ STATE tick time mode flags n joint_pos*n joint_vel*n joint_torque*n quat*4 gyro*3 accel*3 base_vel*3
 *   SEQ COMMAND tick n targets*n kp*n kd*n
 *   SEQ MODE mode | SEQ RESET status | SEQ HEARTBEAT nonce time | SEQ ESTOP reason | SEQ FAULT code message
 *
 * Robot script (decimal numbers here; each command answers {"cmd":..,"mode":M,"tx":"<hex sent>",...}):
 *
 *   config N FLAGS WATCHDOG_MS DAMPING_KD MAX_KP MAX_KD RATE_HZ ROBOT_NAME
 *   joint I NAME LOWER UPPER TORQUE_LIMIT
 *   init NOW_MS | rx NOW_MS HEX | tick NOW_MS | torques Q*N QD*N | state | estop 0|1 REASON | stats
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metactl_protocol.h"
#include "metactl_robot.h"

#define LINE_SIZE (1u << 20)
#define MAX_BYTES (LINE_SIZE / 2u)

static char line_buffer[LINE_SIZE];
static uint8_t bytes_buffer[MAX_BYTES];
static uint8_t wire_buffer[METACTL_MAX_WIRE_SIZE];
static metactl_message message;

/* -- input ------------------------------------------------------------------------------------------ */

typedef struct {
    int argc;
    char **argv;
    int next;
} inputs;

/* Next input line: from argv when any were given, else stdin. NULL at the end. */
static char *next_line(inputs *in) {
    size_t length;
    if (in->argc > 0) {
        return in->next < in->argc ? in->argv[in->next++] : NULL;
    }
    if (fgets(line_buffer, (int)sizeof(line_buffer), stdin) == NULL) {
        return NULL;
    }
    length = strlen(line_buffer);
    if (length == sizeof(line_buffer) - 1u && line_buffer[length - 1u] != '\n') {
        fprintf(stderr, "host_test: input line longer than %u bytes\n", (unsigned)LINE_SIZE);
        exit(2);
    }
    while (length > 0 && (line_buffer[length - 1u] == '\n' || line_buffer[length - 1u] == '\r')) {
        line_buffer[--length] = '\0';
    }
    return line_buffer;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* Hex text -> bytes; false on odd length, a non-hex character or overflow. */
static bool parse_hex(const char *text, uint8_t *out, size_t capacity, size_t *length) {
    size_t n = strlen(text);
    size_t i;
    if (n % 2u != 0u || n / 2u > capacity) {
        return false;
    }
    for (i = 0; i < n / 2u; i++) {
        int high = hex_digit(text[2u * i]);
        int low = hex_digit(text[2u * i + 1u]);
        if (high < 0 || low < 0) {
            return false;
        }
        out[i] = (uint8_t)(high * 16 + low);
    }
    *length = n / 2u;
    return true;
}

static void print_hex(const uint8_t *data, size_t length) {
    size_t i;
    for (i = 0; i < length; i++) {
        printf("%02x", data[i]);
    }
}

/* Whitespace tokenizer over one line, with a sticky error flag. */
typedef struct {
    char *rest;
    bool error;
} tokens;

static char *next_token(tokens *t) {
    char *start;
    if (t->rest == NULL) {
        t->error = true;
        return NULL;
    }
    while (*t->rest == ' ' || *t->rest == '\t') {
        t->rest++;
    }
    if (*t->rest == '\0') {
        t->error = true;
        return NULL;
    }
    start = t->rest;
    while (*t->rest != '\0' && *t->rest != ' ' && *t->rest != '\t') {
        t->rest++;
    }
    if (*t->rest != '\0') {
        *t->rest++ = '\0';
    }
    return start;
}

static unsigned long token_uint(tokens *t, unsigned long max) {
    char *end;
    char *text = next_token(t);
    unsigned long value;
    if (text == NULL) {
        return 0;
    }
    value = strtoul(text, &end, 10);
    if (*end != '\0' || value > max || text[0] == '-') {
        t->error = true;
        return 0;
    }
    return value;
}

static uint64_t token_bits(tokens *t, unsigned digits) {
    char *end;
    char *text = next_token(t);
    unsigned long long value;
    if (text == NULL) {
        return 0;
    }
    value = strtoull(text, &end, 16);
    if (*end != '\0' || strlen(text) != digits) {
        t->error = true;
        return 0;
    }
    return (uint64_t)value;
}

static void token_f32_array(tokens *t, float *values, size_t count) {
    size_t i;
    for (i = 0; i < count; i++) {
        uint32_t bits = (uint32_t)token_bits(t, 8);
        memcpy(&values[i], &bits, sizeof(bits));
    }
}

static void token_f64(tokens *t, double *value) {
    uint64_t bits = token_bits(t, 16);
    memcpy(value, &bits, sizeof(bits));
}

static double token_double(tokens *t) {
    char *end;
    char *text = next_token(t);
    double value;
    if (text == NULL) {
        return 0.0;
    }
    value = strtod(text, &end);
    if (*end != '\0') {
        t->error = true;
    }
    return value;
}

/* A string token: hex bytes or "-"; bytes land in raw (room for 255), length in *length. */
static void token_raw_string(tokens *t, char *raw, size_t *length) {
    char *text = next_token(t);
    *length = 0;
    if (text == NULL || strcmp(text, "-") == 0) {
        return;
    }
    if (!parse_hex(text, (uint8_t *)raw, METACTL_MAX_STRING, length)) {
        t->error = true;
    }
}

static void token_string(tokens *t, metactl_string *string) {
    char raw[METACTL_MAX_STRING];
    size_t length = 0;
    token_raw_string(t, raw, &length);
    if (!t->error && metactl_string_set(string, raw, length) != METACTL_OK) {
        t->error = true;
    }
}

/* -- message text <-> struct ------------------------------------------------------------------------ */

static bool parse_message(char *line, uint16_t *seq, metactl_message *out) {
    tokens t;
    char *type;
    t.rest = line;
    t.error = false;
    memset(out, 0, sizeof(*out));
    *seq = (uint16_t)token_uint(&t, 0xFFFFu);
    type = next_token(&t);
    if (type == NULL) {
        return false;
    }
    if (strcmp(type, "HELLO") == 0) {
        out->type = METACTL_MSG_HELLO;
        out->as.hello.protocol_version = (uint8_t)token_uint(&t, 0xFFu);
        token_string(&t, &out->as.hello.host_name);
    } else if (strcmp(type, "CAPABILITIES") == 0) {
        metactl_capabilities *caps = &out->as.capabilities;
        unsigned long n;
        unsigned long i;
        out->type = METACTL_MSG_CAPABILITIES;
        caps->protocol_version = (uint8_t)token_uint(&t, 0xFFu);
        token_string(&t, &caps->robot);
        caps->control_rate_hz = (uint16_t)token_uint(&t, 0xFFFFu);
        caps->flags = (uint16_t)token_uint(&t, 0xFFFFu);
        n = token_uint(&t, METACTL_MAX_JOINTS);
        for (i = 0; i < n && !t.error; i++) {
            char raw[METACTL_MAX_STRING];
            size_t length = 0;
            token_raw_string(&t, raw, &length);
            if (!t.error && metactl_capabilities_add_joint(caps, raw, length) != METACTL_OK) {
                t.error = true;
            }
        }
    } else if (strcmp(type, "STATE") == 0) {
        metactl_state *state = &out->as.state;
        out->type = METACTL_MSG_STATE;
        state->tick = (uint32_t)token_uint(&t, 0xFFFFFFFFu);
        token_f64(&t, &state->time);
        state->mode = (uint8_t)token_uint(&t, 0xFFu);
        state->flags = (uint8_t)token_uint(&t, 0xFFu);
        state->num_joints = (uint8_t)token_uint(&t, METACTL_MAX_JOINTS);
        token_f32_array(&t, state->joint_pos, state->num_joints);
        token_f32_array(&t, state->joint_vel, state->num_joints);
        token_f32_array(&t, state->joint_torque, state->num_joints);
        token_f32_array(&t, state->quat, 4);
        token_f32_array(&t, state->gyro, 3);
        token_f32_array(&t, state->accel, 3);
        token_f32_array(&t, state->base_vel, 3);
    } else if (strcmp(type, "COMMAND") == 0) {
        metactl_command *command = &out->as.command;
        out->type = METACTL_MSG_COMMAND;
        command->tick = (uint32_t)token_uint(&t, 0xFFFFFFFFu);
        command->num_joints = (uint8_t)token_uint(&t, METACTL_MAX_JOINTS);
        token_f32_array(&t, command->targets, command->num_joints);
        token_f32_array(&t, command->kp, command->num_joints);
        token_f32_array(&t, command->kd, command->num_joints);
    } else if (strcmp(type, "MODE") == 0) {
        out->type = METACTL_MSG_MODE;
        out->as.mode.mode = (uint8_t)token_uint(&t, 0xFFu);
    } else if (strcmp(type, "RESET") == 0) {
        out->type = METACTL_MSG_RESET;
        out->as.reset.status = (uint8_t)token_uint(&t, 0xFFu);
    } else if (strcmp(type, "HEARTBEAT") == 0) {
        out->type = METACTL_MSG_HEARTBEAT;
        out->as.heartbeat.nonce = (uint32_t)token_uint(&t, 0xFFFFFFFFu);
        token_f64(&t, &out->as.heartbeat.time);
    } else if (strcmp(type, "ESTOP") == 0) {
        out->type = METACTL_MSG_ESTOP;
        out->as.estop.reason = (uint8_t)token_uint(&t, 0xFFu);
    } else if (strcmp(type, "FAULT") == 0) {
        out->type = METACTL_MSG_FAULT;
        out->as.fault.code = (uint16_t)token_uint(&t, 0xFFFFu);
        token_string(&t, &out->as.fault.message);
    } else {
        return false;
    }
    /* Nothing may follow the last field. */
    return !t.error && next_token(&t) == NULL;
}

static void print_json_hex(const char *key, const void *data, size_t length) {
    printf(",\"%s\":\"", key);
    print_hex((const uint8_t *)data, length);
    printf("\"");
}

static void print_f32_array(const char *key, const float *values, size_t count) {
    size_t i;
    printf(",\"%s\":[", key);
    for (i = 0; i < count; i++) {
        uint32_t bits;
        memcpy(&bits, &values[i], sizeof(bits));
        printf("%s\"%08lx\"", i ? "," : "", (unsigned long)bits);
    }
    printf("]");
}

static void print_f64(const char *key, const double *value) {
    uint64_t bits;
    memcpy(&bits, value, sizeof(bits));
    printf(",\"%s\":\"%016llx\"", key, (unsigned long long)bits);
}

static const char *type_name(uint8_t type) {
    switch (type) {
    case METACTL_MSG_HELLO:
        return "HELLO";
    case METACTL_MSG_CAPABILITIES:
        return "CAPABILITIES";
    case METACTL_MSG_STATE:
        return "STATE";
    case METACTL_MSG_COMMAND:
        return "COMMAND";
    case METACTL_MSG_MODE:
        return "MODE";
    case METACTL_MSG_RESET:
        return "RESET";
    case METACTL_MSG_HEARTBEAT:
        return "HEARTBEAT";
    case METACTL_MSG_ESTOP:
        return "ESTOP";
    case METACTL_MSG_FAULT:
        return "FAULT";
    default:
        return "?";
    }
}

/* {"seq":..,"type":..,<fields named as the Python dataclass fields>} */
static void print_message(uint16_t seq, const metactl_message *m) {
    size_t i;
    printf("{\"seq\":%u,\"type\":\"%s\"", (unsigned)seq, type_name(m->type));
    switch (m->type) {
    case METACTL_MSG_HELLO:
        printf(",\"protocol_version\":%u", (unsigned)m->as.hello.protocol_version);
        print_json_hex("host_name", m->as.hello.host_name.bytes, m->as.hello.host_name.length);
        break;
    case METACTL_MSG_CAPABILITIES: {
        const metactl_capabilities *caps = &m->as.capabilities;
        printf(",\"protocol_version\":%u", (unsigned)caps->protocol_version);
        print_json_hex("robot", caps->robot.bytes, caps->robot.length);
        printf(",\"control_rate_hz\":%u,\"flags\":%u,\"joint_names\":[", (unsigned)caps->control_rate_hz,
               (unsigned)caps->flags);
        for (i = 0; i < caps->num_joints; i++) {
            printf("%s\"", i ? "," : "");
            print_hex((const uint8_t *)caps->name_bytes + caps->name_offset[i], caps->name_length[i]);
            printf("\"");
        }
        printf("]");
        break;
    }
    case METACTL_MSG_STATE: {
        const metactl_state *s = &m->as.state;
        printf(",\"tick\":%lu", (unsigned long)s->tick);
        print_f64("time", &s->time);
        printf(",\"mode\":%u,\"flags\":%u", (unsigned)s->mode, (unsigned)s->flags);
        print_f32_array("joint_pos", s->joint_pos, s->num_joints);
        print_f32_array("joint_vel", s->joint_vel, s->num_joints);
        print_f32_array("joint_torque", s->joint_torque, s->num_joints);
        print_f32_array("quat", s->quat, 4);
        print_f32_array("gyro", s->gyro, 3);
        print_f32_array("accel", s->accel, 3);
        print_f32_array("base_vel", s->base_vel, 3);
        break;
    }
    case METACTL_MSG_COMMAND: {
        const metactl_command *c = &m->as.command;
        printf(",\"tick\":%lu", (unsigned long)c->tick);
        print_f32_array("targets", c->targets, c->num_joints);
        print_f32_array("kp", c->kp, c->num_joints);
        print_f32_array("kd", c->kd, c->num_joints);
        break;
    }
    case METACTL_MSG_MODE:
        printf(",\"mode\":%u", (unsigned)m->as.mode.mode);
        break;
    case METACTL_MSG_RESET:
        printf(",\"status\":%u", (unsigned)m->as.reset.status);
        break;
    case METACTL_MSG_HEARTBEAT:
        printf(",\"nonce\":%lu", (unsigned long)m->as.heartbeat.nonce);
        print_f64("time", &m->as.heartbeat.time);
        break;
    case METACTL_MSG_ESTOP:
        printf(",\"reason\":%u", (unsigned)m->as.estop.reason);
        break;
    case METACTL_MSG_FAULT:
        printf(",\"code\":%u", (unsigned)m->as.fault.code);
        print_json_hex("message", m->as.fault.message.bytes, m->as.fault.message.length);
        break;
    default:
        break;
    }
    printf("}\n");
}

static void print_decoder_stats(const metactl_decoder_stats *s) {
    printf("{\"frames_ok\":%lu,\"crc_errors\":%lu,\"cobs_errors\":%lu,\"length_errors\":%lu,\"unknown_types\":%lu,"
           "\"version_errors\":%lu,\"payload_errors\":%lu,\"oversize\":%lu,\"seq_gaps\":%lu,\"duplicates\":%lu,"
           "\"seq_resets\":%lu,\"skipped_bytes\":%lu}",
           (unsigned long)s->frames_ok, (unsigned long)s->crc_errors, (unsigned long)s->cobs_errors,
           (unsigned long)s->length_errors, (unsigned long)s->unknown_types, (unsigned long)s->version_errors,
           (unsigned long)s->payload_errors, (unsigned long)s->oversize, (unsigned long)s->seq_gaps,
           (unsigned long)s->duplicates, (unsigned long)s->seq_resets, (unsigned long)s->skipped_bytes);
}

/* -- modes ------------------------------------------------------------------------------------------ */

static int run_crc(inputs *in) {
    char *line;
    while ((line = next_line(in)) != NULL) {
        size_t length = 0;
        if (!parse_hex(line, bytes_buffer, sizeof(bytes_buffer), &length)) {
            printf("error hex\n");
            continue;
        }
        printf("%08lx\n", (unsigned long)metactl_crc32(0, bytes_buffer, length));
    }
    return 0;
}

static int run_decode(inputs *in) {
    char *line;
    while ((line = next_line(in)) != NULL) {
        size_t length = 0;
        uint16_t seq = 0;
        metactl_status status;
        if (!parse_hex(line, bytes_buffer, sizeof(bytes_buffer), &length)) {
            printf("{\"error\":\"hex\"}\n");
            continue;
        }
        status = metactl_decode_frame(bytes_buffer, length, &seq, &message);
        if (status != METACTL_OK) {
            printf("{\"error\":\"%s\"}\n", metactl_status_name(status));
        } else {
            print_message(seq, &message);
        }
    }
    return 0;
}

static int run_encode(inputs *in) {
    char *line;
    while ((line = next_line(in)) != NULL) {
        uint16_t seq = 0;
        size_t length = 0;
        metactl_status status;
        if (!parse_message(line, &seq, &message)) {
            printf("error parse\n");
            continue;
        }
        status = metactl_encode_frame(&message, seq, wire_buffer, sizeof(wire_buffer), &length);
        if (status != METACTL_OK) {
            printf("error %s\n", metactl_status_name(status));
            continue;
        }
        print_hex(wire_buffer, length);
        printf("\n");
    }
    return 0;
}

static int run_stream(inputs *in, bool resync) {
    static metactl_decoder decoder;
    char *line;
    unsigned peak = 0;
    metactl_decoder_init(&decoder, resync);
    while ((line = next_line(in)) != NULL) {
        size_t length = 0;
        size_t i;
        if (!parse_hex(line, bytes_buffer, sizeof(bytes_buffer), &length)) {
            printf("{\"error\":\"hex\"}\n");
            continue;
        }
        for (i = 0; i < length; i++) {
            uint16_t seq = 0;
            if (metactl_decoder_push(&decoder, bytes_buffer[i], &seq, &message)) {
                print_message(seq, &message);
            }
            if (decoder.length > peak) {
                peak = decoder.length;
            }
        }
    }
    printf("{\"stats\":");
    print_decoder_stats(&decoder.stats);
    printf(",\"pending_bytes\":%u,\"peak_pending_bytes\":%u}\n", (unsigned)decoder.length, peak);
    return 0;
}

/* Print and drain what the robot queued, closing the JSON object opened by the caller. */
static void finish_robot_line(metactl_robot *robot, bool initialized) {
    size_t length = 0;
    const uint8_t *data;
    if (!initialized) {
        printf(",\"mode\":null,\"tx\":\"\"}\n");
        return;
    }
    data = metactl_robot_tx_data(robot, &length);
    printf(",\"mode\":%u,\"tx\":\"", (unsigned)robot->mode);
    print_hex(data, length);
    printf("\"}\n");
    metactl_robot_tx_consume(robot, length);
}

static int run_robot(inputs *in) {
    static metactl_robot robot;
    static metactl_robot_config config;
    static char names[METACTL_MAX_JOINTS + 1u][64];
    bool initialized = false;
    char *line;
    while ((line = next_line(in)) != NULL) {
        tokens t;
        char *cmd;
        t.rest = line;
        t.error = false;
        cmd = next_token(&t);
        if (cmd == NULL) {
            continue;
        }
        printf("{\"cmd\":\"%s\"", cmd);
        if (strcmp(cmd, "config") == 0) {
            char *name;
            memset(&config, 0, sizeof(config));
            config.num_joints = (uint8_t)token_uint(&t, METACTL_MAX_JOINTS);
            config.capability_flags = (uint16_t)token_uint(&t, 0xFFFFu);
            config.watchdog_ms = (uint32_t)token_uint(&t, 0xFFFFFFFFu);
            config.damping_kd = (float)token_double(&t);
            config.max_kp = (float)token_double(&t);
            config.max_kd = (float)token_double(&t);
            config.control_rate_hz = (uint16_t)token_uint(&t, 0xFFFFu);
            name = next_token(&t);
            if (name != NULL) {
                strncpy(names[METACTL_MAX_JOINTS], name, sizeof(names[0]) - 1u);
            }
            config.robot_name = names[METACTL_MAX_JOINTS];
        } else if (strcmp(cmd, "joint") == 0) {
            unsigned long j = token_uint(&t, METACTL_MAX_JOINTS - 1u);
            char *name = next_token(&t);
            if (name != NULL) {
                strncpy(names[j], name, sizeof(names[0]) - 1u);
            }
            config.joint_names[j] = names[j];
            config.joint_lower[j] = (float)token_double(&t);
            config.joint_upper[j] = (float)token_double(&t);
            config.torque_limit[j] = (float)token_double(&t);
        } else if (strcmp(cmd, "init") == 0) {
            uint32_t now = (uint32_t)token_uint(&t, 0xFFFFFFFFu);
            metactl_status status = metactl_robot_init(&robot, &config, now);
            initialized = status == METACTL_OK;
            printf(",\"status\":\"%s\"", metactl_status_name(status));
        } else if (!initialized) {
            t.error = true;
        } else if (strcmp(cmd, "rx") == 0) {
            uint32_t now = (uint32_t)token_uint(&t, 0xFFFFFFFFu);
            char *hex = next_token(&t);
            size_t length = 0;
            if (hex != NULL && parse_hex(hex, bytes_buffer, sizeof(bytes_buffer), &length)) {
                metactl_robot_receive(&robot, bytes_buffer, length, now);
            } else {
                t.error = true;
            }
        } else if (strcmp(cmd, "tick") == 0) {
            metactl_robot_tick(&robot, (uint32_t)token_uint(&t, 0xFFFFFFFFu));
        } else if (strcmp(cmd, "torques") == 0) {
            float q[METACTL_MAX_JOINTS];
            float qd[METACTL_MAX_JOINTS];
            float tau[METACTL_MAX_JOINTS];
            size_t j;
            for (j = 0; j < config.num_joints; j++) {
                q[j] = (float)token_double(&t);
            }
            for (j = 0; j < config.num_joints; j++) {
                qd[j] = (float)token_double(&t);
            }
            if (!t.error) {
                metactl_robot_compute_torques(&robot, q, qd, tau);
                printf(",\"tau\":[");
                for (j = 0; j < config.num_joints; j++) {
                    printf("%s%.9g", j ? "," : "", (double)tau[j]);
                }
                printf("]");
            }
        } else if (strcmp(cmd, "state") == 0) {
            static metactl_state state;
            memset(&state, 0, sizeof(state));
            state.quat[3] = 1.0f;
            metactl_robot_send_state(&robot, &state);
        } else if (strcmp(cmd, "estop") == 0) {
            bool asserted = token_uint(&t, 1u) != 0u;
            metactl_robot_set_estop_input(&robot, asserted, (uint8_t)token_uint(&t, 0xFFu));
        } else if (strcmp(cmd, "stats") == 0) {
            const metactl_robot_stats *s = &robot.stats;
            printf(",\"robot\":{\"commands_applied\":%lu,\"commands_ignored\":%lu,\"commands_clamped\":%lu,"
                   "\"torques_clamped\":%lu,\"nonfinite_readings\":%lu,\"watchdog_trips\":%lu,\"estops\":%lu,"
                   "\"tx_dropped_frames\":%lu},\"decoder\":",
                   (unsigned long)s->commands_applied, (unsigned long)s->commands_ignored,
                   (unsigned long)s->commands_clamped, (unsigned long)s->torques_clamped,
                   (unsigned long)s->nonfinite_readings, (unsigned long)s->watchdog_trips, (unsigned long)s->estops,
                   (unsigned long)s->tx_dropped_frames);
            print_decoder_stats(&robot.decoder.stats);
        } else {
            t.error = true;
        }
        if (t.error) {
            printf(",\"error\":\"bad command line\"");
        }
        finish_robot_line(&robot, initialized);
    }
    return 0;
}

static int run_sizes(void) {
    printf("{\"metactl_message\":%lu,\"metactl_decoder\":%lu,\"metactl_robot\":%lu,\"metactl_robot_config\":%lu}\n",
           (unsigned long)sizeof(metactl_message), (unsigned long)sizeof(metactl_decoder),
           (unsigned long)sizeof(metactl_robot), (unsigned long)sizeof(metactl_robot_config));
    return 0;
}

int main(int argc, char **argv) {
    inputs in;
    const char *mode;
    int first = 2;
    bool resync = false;
    if (argc < 2) {
        fprintf(stderr, "usage: host_test crc|decode|encode|stream [--resync]|robot|sizes [INPUT...]\n");
        return 2;
    }
    mode = argv[1];
    if (strcmp(mode, "stream") == 0 && argc > 2 && strcmp(argv[2], "--resync") == 0) {
        resync = true;
        first = 3;
    }
    in.argc = argc - first;
    in.argv = argv + first;
    in.next = 0;
    if (strcmp(mode, "crc") == 0) {
        return run_crc(&in);
    }
    if (strcmp(mode, "decode") == 0) {
        return run_decode(&in);
    }
    if (strcmp(mode, "encode") == 0) {
        return run_encode(&in);
    }
    if (strcmp(mode, "stream") == 0) {
        return run_stream(&in, resync);
    }
    if (strcmp(mode, "robot") == 0) {
        return run_robot(&in);
    }
    if (strcmp(mode, "sizes") == 0) {
        return run_sizes();
    }
    fprintf(stderr, "host_test: unknown mode '%s'; valid: crc, decode, encode, stream, robot, sizes\n", mode);
    return 2;
}
