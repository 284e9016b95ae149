"""The front end: grammar, lets, lowering to frozen IR with spans, file reading."""
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nsa_dsl
from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Compress, Select, Spec, SpecFile, Window
from nsa_dsl.language.parser import MAX_BYTES, parse_source, pick_spec, read_spec_text

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.nsa"))


def one(text: str) -> Spec:
    (spec,) = parse_source(text).specs
    return spec


def text_at(text: str, span) -> str:
    """The source text a single-line span covers."""
    assert span.line == span.end_line
    return text.split("\n")[span.line - 1][span.column - 1:span.end_column - 1]


def window_size(expr: str, prelude: str = "") -> int:
    return one(f"{prelude}\nattention a {{ branch w = window(size = {expr}) output = w }}").branch("w").size


# ---------------------------------------------------------------- examples

def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"nsa_paper.nsa", "nsa_paper_mean.nsa", "moba.nsa", "sinks.nsa",
            "cmp_select.nsa", "multi.nsa"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_round_trips(path):
    text = path.read_text()
    assert text.startswith("# examples/"), "each example starts with a header comment"
    first = nsa_dsl.load_file(path)
    assert isinstance(first, SpecFile) and first.specs
    again = parse_source(text, str(path))
    assert first == again
    assert [s.canonical() for s in first.specs] == [s.canonical() for s in again.specs]
    # the IR does not depend on layout or comments
    squashed = " ".join(line.split("#")[0] for line in text.splitlines())
    assert parse_source(squashed).specs == first.specs


def test_nsa_paper_is_the_design_block():
    spec = nsa_dsl.load(Path(__file__).parents[1] / "examples" / "nsa_paper.nsa")
    assert (spec.name, spec.heads, spec.kv_heads, spec.qk_dim, spec.v_dim, spec.causal) == \
        ("nsa_paper", 64, 4, 192, 128, True)
    assert spec.branches == (
        Compress("cmp", 32, 16, "mlp", span=None),
        Select("slc", 64, 16, "cmp", 1, 2, span=None),
        Window("swa", 512, 0, span=None),
    )
    assert (spec.output.kind, spec.output.activation, spec.output.branches) == \
        ("gate", "sigmoid", ("cmp", "slc", "swa"))


def test_nsa_paper_mean_differs_only_in_pooling():
    root = Path(__file__).parents[1] / "examples"
    paper, mean = nsa_dsl.load(root / "nsa_paper.nsa"), nsa_dsl.load(root / "nsa_paper_mean.nsa")
    assert mean.branch("cmp").pool == "mean"
    assert (mean.heads, mean.kv_heads, mean.qk_dim, mean.v_dim) == (None,) * 4
    assert dataclasses.replace(mean, name=paper.name, heads=paper.heads, kv_heads=paper.kv_heads,
                               qk_dim=paper.qk_dim, v_dim=paper.v_dim, branches=(dataclasses.replace(mean.branch("cmp"), pool="mlp"),
                                         *mean.branches[1:])) == paper


def test_multi_has_two_blocks_and_lets():
    specs = nsa_dsl.load_file(Path(__file__).parents[1] / "examples" / "multi.nsa")
    assert [s.name for s in specs.specs] == ["short_ctx", "long_ctx"]
    long_ctx = specs.get("long_ctx")
    assert long_ctx.branch("slc").top_k == 2048 // 64
    assert long_ctx.branch("cmp").block == 32
    with pytest.raises(SpecError) as e:
        nsa_dsl.load(Path(__file__).parents[1] / "examples" / "multi.nsa")
    assert e.value.code == "E110" and "short_ctx, long_ctx" in e.value.message


# ---------------------------------------------------------------- defaults

def test_defaults():
    spec = one("""attention a {
        branch c = compress(block = 32, stride = 16)
        branch s = select(block = 64, top_k = 16, score = c)
        branch w = window(size = 8)
        output = sum(c, s, w)
    }""")
    assert (spec.heads, spec.kv_heads, spec.qk_dim, spec.v_dim, spec.causal) == (None,) * 4 + (True,)
    assert spec.branch("c").pool == "mean"
    assert (spec.branch("s").keep_first, spec.branch("s").keep_last) == (1, 2)
    assert spec.branch("w").sinks == 0
    assert spec.branch("c").params[0].name == "block"  # only what was written
    assert [p.name for p in spec.branch("s").params] == ["block", "top_k", "score"]


def test_head_dim_sets_both_dims():
    spec = one("attention a { head_dim = 64 branch w = window(size = 8) output = w }")
    assert (spec.qk_dim, spec.v_dim) == (64, 64)
    assert [name for name, _ in spec.field_spans] == ["head_dim"]


def test_trailing_commas_and_params_in_any_order():
    spec = one("attention a { branch w = window(sinks = 2, size = 8,) output = sum(w,) }")
    assert (spec.branch("w").size, spec.branch("w").sinks) == (8, 2)


# ------------------------------------------------------------- expressions

