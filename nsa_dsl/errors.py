"""The one error type of nsa-dsl.

Every problem with a spec (syntax, names, values) and every problem with the
tensors handed to a generated op is raised as :class:`SpecError`.  An error
that points into a spec renders like a compiler diagnostic::

    examples/bad.nsa:7:33: error[E204]: stride 12 does not divide block 32
        branch cmp = compress(block = 32, stride = 12)
                                          ^^^^^^^^^^^
    hint: try 8 or 16
"""
from __future__ import annotations

from .ir import Span


class SpecError(ValueError):
    """A bad spec or a bad call, with a stable code, a location and a hint.

    ``code`` is stable across releases (tests and tools match on it);
    ``span`` is None for errors that have no place in a file (tensor checks).
    """

    def __init__(self, code: str, message: str, span: Span | None = None,
                 hint: str | None = None, source: str | None = None):
        self.code = code
        self.message = message
        self.span = span
        self.hint = hint
        self.source = source
        super().__init__(self.render())

    # pickling keeps the rendered message and the fields
    def __reduce__(self):
        return (SpecError, (self.code, self.message, self.span, self.hint, self.source))

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def source_line(self) -> str | None:
        if self.span is None or self.source is None:
            return None
        # split on "\n" only, as the lexer counts lines (splitlines() also
        # breaks at \f, \x1c, \u2028, ... and would shift the caret's line)
        lines = self.source.split("\n")
        if 1 <= self.span.line <= len(lines):
            return lines[self.span.line - 1].rstrip("\r")
        return None

    def render(self) -> str:
        if self.span is None:
            out = f"error[{self.code}]: {self.message}"
        else:
            out = (f"{self.span.file}:{self.span.line}:{self.span.column}: "
                   f"error[{self.code}]: {self.message}")
        text = self.source_line()
        if text is not None:
            text = text.expandtabs(1)
            start = max(self.span.column - 1, 0)
            if self.span.end_line == self.span.line and self.span.end_column > self.span.column:
                width = self.span.end_column - self.span.column
            else:
                width = 1
            width = max(1, min(width, max(len(text) - start, 1)))
            out += f"\n    {text}\n    {' ' * start}{'^' * width}"
        if self.hint:
            out += f"\n    hint: {self.hint}"
        return out

    def __str__(self) -> str:  # always the full diagnostic
        return self.render()
