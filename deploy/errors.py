"""Exception family for deployment: the serial link, its protocol and bundles."""

from __future__ import annotations

from controller.errors import MetactlError


class DeployError(MetactlError):
    """Base of every error raised by the deploy package."""


class LinkError(DeployError):
    """The serial link to the robot failed: port missing or closed, I/O error, timeout, no answer."""


class ProtocolError(LinkError):
    """A frame or message does not follow serial protocol v1.

    Attributes:
        kind: What was wrong, so a decoder can count it: one of "oversize", "cobs", "short", "crc",
            "version", "length", "type", "payload"; None when no frame is involved.
    """

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class BundleError(DeployError):
    """A deploy bundle is missing, malformed, or does not match the robot it talks to."""
