"""Error types shared across the package (no imports, so any module may use them)."""


class ConfigError(ValueError):
    """An invalid run config; the message names the key."""
