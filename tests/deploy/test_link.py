"""Host link over real transports: loop://, a pseudo-terminal, and socket:// to a local TCP peer."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import tty
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from deploy.errors import LinkError, ProtocolError
from deploy.link import Link, handshake
from deploy.messages import (
    Capabilities,
    Capability,
    Command,
    EStop,
    Fault,
    Heartbeat,
    Hello,
    Mode,
    ModeRequest,
    Reset,
    State,
)
from deploy.protocol import FrameDecoder, FrameEncoder

JOINTS = ("hip", "knee")


def _state(tick: int) -> State:
    return State(tick, tick / 500, Mode.POSITION, 0, [0.1, 0.2], [0, 0], [0, 0], [0, 0, 0, 1], [0] * 3, [0] * 3)


def _wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


class RobotPeer(threading.Thread):
    """The robot end of a link, speaking the real codec over raw read/write callables.

    Answers Hello with Capabilities (or a Fault), Command(tick) with State(tick + 1), echoes
    Heartbeat, answers Reset; records every message it gets.
    """

    def __init__(self, read: Callable[[], bytes | None], write: Callable[[bytes], None], *, fault: bool = False):
        super().__init__(daemon=True)
        self._read, self._write, self._fault = read, write, fault
        self.decoder = FrameDecoder()
        self.encoder = FrameEncoder()
        self.received: list[object] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                data = self._read()
            except OSError:
                return
            if data is None:
                continue
            if data == b"":
                return
            for _seq, msg in self.decoder.feed(data):
                self.received.append(msg)
                reply = self._reply(msg)
                if reply is not None:
                    self._write(self.encoder.encode(reply))

    def _reply(self, msg: object) -> object | None:
        if isinstance(msg, Hello):
            if self._fault:
                return Fault(5, "not today")
            return Capabilities(1, "test-bot", 500, Capability.RESET_SUPPORTED, JOINTS)
        if isinstance(msg, Command):
            return _state(msg.tick + 1)
        if isinstance(msg, (Heartbeat, Reset)):
            return msg
        return None


@pytest.fixture
def pty_robot() -> Iterator[tuple[str, RobotPeer, list[int]]]:
    """A raw pty: the host opens the slave path, RobotPeer serves the master fd."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)

    def read() -> bytes | None:
        ready, _, _ = select.select([master], [], [], 0.02)
        return os.read(master, 4096) if ready else None

    def write(data: bytes) -> None:
        os.write(master, data)

    robot = RobotPeer(read, write)
    robot.start()
    fds = [master, slave]
    yield path, robot, fds
    robot.stop_event.set()
    robot.join(timeout=2)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
