"""What a terminal shows after some output: carriage returns overwrite, newlines move on, and
ESC[K / ESC[A are honoured. Enough to check what a person actually sees of a redrawn bar."""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def screen_of(output: str) -> list[str]:
    """The lines on screen, each as finally drawn (trailing spaces removed)."""
    rows: list[list[str]] = [[]]
    row = col = 0
    index = 0
    while index < len(output):
        escape = _ESCAPE.match(output, index)
        if escape:
            count, command = int(escape.group(1) or 1), escape.group(2)
            if command == "K":
                del rows[row][col:]
            elif command == "A":
                row = max(0, row - count)
            index = escape.end()
            continue
        char = output[index]
        index += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            col = 0
            if row == len(rows):
                rows.append([])
        else:
            line = rows[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = char
            else:
                line.append(char)
            col += 1
    return ["".join(line).rstrip() for line in rows]
