"""Mutated and random specs: the front end answers with a spec or a SpecError,
never with another exception (a lark error, a RecursionError, a crash)."""
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsa_dsl.tools import cli
from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import SpecFile
from nsa_dsl.language.parser import parse_source

ROOT = Path(__file__).parents[1]
SEEDS = [p.read_text() for p in sorted((ROOT / "examples").glob("*.nsa"))] + [
    "let S = 16\nattention a {\n  heads = 8 kv_heads = 2 head_dim = 64\n"
    "  branch c = compress(block = 2 * S, stride = S)\n"
    "  branch s = select(block = 4 * S, top_k = 8, score = c)\n"
    "  branch w = window(size = 128, sinks = 4)\n  output = gate(sigmoid, c, s, w)\n}\n",
]
TOKEN = re.compile(r"\w+|//|\S")
PIECES = ["(", ")", "{", "}", "=", ",", "+", "-", "*", "/", "//", "%", "#", "\n", " ", "\t",
          "attention", "branch", "let", "output", "gate", "sum", "sigmoid", "compress", "select",
          "window", "mean_pool", "true", "false", "block", "stride", "top_k", "size", "cmp",
          "0", "1", "16", "-1", "99999999999999999999999", "1_0", "é", "\0", "\u2028", "\r",
          "\ufeff", "😀", "'", '"', ":", ";", ".", "[", "]", "\\"]

settings.register_profile("fuzz", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fuzz")


def check_outcome(text: str) -> None:
    try:
        result = parse_source(text, "fuzz.nsa")
    except SpecError as e:
        assert re.fullmatch(r"E\d{3}", e.code)
        rendered = e.render()
        assert "Traceback" not in rendered
        assert not any(x in rendered.lower() for x in ("lark.", "unexpectedtoken", "unexpectedcharacters",
                                                       "unexpectedeof"))
        if "lark" not in text.lower():        # the message may quote the spec's own text ('LARK')
            assert "lark" not in rendered.lower()
        if e.span is not None:
            assert e.span.file == "fuzz.nsa"
            assert 1 <= e.span.line <= text.count("\n") + 1
            assert e.span.column >= 1
    else:
        assert isinstance(result, SpecFile) and result.specs


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "swap", "huge", "deep", "line"]))
        n = len(text)
        i = draw(st.integers(0, max(n - 1, 0)))
        if kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
        elif kind == "insert":
            piece = draw(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)))
            text = text[:i] + piece + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from(PIECES)) + text[i + 1:]
        elif kind == "swap":
            spans = [m.span() for m in TOKEN.finditer(text)]
            if len(spans) >= 2:
                a, b = sorted(draw(st.lists(st.sampled_from(spans), min_size=2, max_size=2, unique=True)))
                text = (text[:a[0]] + text[b[0]:b[1]] + text[a[1]:b[0]] + text[a[0]:a[1]] + text[b[1]:])
        elif kind == "huge":
            numbers = [m.span() for m in re.finditer(r"\d+", text)]
            if numbers:
                a, b = draw(st.sampled_from(numbers))
                big = draw(st.sampled_from(["9" * 25, "9" * 5000, str(2 ** 62), str(2 ** 20 + 1),
                                            "1" + "0" * 19, "4294967296 * 4294967296"]))
                text = text[:a] + big + text[b:]
        elif kind == "deep":
            numbers = [m.span() for m in re.finditer(r"\d+", text)]
            if numbers:
                a, b = draw(st.sampled_from(numbers))
                d = draw(st.sampled_from([1, 63, 64, 65, 500, 6000]))
                op = draw(st.sampled_from(["(", "-", "+"]))
                inner = op * d + text[a:b] + (")" * d if op == "(" else "")
                text = text[:a] + inner + text[b:]
        else:
            lines = text.split("\n")
            j = draw(st.integers(0, len(lines) - 1))
            if draw(st.booleans()):
                lines.insert(j, lines[j])
            else:
                del lines[j]
            text = "\n".join(lines)
    return text


@settings(max_examples=400)
@given(mutated())
def test_mutated_specs(text):
    check_outcome(text)


@settings(max_examples=200)
@given(st.lists(st.sampled_from(PIECES), max_size=60).map("".join))
def test_token_soup(text):
    check_outcome(text)


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_random_text(text):
    check_outcome(text)


@settings(max_examples=40)
@given(mutated())
def test_cli_never_shows_a_traceback(text):
    import contextlib
    import io
    fd, name = tempfile.mkstemp(suffix=".nsa")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["check", name])
        assert rc in (0, 1)
        assert (rc == 0) == (err.getvalue() == "")
        assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue()
    finally:
        os.unlink(name)
