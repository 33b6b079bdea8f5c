"""Text from data (keys, job names, errors) made safe to show a person on a terminal or in a log.

Data may hold ESC/CSI/OSC sequences, other C0/C1 controls, or bidirectional overrides that would
clear a screen, fake output, set a window title or reorder what is shown. `printable` escapes
them visibly; machine-readable output (JSON) keeps the exact text instead.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# Unicode's bidirectional formatting characters (embeddings, overrides, isolates, marks): they
# reorder the text after them on a terminal, so a key could show as another.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Line and paragraph separators: a new line on some terminals and in most log viewers.
_LINE_BREAKS = frozenset("\u2028\u2029\x85")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """`text` as one line with every control character (C0, DEL, C1), bidirectional control and
    line separator written as a visible escape (\\x1b, \\u202e); other characters unchanged."""
    text = str(text)
    if text.isprintable():          # the common case, and fast: no control, format or separator
        return text
    return "".join(_escape(c) if (unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS or c in _LINE_BREAKS)
                   else c for c in text)
