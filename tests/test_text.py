"""worker.text.printable: what a person sees of data on a terminal cannot be steered by the data."""

import pytest

from worker.text import printable


@pytest.mark.parametrize("raw, shown", [
    ("plain/key.jpg", "plain/key.jpg"),
    ("café/日本.jpg", "café/日本.jpg"),                                  # non-ASCII stays readable
    ("\x1b[2J\x1b[Hfake", "\\x1b[2J\\x1b[Hfake"),                       # clear screen, cursor home
    ("\x1b]0;title\x07x", "\\x1b]0;title\\x07x"),                       # OSC window title
    ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),                              # one line, always
    ("\x9b31m", "\\x9b31m"),                                            # C1 CSI
    ("\x7f", "\\x7f"),
    ("gpj.\u202eexe", "gpj.\\u202eexe"),                                # right-to-left override
    ("\u2066x\u2069\u200f", "\\u2066x\\u2069\\u200f"),
    ("a\u2028b", "a\\u2028b"),
])
def test_printable_escapes_controls_visibly(raw, shown):
    assert printable(raw) == shown


def test_printable_output_holds_no_control_character():
    every = "".join(chr(c) for c in range(0x20)) + "\x7f" + "".join(chr(c) for c in range(0x80, 0xa0))
    shown = printable(every + "\u202e\u2066")
    assert shown.isprintable() and "\x1b" not in shown
    assert printable(12) == "12"
