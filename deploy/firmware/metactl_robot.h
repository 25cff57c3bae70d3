/*
 * metactl robot side: the protocol v1 state machine a microcontroller runs (docs/protocol.md, "Modes").
 *
 * - Powers up in DAMPING; moves only after ModeRequest(POSITION) and a Command.
 * - Watchdog: in POSITION, more than `watchdog_ms` (50) without a Command drops to DAMPING and sends
 *   Fault WATCHDOG; the host must request POSITION again. Heartbeats do not feed it. Off in LOCKSTEP.
 * - ESTOP (an EStop message, ModeRequest(ESTOP) or the robot's own e-stop input) latches: every joint
 *   damps and ModeRequest / Command are refused with Fault ESTOP_LATCHED until a Reset.
 * - Commands: targets clamped to the joint limits, gains to [0, max], torques to +-torque_limit.
 *
 * No OS, no malloc, no I/O: the integrator passes in received bytes, the time in milliseconds and the
 * joint readings, and takes out the bytes to send and the torques to apply (see README.md).
 */
#ifndef METACTL_ROBOT_H
#define METACTL_ROBOT_H

#include "metactl_protocol.h"

/* Outgoing bytes waiting for the UART. Frames that do not fit are dropped (counted in
 * stats.tx_dropped_frames; their seq is still used up, so the host sees the gap). */
#ifndef METACTL_TX_BUFFER_SIZE
#define METACTL_TX_BUFFER_SIZE 4096u
#endif

#define METACTL_WATCHDOG_MS 50u

/* What the robot is: supplied once by the integrator and kept alive (e.g. `static const`). */
typedef struct {
    const char *robot_name;                       /* the robot spec's name, e.g. "a1" (UTF-8, NUL-terminated) */
    uint8_t num_joints;                           /* 1 .. METACTL_MAX_JOINTS */
    const char *joint_names[METACTL_MAX_JOINTS];  /* in the robot spec's joint order */
    float joint_lower[METACTL_MAX_JOINTS];        /* rad */
    float joint_upper[METACTL_MAX_JOINTS];        /* rad */
    float torque_limit[METACTL_MAX_JOINTS];       /* N m, > 0 */
    float damping_kd;                             /* N m s / rad, gain in DAMPING and ESTOP */
    float max_kp;                                 /* commanded kp is clamped to [0, max_kp] */
    float max_kd;                                 /* commanded kd is clamped to [0, max_kd] */
    uint16_t control_rate_hz;                     /* State rate, announced in Capabilities */
    uint16_t capability_flags;                    /* METACTL_CAP_* */
    uint32_t watchdog_ms;                         /* 0 means METACTL_WATCHDOG_MS */
} metactl_robot_config;

/* Counters for the integrator's diagnostics; the protocol does not carry them. */
typedef struct {
    uint32_t commands_applied;
    uint32_t commands_ignored;   /* not in POSITION, in ESTOP, or malformed (each answered with a Fault) */
    uint32_t commands_clamped;   /* a target or gain was clamped */
    uint32_t torques_clamped;    /* control steps where some torque hit its limit */
    uint32_t nonfinite_readings; /* control steps with a NaN/inf joint reading (that joint gets 0 torque) */
    uint32_t watchdog_trips;
    uint32_t estops;
    uint32_t tx_dropped_frames;
} metactl_robot_stats;

typedef struct {
    const metactl_robot_config *config;
    uint8_t mode;            /* metactl_mode */
    bool has_command;        /* a Command arrived since POSITION was entered; before it, POSITION damps */
    bool episode_start;      /* the next State carries EPISODE_START */
    bool estop_input;        /* the robot's own e-stop input is asserted: Reset is refused */
    bool targets_clamped;    /* the last Command was clamped (LIMIT_CLAMPED is sent when this starts) */
    bool torque_clamped;     /* the last control step clamped a torque (same) */
    uint32_t now_ms;         /* latest time passed in */
    uint32_t last_command_ms;
    uint32_t tick;           /* State counter */
    float targets[METACTL_MAX_JOINTS];
    float kp[METACTL_MAX_JOINTS];
    float kd[METACTL_MAX_JOINTS];
    uint16_t tx_seq;
    size_t tx_length;
    uint8_t tx[METACTL_TX_BUFFER_SIZE];
    metactl_decoder decoder;
    metactl_message rx_message; /* scratch: the frame being handled */
    metactl_message tx_message; /* scratch: the frame being sent */
    metactl_robot_stats stats;
} metactl_robot;

#ifdef __cplusplus
extern "C" {
#endif

/* Validate `config` (kept by pointer), power up in DAMPING at time `now_ms`. METACTL_ERR_INVALID
 * names nothing, so check: 1 <= num_joints <= METACTL_MAX_JOINTS, lower <= upper, torque_limit > 0,
 * finite non-negative gains, UTF-8 names that fit one Capabilities payload. */
metactl_status metactl_robot_init(metactl_robot *robot, const metactl_robot_config *config, uint32_t now_ms);

/* Bytes received from the host at time `now_ms` (any chunking: one byte from an ISR is fine). */
void metactl_robot_receive(metactl_robot *robot, const uint8_t *data, size_t length, uint32_t now_ms);

/* Call every millisecond or at least once per control step: runs the watchdog. `now_ms` comes from a
 * monotonic clock; it may wrap at 2^32. */
void metactl_robot_tick(metactl_robot *robot, uint32_t now_ms);

/* Torques for this control step from joint positions `q` (rad) and velocities `qd` (rad/s), each
 * num_joints long, by mode:
 *   PASSIVE            tau = 0
 *   DAMPING, ESTOP     tau = -damping_kd qd
 *   POSITION           tau = kp (target - q) - kd qd   (damping until the first Command arrives)
 * then clamped to +-torque_limit. A non-finite reading gives that joint 0 torque. */
void metactl_robot_compute_torques(metactl_robot *robot, const float *q, const float *qd, float *tau);

/* Queue a State: the integrator fills time, sensors and FALLEN; this sets tick, mode, num_joints and
 * EPISODE_START, then advances the tick. */
void metactl_robot_send_state(metactl_robot *robot, metactl_state *state);

/* The robot's own e-stop input (button, over-temperature, ...). Asserting it latches ESTOP and sends
 * EStop(reason); while asserted, a Reset is refused. Releasing it does not unlatch: a Reset does. */
void metactl_robot_set_estop_input(metactl_robot *robot, bool asserted, uint8_t reason);

/* Bytes waiting to be written to the UART; after writing n of them, call metactl_robot_tx_consume. */
const uint8_t *metactl_robot_tx_data(const metactl_robot *robot, size_t *length);
void metactl_robot_tx_consume(metactl_robot *robot, size_t count);

#ifdef __cplusplus
}
#endif

#endif /* METACTL_ROBOT_H */
