"""The one subprocess helper, the one user error (LabError) and die(), for every lab module."""

from __future__ import annotations

import shlex
import subprocess
from typing import NoReturn


class LabError(Exception):
    """A failure the user can act on: `message` says what, `hint` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def run(
    argv: list[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = 120,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv (a list, never a shell string) and return the CompletedProcess (text).

    With check=True a non-zero exit raises LabError naming the quoted command, its exit
    code and the tail of its stderr, so a failure deep in a boot says exactly what broke.
    """
    try:
        proc = subprocess.run(
            argv,
            input=input,
            text=True,
            capture_output=capture,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {argv[0]}", "run `python -m deploy.lab up` "
                       "to see which Debian package is missing") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{shlex.join(argv)}` timed out after {timeout} s") from exc
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        raise LabError(f"`{shlex.join(argv)}` failed with exit code {proc.returncode}"
                       + (f":\n{tail}" if tail else ""))
    return proc


def die(message: str, hint: str | None = None) -> NoReturn:
    """Stop the command with a user error; cli.main() prints it as one line, exit status 1."""
    raise LabError(message, hint)
