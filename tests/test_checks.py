"""Every check: `nsa-dsl check` exits 1 and prints the code, line, column and a
caret under the offending text; the hint suggests a fix.

A case marks the text the caret must underline with [[...]] (never valid spec
syntax); an empty [[]] marks a point, such as the end of the file.
"""
import subprocess
import sys

import pytest

from nsa_dsl.tools import cli
from nsa_dsl.errors import SpecError
from nsa_dsl.language.parser import parse_source

BASE = """\
attention a {
    heads = 8
    kv_heads = 2
    head_dim = 64
    branch cmp = compress(block = 32, stride = 16)
    branch slc = select(block = 64, top_k = 8, score = cmp)
    branch swa = window(size = 128)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


def marked(src: str):
    """Strip the [[...]] marker: (text, line, column, width) of the marked text."""
    start, end = src.index("[["), src.index("]]")
    text = src[:start] + src[start + 2:end] + src[end + 2:]
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return text, line, column, end - start - 2


def edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


DEEP = "(" * 64 + "[[" + "(" * 36 + "1" + ")" * 36 + "]]" + ")" * 64

# (id, code, marked source, fragments expected in the rendered error)
CASES = [
    # E1xx: syntax and structure
    ("missing-eq-after-branch", "E100", edit("branch cmp = compress", "branch cmp [[compress]]"),
     ["expected '=' after branch name 'cmp'", "hint: write branch cmp = compress(...)"]),
    ("power-operator", "E100", edit("size = 128", "size = 2 *[[*]] 7"), ["no power operator"]),
    ("positional-params", "E100", edit("compress(block = 32, ", "compress([[32]], "),
     ["parameters are named"]),
    ("missing-comma", "E100", edit("block = 32, stride", "block = 32 [[stride]]"), ["expected"]),
    ("missing-close-paren", "E100", edit("size = 128)\n", "size = 128\n").replace("    output", "    [[output]]"),
     ["found keyword 'output'"]),
    ("unclosed-block-then-attention", "E100",
     BASE.replace("}\n", "") + "attention [[b]] {\n}\n", ["close the previous attention block"]),
    ("stray-brace", "E100", BASE + "[[}]]\n", ["found '}'"]),
    ("colon", "E101", edit("heads = 8", "heads[[:]] 8"), ["unexpected character ':'", "with '='"]),
    ("decimal", "E101", edit("size = 128", "size = 1[[.]]5"), ["whole numbers"]),
    ("quotes", "E101", edit("stride = 16)", "stride = 16, pool = [[\"]]mean\")"), ["without quotes"]),
    ("nul-byte", "E101", edit("heads = 8", "heads = 8[[\0]]"), ["NUL"]),
    ("non-ascii-name", "E101", edit("branch swa", "branch [[ü]]swa"), ["ASCII"]),
    ("eof-in-block", "E102", BASE.rstrip().rstrip("}").rstrip() + "[[]]\n", ["ends early", "'}'"]),
    ("eof-in-call", "E102", "attention a {\n    branch w = window(size = 128[[]]\n", ["ends early", "')'"]),
    ("nesting", "E103", edit("size = 128", "size = " + DEEP), ["nested more than 64"]),
    ("no-block", "E107", "[[l]]et X = 3\n", ["declares no attention block"]),
    ("no-branch", "E108", "attention [[a]] {\n    heads = 8\n}\n", ["declares no branch"]),

    # E2xx: values
    ("huge-literal", "E200", edit("size = 128", "size = [[123456789012345678901234567890]]"),
     ["too large"]),
    ("overflow", "E200", edit("size = 128", "size = [[4294967296 * 4294967296]]"), ["too large"]),
    ("div-zero", "E201", edit("size = 128", "size = [[128 // (2 - 2)]]"), ["division by zero"]),
    ("inexact-div", "E202", edit("size = 128", "size = [[128 / 3]]"), ["not a whole number", "//"]),
    ("zero-block", "E203", edit("block = 32", "block = [[0]]"), ["block must be positive"]),
    ("negative-size", "E203", edit("size = 128", "size = [[-128]]"), ["size must be positive"]),
    ("zero-top-k", "E203", edit("top_k = 8", "top_k = [[0]]"), ["top_k must be positive"]),
    ("zero-stride", "E203", edit("stride = 16", "stride = [[0]]"), ["stride must be positive"]),
    ("zero-heads", "E203", edit("heads = 8", "heads = [[0]]"), ["heads must be positive"]),
    ("stride-divides-block", "E204", edit("stride = 16", "stride = [[12]]"),
     ["stride 12 does not divide block 32", "hint: try 8 or 16"]),
    ("stride-divides-select-block", "E205", edit("block = 64", "block = [[40]]"),
     ["select block 40 is not a multiple of the stride 16", "try block = 32 or 48"]),
    ("negative-keep", "E206", edit("score = cmp)", "score = cmp, keep_first = [[-1]])"),
     ["keep_first must be zero or more"]),
    ("negative-sinks", "E206", edit("size = 128)", "size = 128, sinks = [[-4]])"), ["sinks"]),
    ("too-large", "E207", edit("size = 128", "size = [[1048577]]"), ["too large", "1048576"]),
    ("top-k-below-forced", "E208", edit("top_k = 8", "top_k = [[2]]"),
     ["top_k = 2 is less than keep_first + keep_last = 1 + 2", "raise top_k to 3"]),
    ("heads-kv-heads", "E209", edit("kv_heads = 2", "kv_heads = [[3]]"),
     ["heads = 8 is not a multiple of kv_heads = 3", "try kv_heads = 2 or 4"]),
    ("dim-multiple", "E210", edit("head_dim = 64", "head_dim = [[72]]"),
     ["head_dim = 72 is not a multiple of 16", "try 64 or 80"]),
    ("dim-multiple-qk", "E210", edit("head_dim = 64", "qk_dim = [[100]]\n    v_dim = 64"),
     ["qk_dim = 100", "try 96 or 112"]),
    ("dim-too-large", "E211", edit("head_dim = 64", "head_dim = [[512]]"), ["above 256"]),
    ("top-k-above-limit", "E217", edit("top_k = 8", "top_k = [[100]]"), ["above 64", "larger blocks"]),
    ("query-block-not-pow2", "E220", edit("score = cmp)", "score = cmp, query_block = [[48]])"),
     ["power of two from 1 to 128", "try 32 or 64"]),
    ("query-block-too-large", "E220", edit("score = cmp)", "score = cmp, query_block = [[256]])"),
     ["power of two from 1 to 128", "128"]),
    ("indexer-block", "E221", edit("    branch slc = select(block = 64, top_k = 8, score = cmp)",
                                   "    branch idx = indexer(heads = 4, dim = 64)\n"
                                   "    branch slc = select(block = [[64]], top_k = 8, score = idx)"),
     ["scores single tokens", "block = 1"]),
    ("indexer-dim", "E210", edit("    branch swa", "    branch idx = indexer(heads = 4, dim = [[40]])\n    branch swa")
     .replace("score = cmp)", "score = cmp)\n    branch tok = select(block = 1, top_k = 8, score = idx)")
     .replace("slc, swa)", "slc, swa, tok)"), ["not a multiple of 16", "indexer"]),
    ("indexer-in-output", "E223", edit("    branch swa", "    branch idx = indexer(heads = 4, dim = 64)\n"
                                       "    branch tok = select(block = 1, top_k = 8, score = idx)\n    branch swa")
     .replace("slc, swa)", "slc, swa, tok, [[idx]])"), ["an indexer", "no output of its own"]),
    ("causal-number", "E213", edit("head_dim = 64", "head_dim = 64\n    causal = [[1]]"),
     ["true or false"]),
    ("number-is-bool", "E213", edit("heads = 8", "heads = [[true]]"), ["expected a number"]),
    ("pool-number", "E213", edit("stride = 16)", "stride = 16, pool = [[3]])"), ["takes a name"]),
    ("score-expression", "E213", edit("score = cmp", "score = [[2 * cmp]]"), ["takes a name"]),
    ("pool-choice", "E214", edit("stride = 16)", "stride = 16, pool = [[max]])"),
     ["pool = max is not one of mean, linear or mlp"]),
    ("group-too-large", "E215", edit("heads = 8\n    kv_heads = 2", "heads = 256\n    kv_heads = [[2]]"),
     ["at most 64", "try kv_heads = 4"]),

    # E3xx: names and references
    ("unknown-constant", "E300", edit("size = 128", "size = [[W]]"), ["unknown constant 'W'", "let W"]),
    ("used-before-let", "E300", "attention a {\n    branch w = window(size = [[W]])\n    output = w\n}\n"
     "let W = 8\n", ["defined on line 5"]),
    ("branch-as-number", "E300", edit("size = 128", "size = [[cmp]]"), ["'cmp' is a branch"]),
    ("duplicate-let", "E301", "let S = 16\nlet [[S]] = 32\n" + BASE, ["'S' is already defined", "line 1"]),
    ("duplicate-let-in-block", "E301", "let S = 16\n" + edit("    heads", "    let [[S]] = 2\n    heads"),
     ["already defined"]),
    ("duplicate-block", "E302", BASE + BASE.replace("attention a", "attention [[a]]"),
     ["attention block 'a' is declared twice"]),
    ("duplicate-branch", "E303", edit("    output", "    [[branch swa = window(size = 64)]]\n    output"),
     ["branch 'swa' is declared twice"]),
    ("duplicate-field", "E304", edit("kv_heads = 2", "kv_heads = 2\n    [[heads = 8]]"),
     ["field 'heads' is set twice"]),
    ("duplicate-param", "E305", edit("size = 128)", "size = 128, [[size = 64]])"),
     ["parameter 'size' of branch swa is given twice"]),
    ("unknown-field", "E306", edit("heads = 8", "[[hedas]] = 8"), ["unknown field 'hedas'", "did you mean 'heads'"]),
    ("param-as-field", "E306", edit("heads = 8", "[[block]] = 8"), ["inside the branch's parentheses"]),
    ("unknown-param", "E307", edit("size = 128)", "size = 128, [[sink]] = 4)"),
     ["window has no parameter 'sink'", "did you mean 'sinks'"]),
    ("unknown-kind", "E308", edit("window(", "[[windw]]("), ["unknown branch kind 'windw'", "'window'"]),
    ("missing-stride", "E309", edit("compress(block = 32, stride = 16)", "[[compress(block = 32)]]"),
     ["missing the parameter stride", "add stride = 16"]),
    ("missing-score", "E309", edit("select(block = 64, top_k = 8, score = cmp)",
                                   "[[select(block = 64, top_k = 8)]]"), ["missing the parameter score"]),
    ("missing-size", "E309", edit("window(size = 128)", "[[window()]]"), ["missing the parameter size"]),
    ("unknown-score", "E310", edit("score = cmp", "score = [[cpm]]"),
     ["has no branch 'cpm'", "did you mean 'cmp'"]),
    ("unknown-output-branch", "E310", edit("slc, swa)", "slc, [[sw]])"),
     ["output names 'sw'", "did you mean 'swa'"]),
    ("score-is-window", "E311", edit("score = cmp", "score = [[swa]]"),
     ["names a window branch", "score = cmp or mean_pool"]),
    ("score-is-select", "E311", edit("score = cmp", "score = [[slc]]"), ["names a select branch"]),
    ("reserved-name", "E312", edit("    output = gate(sigmoid, cmp, slc, swa)",
                                   "    [[branch mean_pool = window(size = 8)]]\n"
                                   "    output = gate(sigmoid, cmp, slc, swa, mean_pool)"), ["reserved"]),
    ("head-dim-conflict", "E313", edit("head_dim = 64", "head_dim = 64\n    [[qk_dim = 64]]"),
     ["conflicts with 'head_dim'"]),

    # E4xx: output
    ("unknown-combiner", "E400", edit("gate(sigmoid, cmp, slc, swa)", "[[max]](cmp, slc, swa)"),
     ["unknown output combiner 'max'"]),
    ("repeated-branch", "E401", edit("slc, swa)", "slc, swa, [[cmp]])"), ["lists branch 'cmp' twice"]),
    ("unreachable-branch", "E402", edit("    branch swa = window(size = 128)", "    [[branch swa = window(size = 128)]]")
     .replace("cmp, slc, swa)", "cmp, slc)"),
     ["branch 'swa' is never used", "gate(sigmoid, cmp, slc, swa)"]),
    ("unreachable-score-source", "E402", edit("    branch cmp = compress(block = 32, stride = 16)",
                                              "    [[branch cmp = compress(block = 32, stride = 16)]]")
     .replace("score = cmp", "score = mean_pool").replace("gate(sigmoid, cmp, slc, swa)", "sum(slc, swa)"),
     ["branch 'cmp' is never used", "sum(slc, swa, cmp)"]),
    ("gate-activation", "E403", edit("sigmoid", "[[relu]]"), ["'relu' is not supported", "sigmoid"]),
    ("gate-no-activation", "E404", edit("gate(sigmoid, cmp", "gate([[cmp]]"),
     ["first argument is its activation", "gate(sigmoid, cmp"]),
    ("sum-empty", "E404", edit("output = gate(sigmoid, cmp, slc, swa)", "[[output = sum()]]"),
     ["combines no branch"]),
    ("gate-no-branch", "E404", edit("output = gate(sigmoid, cmp, slc, swa)", "[[output = gate(sigmoid)]]"),
     ["combines no branch", "gate(sigmoid, cmp, slc, swa)"]),
    ("missing-output", "E405", edit("    output = gate(sigmoid, cmp, slc, swa)\n", "")
     .replace("attention a", "attention [[a]]"), ["has no output", "output = gate(sigmoid, slc, swa)"]),
    ("duplicate-output", "E406", edit("}", "    [[output = cmp]]\n}"), ["output is declared twice"]),
]


def _caret(render: str):
    """(column, width) of the caret line of a rendered error."""
    lines = render.splitlines()
    caret = next(line for line in lines[2:] if line.strip() and set(line.strip()) == {"^"})
    start = len(caret) - len(caret.lstrip(" ")) - 4
    return start + 1, caret.count("^")


@pytest.mark.parametrize("case_id, code, src, fragments", CASES, ids=[c[0] for c in CASES])
def test_check_reports(case_id, code, src, fragments, tmp_path, capsys):
    text, line, column, width = marked(src)
    path = tmp_path / f"{case_id}.nsa"
    path.write_text(text, encoding="utf-8")

    assert cli.main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}:{line}:{column}: error[{code}]: "), err
    source_line = text.split("\n")[line - 1]
    assert err.splitlines()[1] == "    " + source_line.expandtabs(1)
    col, carets = _caret(err)
    assert col == column
    assert carets == max(1, min(width, len(source_line) - column + 1))
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err and "lark" not in err.lower()

    with pytest.raises(SpecError) as info:
        parse_source(text, str(path))
    e = info.value
    assert (e.code, e.line, e.column) == (code, line, column)
    assert e.span.file == str(path)
    assert e.render() + "\n" == err


def test_codes_are_documented():
    doc = (__import__("pathlib").Path(__file__).parents[1] / "docs" / "LANGUAGE.md").read_text()
    for code in {c[1] for c in CASES} | {"E104", "E105", "E106", "E110", "E111"}:
        assert f"| {code} |" in doc, code


def test_every_hint_is_present():
    """Checks over values and references always suggest a fix."""
    for case_id, code, src, _ in CASES:
        if code[:2] in ("E2", "E3", "E4") and code not in ("E201", "E206", "E207"):
            text = marked(src)[0]
            with pytest.raises(SpecError) as info:
                parse_source(text)
            assert info.value.hint, case_id


def test_check_in_a_subprocess_has_no_traceback(tmp_path):
    text, line, column, _ = marked(edit("stride = 16", "stride = [[12]]"))
    bad = tmp_path / "bad.nsa"
    bad.write_text(text)
    r = subprocess.run([sys.executable, "-m", "nsa_dsl", "check", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert f"{bad}:{line}:{column}: error[E204]: stride 12 does not divide block 32" in r.stderr
    assert "hint: try 8 or 16" in r.stderr


# ---------------------------------------------------------------- accepted

def _parse_one(text):
    (spec,) = parse_source(text).specs
    return spec


def test_score_source_need_not_be_in_output():
    spec = _parse_one(BASE.replace("gate(sigmoid, cmp, slc, swa)", "gate(sigmoid, slc, swa)"))
    assert spec.output.branches == ("slc", "swa")


def test_score_source_may_also_be_in_output():
    assert _parse_one(BASE).output.branches == ("cmp", "slc", "swa")


def test_single_branch_and_sum_outputs():
    assert _parse_one(BASE.replace("gate(sigmoid, cmp, slc, swa)", "sum(cmp, slc, swa)")).output.kind == "sum"
    spec = _parse_one("attention a { branch w = window(size = 8) output = w }")
    assert (spec.output.kind, spec.output.branches, spec.output.activation) == ("branch", ("w",), None)


def test_boundaries_accepted():
    spec = _parse_one(BASE.replace("size = 128", "size = 1048576, sinks = 0")
                      .replace("head_dim = 64", "head_dim = 256")
                      .replace("top_k = 8", "top_k = 3")
                      .replace("heads = 8\n    kv_heads = 2", "heads = 64\n    kv_heads = 1"))
    assert spec.branch("swa").size == 2 ** 20
    assert spec.branch("slc").top_k == 3
    assert (spec.qk_dim, spec.v_dim, spec.heads // spec.kv_heads) == (256, 256, 64)


def test_forced_blocks_may_be_zero():
    spec = _parse_one(BASE.replace("score = cmp", "score = cmp, keep_first = 0, keep_last = 0")
                      .replace("top_k = 8", "top_k = 1"))
    assert (spec.branch("slc").keep_first, spec.branch("slc").keep_last) == (0, 0)


def test_stride_equal_to_block_is_fine():
    assert _parse_one(BASE.replace("stride = 16", "stride = 32")).branch("cmp").stride == 32


def test_problems_lists_all_in_file_order():
    import dataclasses
    from nsa_dsl.language import checks
    spec = _parse_one(BASE)
    swa = spec.branch("swa")
    bad = dataclasses.replace(spec, heads=7, branches=(*spec.branches[:2], dataclasses.replace(swa, size=0)))
    # the window's error points at its branch (line 7), after kv_heads (line 3)
    assert [(e.code, e.line) for e in checks.problems(bad)] == [("E209", 3), ("E203", 7)]
    with pytest.raises(SpecError, match="E209"):
        checks.check_spec(bad)
