import unicodedata

_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on


def one_line(text: str) -> str:
    """``text`` with every line break and control character escaped (``\\n``, ``\\x00``, ...), so that
    a message that quotes names from a damaged file is still exactly one line."""
    text = str(text)
    if not any(c in _BREAKS or unicodedata.category(c) == "Cc" for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if c in _BREAKS or unicodedata.category(c) == "Cc" else c for c in text)


class ExmyError(Exception):
    """A problem with the user's input or files: shown as one line, exit status 1."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP while an output folder is being written: handled like Ctrl-C (the temporary
    folder is removed), and the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
