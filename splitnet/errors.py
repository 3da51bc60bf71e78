"""The errors a user can cause: each message names the bad value and what would work."""


class ConfigError(ValueError):
    """A config value that cannot work (a key, its value and the rule it breaks)."""
