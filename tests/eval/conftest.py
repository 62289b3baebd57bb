"""The serve tests' tiny finished run (trained once per session by the real engine)."""

from tests.serve.conftest import tiny_run

__all__ = ["tiny_run"]
