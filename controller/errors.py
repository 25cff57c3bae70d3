"""Exception family for configuration and learning."""

from __future__ import annotations


class MetactlError(Exception):
    """Base of every error metactl raises on purpose."""


class ConfigError(MetactlError, ValueError):
    """A config file, key or value is malformed, unknown or out of range."""


class CheckpointError(MetactlError):
    """A checkpoint or adaptation state is missing, truncated or does not match."""
