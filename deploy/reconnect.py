"""Getting the robot back after its port vanished: close, reopen the same URL with backoff, handshake again.

The link's reader thread only reports a failure (LinkError on the next call); whether to reconnect,
and for how long to keep trying, is the caller's decision (deploy/robot.py), made between control
ticks, never in the reader thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from controller.errors import ConfigError
from deploy.errors import LinkError, ProtocolError
from deploy.link import Link, handshake
from deploy.messages import Capabilities

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Waits between reconnection attempts: `initial`, multiplied by `factor` after each, capped at `maximum`.

    The defaults give 0.05, 0.1, 0.2, 0.4, 0.5, 0.5, ... s: a port that comes back within a few
    hundred milliseconds (a USB re-enumeration, a restarted bridge) is found quickly, and a missing
    one is polled twice a second.
    """

    initial: float = 0.05
    """Seconds between the first (immediate) attempt and the second."""
    factor: float = 2.0
    """Growth of the wait after each failed attempt."""
    maximum: float = 0.5
    """Longest wait between attempts."""

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ConfigError(f"backoff initial={self.initial} must be > 0 and <= maximum={self.maximum}")
        if self.factor < 1:
            raise ConfigError(f"backoff factor={self.factor} must be >= 1")

    def delays(self) -> Iterator[float]:
        """The waits, forever: initial * factor**k, capped at maximum."""
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * self.factor, self.maximum)


def same_robot(a: Capabilities, b: Capabilities) -> bool:
    """Same robot spec, joint order and control rate (the flags may differ: e.g. a gantry on or off)."""
    return (a.robot, tuple(a.joint_names), a.control_rate_hz) == (b.robot, tuple(b.joint_names), b.control_rate_hz)


def reconnect(
    link: Link,
    host_name: str,
    *,
    timeout: float,
    backoff: Backoff | None = None,
    expected: Capabilities | None = None,
    handshake_timeout: float = 0.5,
) -> tuple[Capabilities, int]:
    """Close `link`, then reopen its URL and handshake until the robot answers or `timeout` seconds pass.

    Args:
        link: The broken link; reopened in place, so its counters carry on.
        host_name: Sent in Hello.
        timeout: Give up after this many seconds.
        backoff: Waits between attempts (default `Backoff()`).
        expected: The robot's Capabilities before the loss: another robot on the same port is refused.
        handshake_timeout: Longest wait for Capabilities on one opened port.

    Returns:
        (the robot's Capabilities, number of attempts).

    Raises:
        LinkError: No robot within `timeout` (names the url and the last error), or another robot answered.
        ProtocolError: The robot that answered speaks another protocol version.
    """
    if timeout <= 0:
        raise ConfigError(f"reconnect timeout={timeout} must be positive")
    link.close()
    deadline = time.monotonic() + timeout
    last_error: LinkError | None = None
    for attempts, delay in enumerate((backoff or Backoff()).delays(), start=1):
        try:
            link.open()
            link.reset_input()
            remaining = deadline - time.monotonic()
            capabilities = handshake(
                link, host_name, timeout=max(0.05, min(handshake_timeout, remaining)), retry_interval=0.1
            )
        except ProtocolError:
            link.close()
            raise
        except LinkError as error:
            link.close()
            last_error = error
        else:
            if expected is not None and not same_robot(capabilities, expected):
                link.close()
                raise LinkError(
                    f"after reconnecting, {link.url!r} answers as robot '{capabilities.robot}' "
                    f"({len(capabilities.joint_names)} joints, {capabilities.control_rate_hz} Hz), not the "
                    f"'{expected.robot}' it was ({len(expected.joint_names)} joints, {expected.control_rate_hz} Hz)"
                )
            return capabilities, attempts
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LinkError(
                f"lost the robot on {link.url!r} and could not reconnect within {timeout} s "
                f"({attempts} attempts); last error: {last_error}"
            )
        logger.debug("reconnect attempt %d to %s failed (%s); next in %.2f s", attempts, link.url, last_error, delay)
        time.sleep(min(delay, remaining))
    raise AssertionError("unreachable")  # pragma: no cover - delays() never ends