@pytest.mark.parametrize("expr, value", [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("20 - 3 - 2", 15), ("64 / 4 / 2", 8),
    ("7 // 2", 3), ("-7 // 2 + 10", 6), ("7 % 3", 1), ("-7 % 3", 2), ("--3", 3), ("+3", 3),
    ("-(-(5))", 5), ("1_024", 1024), ("0064", 64), ("2 * 3 % 4", 2), ("100 - 4 * 8 // 3", 90),
    ("+".join(["1"] * 3000), 3000),  # long flat chains are fine (evaluation is not recursive)
])
def test_expressions(expr, value):
    assert window_size(expr) == value


def test_lets_scopes():
    prelude = "let A = 4\nlet B = A * A"
    assert window_size("B + A", prelude) == 20
    specs = parse_source("""
        let S = 8
        attention a { let T = S * 2  branch w = window(size = T) output = w }
        let U = 3
        attention b { branch w = window(size = S + U) output = w }
    """).specs
    assert [s.branch("w").size for s in specs] == [16, 11]
    with pytest.raises(SpecError) as e:  # T is local to a
        parse_source("""
            attention a { let T = 2  branch w = window(size = T) output = w }
            attention b { branch w = window(size = T) output = w }""")
    assert e.value.code == "E300" and "local to attention block a" in e.value.hint


def test_name_params_are_literal_even_if_a_let_matches():
    spec = one("let mean = 3\nattention a { branch c = compress(block = 4, stride = 2, pool = mean) "
               "branch w = window(size = mean) output = sum(c, w) }")
    assert (spec.branch("c").pool, spec.branch("w").size) == ("mean", 3)


# ------------------------------------------------------------------- spans

def test_spans_point_at_the_text():
    text = (Path(__file__).parents[1] / "examples" / "nsa_paper.nsa").read_text()
    spec = parse_source(text, "paper.nsa").specs[0]
    assert spec.span.file == "paper.nsa" and spec.span.line == 2 and spec.span.column == 1
    cmp = spec.branch("cmp")
    assert text_at(text, cmp.span) == "branch cmp = compress(block = 32, stride = 16, pool = mlp)"
    assert [(p.name, text_at(text, p.span), text_at(text, p.value_span)) for p in cmp.params] == [
        ("block", "block = 32", "32"), ("stride", "stride = 16", "16"), ("pool", "pool = mlp", "mlp")]
    assert text_at(text, spec.output.span) == "output = gate(sigmoid, cmp, slc, swa)"
    assert [text_at(text, s) for s in spec.output.branch_spans] == ["cmp", "slc", "swa"]
    assert [(n, text_at(text, s)) for n, s in spec.field_spans] == [
        ("heads", "64"), ("kv_heads", "4"), ("qk_dim", "192"), ("v_dim", "128"), ("causal", "true")]


def test_expression_span_covers_parentheses():
    text = "let Q = 4\nattention a { branch w = window(size = (Q * 2) + 1) output = w }"
    (p,) = one(text).branch("w").params
    assert text_at(text, p.value_span) == "(Q * 2) + 1"


def test_crlf_and_tabs():
    text = "attention a {\r\n\tbranch w = window(size = 12)\r\n\toutput = w\r\n}\r\n"
    assert one(text).branch("w").size == 12
    with pytest.raises(SpecError) as e:
        parse_source(text.replace("12", "0"))
    assert (e.value.line, e.value.column) == (2, 27)
    assert "\r" not in e.value.render()


# ------------------------------------------------------------------ the IR

def test_ir_is_frozen():
    spec = one("attention a { branch w = window(size = 8) output = w }")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.branches[0].size = 4
    assert isinstance(spec.branches, tuple) and isinstance(spec.branches[0].params, tuple)
    bigger = dataclasses.replace(spec, branches=(dataclasses.replace(spec.branches[0], size=16),))
    assert (spec.branch("w").size, bigger.branch("w").size) == (8, 16)


def test_spans_do_not_change_equality():
    a = one("attention a { branch w = window(size = 8) output = w }")
    b = one("\n\n  attention a {\n branch w = window( size = 2 * 4 )\n output = w }")
    assert a == b and a.canonical() == b.canonical()


# -------------------------------------------------------- public and picks

def test_public_parse_and_load(tmp_path):
    text = "attention a { branch w = window(size = 8) output = w }"
    assert nsa_dsl.parse(text).name == "a"
    p = tmp_path / "a.nsa"
    p.write_text(text)
    assert nsa_dsl.load(p) == nsa_dsl.parse(text)
    assert nsa_dsl.load(str(p), name="a").name == "a"


def test_pick_spec():
    two = parse_source("attention a { branch w = window(size = 8) output = w }\n"
                       "attention bee { branch w = window(size = 8) output = w }", "two.nsa")
    assert pick_spec(two, "bee").name == "bee"
    with pytest.raises(SpecError) as e:
        pick_spec(two, None)
    assert e.value.code == "E110" and "a, bee" in e.value.message and "--name" in e.value.hint
    with pytest.raises(SpecError) as e:
        pick_spec(two, "be")
    assert e.value.code == "E111" and "did you mean 'bee'" in e.value.hint
    single = parse_source("attention a { branch w = window(size = 8) output = w }")
    assert pick_spec(single, None).name == "a"
    with pytest.raises(SpecError) as e:
        pick_spec(single, "b")
    assert e.value.code == "E111"


