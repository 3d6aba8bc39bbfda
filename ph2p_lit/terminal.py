"""What a user-supplied string (a file name, a caption, a prompt, an error naming them) becomes on
a terminal: the same text on one line, with every control character written as an escape."""

import re

# C0 (line breaks, tab, ESC, BEL, NUL ...), DEL and C1 (U+0080-U+009F, where CSI U+009B starts a
# sequence as ESC [ does), the Unicode line and paragraph separators, and the bidirectional
# overrides and isolates, which reorder the rest of a line as it is displayed.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def one_line(text) -> str:
    """`text` as it is safe to print: each control character as its Python escape (\\n, \\x1b,
    \\u202e), so a file name or caption keeps to its row and cannot move the cursor, clear the
    screen or set the window title (an escape sequence loses its ESC and is printed as text)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))
