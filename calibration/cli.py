"""`metactl`: the one command-line front door. It parses and dispatches; each subcommand's logic
lives in the package that owns it, imported only when that subcommand runs (so `metactl deploy`
on the robot's computer never imports PyBullet).

It sits in calibration/ because calibration is the one package allowed to import all the others.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from controller.errors import ConfigError, MetactlError


def _train(args: argparse.Namespace) -> int:
    from sim.training import train

    run_dir = train(
        args.config,
        args.set,
        run_dir=args.run_dir,
        calibration=args.calibration,
        progress=not args.quiet,
        command=shlex.join(["metactl", *args.argv]),
    )
    print(f"run directory: {run_dir.path}")
    return 0


def _floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def _emulate(args: argparse.Namespace) -> int:
    from sim.emulator import serve

    serve(
        args.robot,
        args.task,
        lockstep=args.lockstep,
        joint_offsets=args.joint_offsets,
        gyro_bias=args.gyro_bias,
        imu_tilt=args.imu_tilt,
        supports_reset=not args.refuse_reset,
        duration=args.seconds,
        faults=args.faults,
        link_path=args.link_path,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from deploy.export import export_run

    bundle = export_run(args.run_dir, args.output)
    print(f"bundle written to {bundle}")
    return 0


def _calibration(path: str | None):
    if path is None:
        return None
    from calibration.files import load_calibration

    return load_calibration(path).for_deploy()


def _deploy(args: argparse.Namespace) -> int:
    from deploy.control import deploy

    deploy(
        args.bundle,
        args.port,
        episodes=args.episodes,
        seconds=args.seconds,
        command_vx=args.command_vx,
        calibration=_calibration(args.calibration),
        reset_wait=args.reset_wait,
    )
    return 0


def _adapt(args: argparse.Namespace) -> int:
    if args.rollback:
        from deploy.bundle import rollback

        print(f"rolled back {args.bundle} to {rollback(args.bundle)}")
        return 0
    if not args.port:
        raise SystemExit("metactl adapt: --port is required (or --rollback)")
    from deploy.adapt import adapt

    result = adapt(
        args.bundle,
        args.port,
        num_episodes=args.k,
        eval_episodes=args.eval_episodes,
        seconds=args.seconds,
        command_vx=args.command_vx,
        calibration=_calibration(args.calibration),
        reset_wait=args.reset_wait,
        keep_master=args.keep_master,
    )
    if result.algorithm == "rl2":
        print(f"return before: {result.return_before:.1f}  (fresh memory: {_fmt(result.before_returns)})")
        print(f"adaptation episodes: {_fmt(result.adaptation_returns)}  (one trial, hidden state carried)")
        memory = f"after {args.k} episodes of memory: {_fmt(result.after_returns)}"
        print(f"return after:  {result.return_after:.1f}  ({memory})")
        print(f"RL^2 adapts in its hidden state: nothing written; bundle is at {result.version}; plot: {result.plot}")
        return 0
    print(f"return before: {result.return_before:.1f}  (evaluation episodes: {_fmt(result.before_returns)})")
    print(f"adaptation episodes: {_fmt(result.adaptation_returns)}  (update {result.update_seconds:.2f} s)")
    print(f"return after:  {result.return_after:.1f}  (evaluation episodes: {_fmt(result.after_returns)})")
    verdict = "kept" if result.kept else "rejected (worse); bundle unchanged"
    print(f"candidate {result.candidate}: {verdict}; bundle is at {result.version}; plot: {result.plot}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from calibration.offsets import calibrate_offsets
    from controller.robot import load_robot_spec

    result = calibrate_offsets(args.port, load_robot_spec(args.robot), seconds=args.seconds, reset_wait=args.reset_wait)
    result.save(args.output)
    print(f"joint offsets (rad): {_fmt(result.joint_offsets, 4)}")
    print(f"gyro bias (rad/s):   {_fmt(result.gyro_bias, 4)}")
    print(f"IMU tilt (rad):      roll {result.imu_tilt[0]:.4f}, pitch {result.imu_tilt[1]:.4f}")
    print(f"from {result.recording['samples']} samples; written to {args.output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import json

    from calibration.demo import run_demo

    summary = run_demo(
        quick=args.quick,
        k=args.k,
        seconds=args.seconds,
        lockstep=not args.realtime,
        bundle=args.bundle,
        task=args.task,
        plot=args.plot,
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from sim.evaluation import evaluate

    try:
        ks = [int(value) for value in args.k.split(",")]
    except ValueError as error:
        raise ConfigError(f"-k must be comma-separated integers, got {args.k!r}") from error
    if args.suite is not None:
        from sim.fast_suite import run_suite
        from sim.fast_suite_report import markdown_table as suite_table

        results = run_suite(ks, budget=args.budget, out_dir=args.out or "runs/point_suite", progress=True)
        print(suite_table(results))
        print("written: " + ", ".join(results["files"]))
        if args.json:
            print(json.dumps(results["summary"]))
        return 0
    if args.run_dir is None or args.tasks is None:
        raise ConfigError("metactl eval needs RUN_DIR and --tasks (or --suite point)")
    results = evaluate(
        args.run_dir,
        args.tasks,
        ks,
        baseline=args.baseline,
        oracle=args.oracle,
        eval_episodes=args.episodes,
        seconds=args.seconds,
        seed=args.seed,
        out_dir=args.out,
    )
    from sim.evaluation import markdown_table

    print(markdown_table(results))
    print("written: " + ", ".join(results["files"]))
    if args.json:
        print(json.dumps(results["summary"]))
    return 0


def _sysid(args: argparse.Namespace) -> int:
    from pathlib import Path

    from calibration.files import load_calibration
    from calibration.sysid import calibrate_sysid
    from controller.robot import load_robot_spec

    existing = load_calibration(args.output) if Path(args.output).exists() else None
    result = calibrate_sysid(
        args.port,
        load_robot_spec(args.robot),
        parameters=args.parameters.split(","),
        seconds=args.seconds,
        max_evaluations=args.evaluations,
        calibration=existing,
    )
    result.save(args.output)
    for name, value in result.identified.items():
        print(f"{name:>16}: {value:.4f} +- {result.uncertainty[name]:.4f}")
    print(f"trajectory error {result.recording['sysid_error']:.4f}; written to {args.output}")
    return 0


def _link(args: argparse.Namespace) -> int:
    from deploy.bringup import check_link, format_report

    report = check_link(args.port, args.seconds)
    print(format_report(report))
    return 0 if report.ok else 1


def _fmt(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{value:.{digits}f}" for value in values)


def _robot_arguments(parser: argparse.ArgumentParser, required_port: bool = True) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--port", required=required_port, help="serial device, pty path, socket://host:port or loop://")
    parser.add_argument("--seconds", type=float, default=10.0, help="episode length")
    parser.add_argument("--command-vx", type=float, default=0.5, help="forward velocity command (m/s)")
    parser.add_argument("--calibration", help="calibration YAML from `metactl calibrate`")
    parser.add_argument("--reset-wait", type=float, help="seconds to wait for the operator when the robot cannot reset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metactl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="meta-train a policy in simulation")
    train.add_argument("config", help="training YAML, e.g. configs/a1_terrain.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    train.add_argument("--run-dir", help="where to write the run (default: runs/<config name>)")
    train.add_argument("--calibration", help="calibration YAML: re-centre the task ranges on identified values")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", help="turn a run's latest checkpoint into a bundle for the robot")
    export.add_argument("run_dir")
    export.add_argument("-o", "--output", required=True, help="bundle directory to create")
    export.set_defaults(handler=_export)

    emulate = commands.add_parser("emulate", help="a simulated robot speaking the serial protocol on a pty")
    emulate.add_argument("--robot", default="a1")
    emulate.add_argument("--task", help="task YAML: dynamics the host is not told")
    emulate.add_argument("--lockstep", action="store_true", help="advance one control step per Command")
    emulate.add_argument("--joint-offsets", type=_floats, help="comma-separated encoder zero offsets (rad)")
    emulate.add_argument("--gyro-bias", type=_floats, help="comma-separated gyro bias x,y,z (rad/s)")
    emulate.add_argument("--imu-tilt", type=_floats, help="IMU mounting roll,pitch (rad)")
    emulate.add_argument("--refuse-reset", action="store_true", help="act like a real robot that cannot reset")
    emulate.add_argument("--seconds", type=float, help="stop after this long")
    emulate.add_argument(
        "--faults",
        help="link faults on the frames sent, e.g. drop=0.05,corrupt=0.01,delay=0.02,duplicate=0.01,reorder=0.01,"
        "disconnect=SECONDS (after the first Hello; outage=SECONDS, seed=N)",
    )
    emulate.add_argument(
        "--link-path",
        help="path to serve: a symlink re-pointed at each new pty (so a host can reopen it), or socket://HOST:PORT",
    )
    emulate.set_defaults(handler=_emulate)

    link = commands.add_parser("link", help="bring-up: handshake, identity, latency and frame errors of a link")
    link.add_argument("--port", required=True, help="serial device, pty path, socket://host:port")
    link.add_argument("--seconds", type=float, default=3.0, help="how long to measure")
    link.set_defaults(handler=_link)

    deploy = commands.add_parser("deploy", help="run a bundle on the robot")
    _robot_arguments(deploy)
    deploy.add_argument("--episodes", type=int, default=1)
    deploy.set_defaults(handler=_deploy)

    adapt = commands.add_parser(
        "adapt", help="adapt on the robot from K episodes (MLSH master, MAML-family inner step, RL^2 memory)"
    )
    _robot_arguments(adapt, required_port=False)
    adapt.add_argument("-k", type=int, default=3, help="adaptation episodes")
    adapt.add_argument("--eval-episodes", type=int, default=1, help="evaluation episodes before and after")
    adapt.add_argument("--rollback", action="store_true", help="restore the previous version of the bundle")
    adapt.add_argument(
        "--keep-master",
        action="store_true",
        help="MLSH: adapt the bundle's current master (default: start a new task's master as training did)",
    )
    adapt.set_defaults(handler=_adapt)

    evaluation = commands.add_parser("eval", help="meta-test: return after K adaptation episodes on held-out tasks")
    evaluation.add_argument("run_dir", nargs="?", help="training run to evaluate (omit with --suite)")
    evaluation.add_argument("--tasks", help="YAML with `tasks: [...]` (held-out tasks)")
    evaluation.add_argument(
        "--suite", choices=["point"], help="train and meta-test every algorithm and baseline on a fast task"
    )
    evaluation.add_argument("--budget", choices=["quick", "full"], default="quick", help="training budget of --suite")
    evaluation.add_argument("-k", default="0,1,3,5", help="comma-separated adaptation episode counts")
    evaluation.add_argument("--baseline", help="domain-randomized run: evaluated as is and fine-tuning all weights")
    evaluation.add_argument("--oracle", help="run trained with the true task in its observation")
    evaluation.add_argument("--episodes", type=int, default=2, help="evaluation episodes per task and K")
    evaluation.add_argument("--seconds", type=float, default=10.0, help="episode length")
    evaluation.add_argument(
        "--seed", type=int, default=0, help="base seed of episodes and new-task masters (task i: seed + 100 i)"
    )
    evaluation.add_argument("--out", help="where to write eval.md/json/png (default: the run directory)")
    evaluation.add_argument("--json", action="store_true", help="end with one JSON line")
    evaluation.set_defaults(handler=_eval)

    demo = commands.add_parser("demo", help="emulated robot on held-out terrain: deploy, adapt, before/after")
    demo.add_argument("--quick", action="store_true", help="train a tiny policy first instead of the shipped bundle")
    demo.add_argument("--json", action="store_true", help="end with one JSON line")
    demo.add_argument("-k", type=int, default=3, help="adaptation episodes")
    demo.add_argument("--seconds", type=float, default=10.0, help="episode length")
    demo.add_argument("--realtime", action="store_true", help="emulator in real time instead of lockstep")
    demo.add_argument("--bundle", help="bundle to use instead of the shipped one")
    demo.add_argument("--task", help="task YAML for the emulator instead of the held-out one")
    demo.add_argument("--plot", default="demo_adaptation.png", help="where to write the returns plot (PNG)")
    demo.set_defaults(handler=_demo)

    calibrate = commands.add_parser("calibrate", help="measure the robot: sensor offsets and IMU tilt, dynamics")
    steps = calibrate.add_subparsers(dest="step", required=True)
    offsets = steps.add_parser("offsets", help="joint zero offsets and gyro bias from a static recording")
    offsets.add_argument("--port", required=True)
    offsets.add_argument("--robot", default="a1")
    offsets.add_argument("--seconds", type=float, default=3.0, help="recording length")
    offsets.add_argument("-o", "--output", default="calibration.yaml")
    offsets.add_argument("--reset-wait", type=float, help="seconds to wait for the operator if the robot cannot reset")
    offsets.set_defaults(handler=_calibrate)
    sysid = steps.add_parser("sysid", help="fit simulator parameters to an excitation recorded on the robot")
    sysid.add_argument("--port", required=True)
    sysid.add_argument("--robot", default="a1")
    sysid.add_argument(
        "--parameters", default="added_mass,motor_strength,friction,latency", help="comma-separated task parameters"
    )
    sysid.add_argument("--seconds", type=float, default=4.0, help="excitation length")
    sysid.add_argument("--evaluations", type=int, default=300, help="CMA-ES simulator replays")
    sysid.add_argument("-o", "--output", default="calibration.yaml", help="calibration YAML (merged if it exists)")
    sysid.set_defaults(handler=_sysid)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except MetactlError as error:
        print(f"metactl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metactl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