# ------------------------------------------------------------ reading files

def test_read_spec_text_errors(tmp_path):
    with pytest.raises(SpecError) as e:
        read_spec_text(tmp_path / "missing.nsa")
    assert e.value.code == "E105" and "no such file" in e.value.message
    with pytest.raises(SpecError) as e:
        read_spec_text(tmp_path)
    assert e.value.code == "E105" and "directory" in e.value.message
    bad = tmp_path / "latin1.nsa"
    bad.write_bytes(b"attention a {\n  # caf\xe9\n}\n")
    with pytest.raises(SpecError) as e:
        read_spec_text(bad)
    assert e.value.code == "E106" and "line 2, column 8" in e.value.message
    big = tmp_path / "big.nsa"
    big.write_bytes(b"#" * (MAX_BYTES + 1))
    with pytest.raises(SpecError) as e:
        read_spec_text(big)
    assert e.value.code == "E104"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_read_spec_text_unreadable(tmp_path):
    import os
    p = tmp_path / "secret.nsa"
    p.write_text("x")
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as a user that reads everything")
        with pytest.raises(SpecError) as e:
            read_spec_text(p)
        assert e.value.code == "E105" and "permission" in e.value.message
    finally:
        p.chmod(0o600)


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.nsa"
    p.write_bytes("\ufeffattention a { branch w = window(size = 8) output = w }".encode("utf-8"))
    assert nsa_dsl.load(p).name == "a"


# ------------------------------------------------------- limits and speed

def test_one_megabyte_of_comments_parses_fast(tmp_path):
    spec = "attention a { branch w = window(size = 8) output = w }\n"
    filler = "# a comment line that is just long enough to be realistic .......\n"
    text = spec + filler * ((MAX_BYTES - len(spec)) // len(filler))
    assert MAX_BYTES - len(filler) < len(text.encode()) <= MAX_BYTES
    p = tmp_path / "big.nsa"
    p.write_text(text)
    t = time.perf_counter()
    assert nsa_dsl.load(p).name == "a"
    assert time.perf_counter() - t < 1.0


def test_one_megabyte_of_statements_is_refused_fast(tmp_path):
    line = "    branch w{:06d} = window(size = 2 * 4)\n"
    body = "".join(line.format(i) for i in range((MAX_BYTES - 100) // len(line.format(0))))
    p = tmp_path / "dense.nsa"
    p.write_text("attention a {\n" + body + "    output = w000000\n}\n")
    assert MAX_BYTES - 200 < p.stat().st_size <= MAX_BYTES
    t = time.perf_counter()
    with pytest.raises(SpecError) as e:
        nsa_dsl.load(p)
    assert time.perf_counter() - t < 1.0
    assert e.value.code == "E104" and "tokens" in e.value.message


def test_largest_accepted_spec_parses_in_under_a_second():
    from nsa_dsl.language.parser import MAX_TOKENS
    n = (MAX_TOKENS - 20) // 13  # 11 tokens a branch, 2 more in the output
    text = ("attention a { " + "".join(f"branch w{i} = window(size = 2 * 4) " for i in range(n))
            + "output = sum(" + ", ".join(f"w{i}" for i in range(n)) + ") }")
    parse_source("attention a { branch w = window(size = 8) output = w }")  # load the grammar
    t = time.perf_counter()
    (spec,) = parse_source(text).specs
    assert time.perf_counter() - t < 1.0
    assert len(spec.branches) == n


@pytest.mark.parametrize("text", [
    "let x = " + "(" * 10_000 + "1" + ")" * 10_000,
    "let x = " + "(" * 4_000 + "1" + ")" * 4_000,
    "let x = " + "-" * 9_000 + "1",
    "let x = " + "(" * 10_000,
    "attention a { branch w = window(size = " + "(" * 3000 + "8" + ")" * 3000 + ") output = w }",
])
def test_deep_nesting_is_a_spec_error(text):
    with pytest.raises(SpecError) as e:
        parse_source(text)
    assert e.value.code in ("E102", "E103", "E104")


def test_front_end_imports_neither_torch_nor_triton(tmp_path):
    p = tmp_path / "a.nsa"
    p.write_text("attention a { branch w = window(size = 8) output = w }")
    code = ("import sys, nsa_dsl, nsa_dsl.tools.cli\n"
            f"assert nsa_dsl.tools.cli.main(['check', {str(p)!r}]) == 0\n"
            "nsa_dsl.parse(open(%r).read())\n"
            "bad = [m for m in ('torch', 'triton') if m in sys.modules]\n"
            "assert not bad, bad\n") % str(p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
