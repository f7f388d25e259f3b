"""Version of the creditgate distribution (read by hatchling and `creditgate --version`)."""

__version__ = "0.1.0"
