/*
 * metactl robot side: the protocol v1 state machine (see metactl_robot.h).
 */
#include "metactl_robot.h"

#include <string.h>

/* Finite test on the bits, so it holds under -ffast-math and needs no libm. */
static bool is_finite(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return (bits & 0x7F800000u) != 0x7F800000u;
}

static bool is_nan(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return (bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0u;
}

static float quiet_nan(void) {
    const uint32_t bits = 0x7FC00000u; /* the NaN of docs/protocol.md: bytes 00 00 c0 7f */
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
}

static float clamp(float value, float low, float high, bool *clamped) {
    if (value < low) {
        *clamped = true;
        return low;
    }
    if (value > high) {
        *clamped = true;
        return high;
    }
    return value;
}

static uint32_t watchdog_ms(const metactl_robot *robot) {
    return robot->config->watchdog_ms == 0u ? METACTL_WATCHDOG_MS : robot->config->watchdog_ms;
}

/* -- sending ---------------------------------------------------------------------------------------- */

/* Frame robot->tx_message into the TX buffer with the next seq. */
static void send_message(metactl_robot *robot) {
    size_t length = 0;
    metactl_status status = metactl_encode_frame(&robot->tx_message, robot->tx_seq, robot->tx + robot->tx_length,
                                                 sizeof(robot->tx) - robot->tx_length, &length);
    if (status == METACTL_OK) {
        robot->tx_length += length;
        robot->tx_seq++;
    } else if (status == METACTL_ERR_BUFFER) {
        /* The UART is not draining: drop the frame rather than stall the control loop, but use up its
         * seq so the host counts the loss as a gap. */
        robot->stats.tx_dropped_frames++;
        robot->tx_seq++;
    }
}

static void send_fault(metactl_robot *robot, uint16_t code, const char *text) {
    robot->tx_message.type = METACTL_MSG_FAULT;
    robot->tx_message.as.fault.code = code;
    (void)metactl_string_set(&robot->tx_message.as.fault.message, text, strlen(text));
    send_message(robot);
}

static void send_reset_reply(metactl_robot *robot, uint8_t status) {
    robot->tx_message.type = METACTL_MSG_RESET;
    robot->tx_message.as.reset.status = status;
    send_message(robot);
}

static metactl_status build_capabilities(metactl_robot *robot) {
    const metactl_robot_config *config = robot->config;
    metactl_capabilities *caps = &robot->tx_message.as.capabilities;
    metactl_status status;
    uint8_t j;
    robot->tx_message.type = METACTL_MSG_CAPABILITIES;
    caps->protocol_version = (uint8_t)METACTL_PROTOCOL_VERSION;
    status = metactl_string_set(&caps->robot, config->robot_name, strlen(config->robot_name));
    caps->control_rate_hz = config->control_rate_hz;
    caps->flags = config->capability_flags;
    caps->num_joints = 0;
    for (j = 0; j < config->num_joints && status == METACTL_OK; j++) {
        status = metactl_capabilities_add_joint(caps, config->joint_names[j], strlen(config->joint_names[j]));
    }
    return status;
}

/* -- modes ------------------------------------------------------------------------------------------ */

static void enter_mode(metactl_robot *robot, uint8_t mode) {
    robot->mode = mode;
    robot->has_command = false; /* POSITION damps until a Command made for it arrives */
    robot->targets_clamped = false;
    robot->last_command_ms = robot->now_ms; /* the watchdog window starts at the request */
}

static void latch_estop(metactl_robot *robot) {
    enter_mode(robot, METACTL_MODE_ESTOP);
    robot->stats.estops++;
}

static void handle_command(metactl_robot *robot, const metactl_command *command) {
    const metactl_robot_config *config = robot->config;
    bool finite = command->num_joints == config->num_joints;
    bool clamped = false;
    uint8_t j;
    for (j = 0; finite && j < command->num_joints; j++) {
        finite = is_finite(command->targets[j]) && is_finite(command->kp[j]) && is_finite(command->kd[j]);
    }
    if (robot->mode == METACTL_MODE_ESTOP) {
        robot->stats.commands_ignored++;
        send_fault(robot, METACTL_FAULT_ESTOP_LATCHED, "in ESTOP: send Reset first");
        return;
    }
    if (!finite) {
        robot->stats.commands_ignored++;
        send_fault(robot, METACTL_FAULT_BAD_COMMAND, "Command ignored: wrong joint count or non-finite value");
        return;
    }
    if (robot->mode != METACTL_MODE_POSITION) {
        robot->stats.commands_ignored++;
        send_fault(robot, METACTL_FAULT_BAD_REQUEST, "Command ignored: not in POSITION, send ModeRequest(POSITION)");
        return;
    }
    /* target in [lower, upper], kp in [0, max_kp], kd in [0, max_kd] */
    for (j = 0; j < config->num_joints; j++) {
        robot->targets[j] = clamp(command->targets[j], config->joint_lower[j], config->joint_upper[j], &clamped);
        robot->kp[j] = clamp(command->kp[j], 0.0f, config->max_kp, &clamped);
        robot->kd[j] = clamp(command->kd[j], 0.0f, config->max_kd, &clamped);
    }
    robot->has_command = true;
    robot->last_command_ms = robot->now_ms;
    robot->stats.commands_applied++;
    if (clamped) {
        robot->stats.commands_clamped++;
        /* One Fault when clamping starts, not one per Command: a policy may ride a limit for a while. */
        if (!robot->targets_clamped) {
            send_fault(robot, METACTL_FAULT_LIMIT_CLAMPED, "Command clamped to the joint or gain limits");
        }
    }
    robot->targets_clamped = clamped;
}

static void handle_mode_request(metactl_robot *robot, uint8_t requested) {
    if (robot->mode == METACTL_MODE_ESTOP) {
        if (requested != METACTL_MODE_ESTOP) {
            send_fault(robot, METACTL_FAULT_ESTOP_LATCHED, "in ESTOP: send Reset first");
        }
    } else if (requested == METACTL_MODE_ESTOP) {
        latch_estop(robot);
    } else if (requested != robot->mode) {
        /* Re-requesting the current mode changes nothing: in particular it does not feed the watchdog. */
        enter_mode(robot, requested);
    }
}

static void handle_reset(metactl_robot *robot, uint8_t status) {
    if (status != METACTL_RESET_REQUEST) {
        send_fault(robot, METACTL_FAULT_BAD_REQUEST, "Reset from the host must carry status 0");
        return;
    }
    if (robot->estop_input) {
        send_reset_reply(robot, METACTL_RESET_REFUSED); /* the e-stop input is still asserted */
        return;
    }
    enter_mode(robot, METACTL_MODE_DAMPING);
    robot->torque_clamped = false;
    if (robot->config->capability_flags & METACTL_CAP_RESET_SUPPORTED) {
        robot->episode_start = true;
    }
    send_reset_reply(robot, METACTL_RESET_DONE);
}

static void handle_message(metactl_robot *robot) {
    const metactl_message *message = &robot->rx_message;
    switch (message->type) {
    case METACTL_MSG_HELLO:
        if (build_capabilities(robot) == METACTL_OK) {
            send_message(robot);
        }
        break;
    case METACTL_MSG_COMMAND:
        handle_command(robot, &message->as.command);
        break;
    case METACTL_MSG_MODE:
        handle_mode_request(robot, message->as.mode.mode);
        break;
    case METACTL_MSG_RESET:
        handle_reset(robot, message->as.reset.status);
        break;
    case METACTL_MSG_HEARTBEAT:
        /* Echoed unchanged: nonce and time bits are copied, never computed on. */
        robot->tx_message.type = METACTL_MSG_HEARTBEAT;
        memcpy(&robot->tx_message.as.heartbeat, &message->as.heartbeat, sizeof(message->as.heartbeat));
        send_message(robot);
        break;
    case METACTL_MSG_ESTOP:
        latch_estop(robot);
        break;
    default:
        send_fault(robot, METACTL_FAULT_BAD_REQUEST, "the robot does not accept this message type");
        break;
    }
}

/* -- public API ------------------------------------------------------------------------------------- */

static bool config_valid(const metactl_robot_config *config) {
    uint8_t j;
    if (config == NULL || config->robot_name == NULL || config->num_joints == 0u ||
        config->num_joints > METACTL_MAX_JOINTS) {
        return false;
    }
    if (!is_finite(config->damping_kd) || !is_finite(config->max_kp) || !is_finite(config->max_kd) ||
        config->damping_kd < 0.0f || config->max_kp < 0.0f || config->max_kd < 0.0f) {
        return false;
    }
    for (j = 0; j < config->num_joints; j++) {
        if (config->joint_names[j] == NULL || !is_finite(config->joint_lower[j]) ||
            !is_finite(config->joint_upper[j]) || config->joint_lower[j] > config->joint_upper[j] ||
            !is_finite(config->torque_limit[j]) || !(config->torque_limit[j] > 0.0f)) {
            return false;
        }
    }
    return true;
}

metactl_status metactl_robot_init(metactl_robot *robot, const metactl_robot_config *config, uint32_t now_ms) {
    size_t length = 0;
    memset(robot, 0, sizeof(*robot));
    if (!config_valid(config)) {
        return METACTL_ERR_INVALID;
    }
    robot->config = config;
    /* Capabilities must fit one frame and the TX buffer, or the handshake could never succeed. */
    if (build_capabilities(robot) != METACTL_OK ||
        metactl_encode_frame(&robot->tx_message, 0, robot->tx, sizeof(robot->tx), &length) != METACTL_OK) {
        robot->config = NULL;
        return METACTL_ERR_INVALID;
    }
    /* The port may already carry bytes when the robot boots: a partial first frame is not an error. */
    metactl_decoder_init(&robot->decoder, true);
    robot->now_ms = now_ms;
    enter_mode(robot, METACTL_MODE_DAMPING);
    robot->episode_start = true;
    return METACTL_OK;
}

void metactl_robot_tick(metactl_robot *robot, uint32_t now_ms) {
    robot->now_ms = now_ms;
    if (robot->mode != METACTL_MODE_POSITION || (robot->config->capability_flags & METACTL_CAP_LOCKSTEP)) {
        return; /* in LOCKSTEP the robot waits for each Command: no watchdog */
    }
    /* Unsigned difference: correct across the 2^32 ms wrap. */
    if ((uint32_t)(now_ms - robot->last_command_ms) > watchdog_ms(robot)) {
        enter_mode(robot, METACTL_MODE_DAMPING);
        robot->stats.watchdog_trips++;
        send_fault(robot, METACTL_FAULT_WATCHDOG, "no Command within the watchdog period: damping");
    }
}

void metactl_robot_receive(metactl_robot *robot, const uint8_t *data, size_t length, uint32_t now_ms) {
    size_t i;
    uint16_t seq;
    /* Watchdog first: a Command that arrives after the window has closed must not revive POSITION. */
    metactl_robot_tick(robot, now_ms);
    for (i = 0; i < length; i++) {
        if (metactl_decoder_push(&robot->decoder, data[i], &seq, &robot->rx_message)) {
            handle_message(robot);
        }
    }
}

void metactl_robot_compute_torques(metactl_robot *robot, const float *q, const float *qd, float *tau) {
    const metactl_robot_config *config = robot->config;
    bool clamped = false;
    bool nonfinite = false;
    uint8_t j;
    for (j = 0; j < config->num_joints; j++) {
        float torque;
        float limit = config->torque_limit[j];
        if (!is_finite(q[j]) || !is_finite(qd[j])) {
            tau[j] = 0.0f;
            nonfinite = true;
            continue;
        }
        if (robot->mode == METACTL_MODE_PASSIVE) {
            torque = 0.0f;
        } else if (robot->mode == METACTL_MODE_POSITION && robot->has_command) {
            torque = robot->kp[j] * (robot->targets[j] - q[j]) - robot->kd[j] * qd[j]; /* tau = kp (q* - q) - kd qd */
        } else {
            torque = -config->damping_kd * qd[j]; /* DAMPING, ESTOP, POSITION before its first Command */
        }
        if (is_nan(torque)) {
            torque = 0.0f; /* inf - inf from extreme readings; an infinity clamps below */
        }
        tau[j] = clamp(torque, -limit, limit, &clamped);
    }
    if (nonfinite) {
        robot->stats.nonfinite_readings++;
    }
    if (clamped) {
        robot->stats.torques_clamped++;
        if (!robot->torque_clamped) {
            send_fault(robot, METACTL_FAULT_LIMIT_CLAMPED, "torque clamped to the torque limit");
        }
    }
    robot->torque_clamped = clamped;
}

void metactl_robot_send_state(metactl_robot *robot, metactl_state *state) {
    uint8_t flags = (uint8_t)(state->flags & ~METACTL_STATE_EPISODE_START);
    if (robot->episode_start) {
        flags |= METACTL_STATE_EPISODE_START;
        robot->episode_start = false;
    }
    state->flags = flags;
    state->tick = robot->tick++;
    state->mode = robot->mode;
    state->num_joints = robot->config->num_joints;
    if (!(robot->config->capability_flags & METACTL_CAP_BASE_VELOCITY)) {
        state->base_vel[0] = state->base_vel[1] = state->base_vel[2] = quiet_nan(); /* not measured */
    }
    robot->tx_message.type = METACTL_MSG_STATE;
    memcpy(&robot->tx_message.as.state, state, sizeof(*state));
    send_message(robot);
}

void metactl_robot_set_estop_input(metactl_robot *robot, bool asserted, uint8_t reason) {
    if (asserted && !robot->estop_input) {
        latch_estop(robot);
        robot->tx_message.type = METACTL_MSG_ESTOP;
        robot->tx_message.as.estop.reason = reason;
        send_message(robot);
    }
    robot->estop_input = asserted;
}

const uint8_t *metactl_robot_tx_data(const metactl_robot *robot, size_t *length) {
    *length = robot->tx_length;
    return robot->tx;
}

void metactl_robot_tx_consume(metactl_robot *robot, size_t count) {
    if (count >= robot->tx_length) {
        robot->tx_length = 0;
        return;
    }
    memmove(robot->tx, robot->tx + count, robot->tx_length - count);
    robot->tx_length -= count;
}
