"""Text that reaches a terminal, a log or the manifest from outside: file names and failure reasons."""

from __future__ import annotations

import re

# C0 and C1 control characters: a file's name may hold them (a newline, a terminal's escape sequence)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters written out (a newline as \\n, an escape as \\x1b), so a name cannot
    break a line of a table or a log, nor speak to the terminal it is printed on."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def one_line(reason: str) -> str:
    """A failure's reason as the manifest keeps it: one line (runs of white space, FFmpeg's line breaks among
    them, made one space), and printable."""
    return printable(" ".join(reason.split()))
