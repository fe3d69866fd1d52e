"""What every command of the bundle shares about a mistake typed by its user.

The trainers (training/), the archiver, the server and the ops commands (scripts/) all answer
a usage mistake the same way: one line on stderr naming what was typed and what is allowed,
exit 2, nothing changed. It lives in the lowest layer so that every layer above can raise it,
and it imports nothing heavy (`scripts/serve key` and `status` answer without loading torch).
"""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """What was typed breaks a rule (a name, an option, a path, a value): the commands exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake answered in one line (exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