def tcp_robot() -> Iterator[tuple[str, dict[str, object]]]:
    """A one-connection TCP server on 127.0.0.1 serving RobotPeer; ``state['conn']`` is the socket."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5.0)
    shared: dict[str, object] = {}

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.settimeout(0.02)
            shared["conn"] = conn

            def read() -> bytes | None:
                try:
                    return conn.recv(4096)
                except TimeoutError:
                    return None

            robot = RobotPeer(read, conn.sendall)
            shared["robot"] = robot
            robot.run()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"socket://127.0.0.1:{server.getsockname()[1]}", shared
    if "robot" in shared:
        shared["robot"].stop_event.set()
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)  # wakes accept() if nobody connected
    thread.join(timeout=2)
    server.close()
    if "conn" in shared:
        shared["conn"].close()


def _command(tick: int) -> Command:
    return Command(tick, [0.0, 0.5], [20.0, 20.0], [0.5, 0.5])


def test_loop_round_trip_and_stats() -> None:
    with Link("loop://") as link:
        assert link.is_open
        assert link.send(Heartbeat(1, 0.5)) == 0
        assert link.send(EStop(2)) == 1
        assert link.recv(timeout=2) == Heartbeat(1, 0.5)
        assert link.recv(timeout=2) == EStop(2)
        assert link.recv(timeout=0.05) is None
        for tick in range(3):
            link.send(_state(tick))
        _wait_until(lambda: link.stats.decoder.frames_ok == 5)
        assert link.latest_state(timeout=1) == _state(2)
        assert link.latest_state(timeout=0.05) is None  # nothing newer
        stats = link.stats
        assert stats.frames_sent == 5 and stats.states_skipped == 2 and stats.corrupt == 0
        assert stats.bytes_sent == stats.bytes_received  # loop echoes every byte, the opening 0x00 included
        assert stats.decoder.seq_gaps == 0
    assert not link.is_open
    with pytest.raises(LinkError, match="not open"):
        link.send(EStop())


def test_loop_queue_overflow_reset_input_and_reopen() -> None:
    link = Link("loop://", queue_size=4)
    link.open()
    for nonce in range(10):
        link.send(Heartbeat(nonce, 0.0))
    _wait_until(lambda: link.stats.decoder.frames_ok == 10)
    assert link.stats.messages_dropped == 6
    assert [link.recv(0).nonce for _ in range(4)] == [6, 7, 8, 9]
    link.send(Heartbeat(99, 0.0))
    _wait_until(lambda: link.stats.decoder.frames_ok == 11)
    link.reset_input()
    assert link.recv(timeout=0.05) is None
    with pytest.raises(LinkError, match="already open"):
        link.open()
    link.close()
    link.close()  # idempotent
    link.open()  # reopens; counters carry on
    link.send(EStop())
    assert link.recv(timeout=2) == EStop()
    assert link.stats.frames_sent == 12
    link.close()


def test_open_errors_name_the_url() -> None:
    with pytest.raises(LinkError, match="/dev/does-not-exist"):
        Link("/dev/does-not-exist").open()
    with pytest.raises(LinkError, match="read_timeout"):
        Link("loop://", read_timeout=0)


def test_send_rejects_oversize_payload() -> None:
    with Link("loop://") as link, pytest.raises(ProtocolError, match="MAX_PAYLOAD"):
        link.send(Command(0, *(np.zeros(100),) * 3))


def test_handshake_timeout_names_url() -> None:
    with Link("loop://") as link:  # loop echoes our Hello: no robot answers
        start = time.monotonic()
        with pytest.raises(LinkError, match="loop://"):
            handshake(link, "host", timeout=0.3, retry_interval=0.1)
        assert time.monotonic() - start < 1.0


def test_pty_handshake_command_state_heartbeat(pty_robot: tuple[str, RobotPeer, list[int]]) -> None:
    path, robot, _ = pty_robot
    with Link(path) as link:
        capabilities = handshake(link, "test-host")
        assert capabilities.robot == "test-bot" and capabilities.joint_names == JOINTS
        assert capabilities.flags & Capability.RESET_SUPPORTED
        for tick in range(20):
            link.send(_command(tick))
            state = link.latest_state(timeout=2)
            assert state is not None and state.tick == tick + 1
        link.send(Heartbeat(77, 1.25))
        assert link.recv(timeout=2) == Heartbeat(77, 1.25)
        link.send(ModeRequest(Mode.DAMPING))
        _wait_until(lambda: ModeRequest(Mode.DAMPING) in robot.received)
        assert link.stats.corrupt == 0 and link.stats.decoder.seq_gaps == 0
    assert robot.decoder.stats.corrupt == 0 and robot.decoder.stats.frames_ok == 23


def test_pty_closed_by_robot_raises_link_error(pty_robot: tuple[str, RobotPeer, list[int]]) -> None:
    path, robot, fds = pty_robot
    with Link(path) as link:
        handshake(link, "test-host")
        robot.stop_event.set()
        robot.join(timeout=2)
        os.close(fds.pop(0))  # the robot side goes away: the slave sees a hangup (EIO)
        with pytest.raises(LinkError, match=path):
            link.latest_state(timeout=2)
        assert not link.is_open
        with pytest.raises(LinkError):
            link.send(_command(0))


def test_pty_handshake_fault(pty_robot: tuple[str, RobotPeer, list[int]]) -> None:
    path, robot, _ = pty_robot
    robot._fault = True
    with Link(path) as link, pytest.raises(LinkError, match="not today"):
        handshake(link, "test-host")


def test_socket_round_trip_and_disconnect(tcp_robot: tuple[str, dict[str, object]]) -> None:
    url, shared = tcp_robot
    with Link(url) as link:
        assert handshake(link, "test-host").control_rate_hz == 500
        for tick in range(50):
            link.send(_command(tick))
            assert link.latest_state(timeout=2).tick == tick + 1
        link.send(Reset(0))
        assert link.recv(timeout=2) == Reset(0)
        assert link.stats.corrupt == 0
        shared["robot"].stop_event.set()
        shared["conn"].close()
        with pytest.raises(LinkError, match="127.0.0.1"):
            link.latest_state(timeout=2)


@pytest.mark.parametrize("transport", ["loop", "pty", "socket"])
def test_close_while_reader_blocked_is_prompt(transport: str, request: pytest.FixtureRequest) -> None:
    fixture = {"pty": "pty_robot", "socket": "tcp_robot"}.get(transport)
    url = request.getfixturevalue(fixture)[0] if fixture else "loop://"
    # socket:// cannot cancel a read, so its wait is bounded by read_timeout instead
    link = Link(url, read_timeout=0.05 if transport == "socket" else 10.0)
    link.open()
    time.sleep(0.1)  # reader now blocked in read with nothing to read
    waiter_error: list[BaseException] = []

    def wait_forever() -> None:
        try:
            link.recv(timeout=None)
        except LinkError as error:
            waiter_error.append(error)

    waiter = threading.Thread(target=wait_forever)
    waiter.start()
    time.sleep(0.05)
    start = time.monotonic()
    link.close()
    waiter.join(timeout=2)
    assert time.monotonic() - start < 0.5
    assert not waiter.is_alive() and waiter_error  # a blocked recv() wakes with LinkError
