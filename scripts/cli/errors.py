"""How every command answers a mistake: one line on stderr that names it, exit 2 for what was
typed (a UsageError: a name, option, folder or value that breaks a rule) and 1 for what the
server, the store or our own rules refuse; never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import requests

from model_defs.usage import UsageError


def one_line_errors(work: Callable[[], int], refusals: tuple[type[Exception], ...]) -> int:
    """work()'s exit code, or 2 / 1 with the error's one line when it raises."""
    try:
        return work()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except refusals as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except requests.RequestException as e:
        print(f"error: TorchServe did not answer: {e}", file=sys.stderr)
        return 1
