"""nsa_dsl.tools.explain: the report's numbers, layout and extension points."""
from __future__ import annotations

import time

import pytest

from nsa_dsl.language import cost
from nsa_dsl.language import shapes as S
from nsa_dsl.tools.explain import Section, explain, explain_sections, format_report
from nsa_dsl.language.ir import Compress, Output, Select, Span, Spec, Window

SPAN = Span.unknown()

PAPER = """\
attention nsa_paper {
    heads    = 64
    kv_heads = 4
    qk_dim   = 192
    v_dim    = 128
    causal   = true
    branch cmp = compress(block = 32, stride = 16, pool = mlp)
    branch slc = select(block = 64, top_k = 16, score = cmp, keep_first = 1, keep_last = 2)
    branch swa = window(size = 512)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


def paper_spec() -> Spec:
    try:
        import nsa_dsl
        return nsa_dsl.parse(PAPER)
    except ImportError:  # parser not there: the same spec straight from the IR
        pass
    branches = (Compress("cmp", 32, 16, "mlp", SPAN), Select("slc", 64, 16, "cmp", 1, 2, SPAN),
                Window("swa", 512, 0, SPAN))
    out = Output("gate", ("cmp", "slc", "swa"), "sigmoid", SPAN)
    return Spec("nsa_paper", 64, 4, 192, 128, True, branches, out, SPAN)


def ir_spec(*branches, name="s", **dims) -> Spec:
    out = Output("sum", tuple(b.name for b in branches), None, SPAN)
    return Spec(name, dims.get("heads"), dims.get("kv_heads"), dims.get("qk_dim"),
                dims.get("v_dim"), True, tuple(branches), out, SPAN)


def section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    k = lines.index(title)
    body = []
    for line in lines[k + 1:]:
        if not line:
            break
        body.append(line)
    return body


def row(text: str, title: str, name: str) -> list[str]:
    for line in section(text, title):
        cells = line.split()
        n = len(name.split())
        if cells[:n] == name.split() and cells[n].replace(".", "").isdigit():
            return cells[n:]
    raise AssertionError(f"no row {name!r} under {title!r}")


@pytest.fixture(scope="module")
def paper_report() -> str:
    return explain(paper_spec())


def test_paper_numbers_at_64k(paper_report):
    title = "T = 65536 (forward)"
    cmp = row(paper_report, title, "cmp")
    assert cmp[:2] == ["2046.6", "4095"]                 # PERF.md: ~2046 compressed keys
    assert row(paper_report, title, "slc score")[:2] == ["2046.6", "4095"]
    slc = row(paper_report, title, "slc")
    assert slc[1] == "1024" and 980 < float(slc[0]) < 1000   # 16 x 64 at t = T-1
    swa = row(paper_report, title, "swa")
    assert swa[1] == "512" and float(swa[0]) == pytest.approx(510.0, abs=0.1)
    dense = row(paper_report, title, "dense causal")
    assert dense[:2] == ["32768.5", "65536"]
    assert "x fewer FLOP" in "\n".join(section(paper_report, title))


def test_paper_numbers_match_shapes(paper_report):
    spec = paper_spec()
    for n in (4096, 131072):
        c = cost.cost(S.spec_shapes(spec), n, cost.Dims.of(spec))
        title = f"T = {n} (forward)"
        for r in c.rows:
            cells = row(paper_report, title, r.name)
            assert cells[:3] == [f"{r.keys_avg:.1f}", str(r.keys_last), f"{r.flops:.2e}".replace("e+", "e")]
        total = row(paper_report, title, "total")
        assert total[2] == f"{c.total.flops:.2e}".replace("e+", "e")
        assert f"{c.flop_ratio:.1f}x fewer FLOP" in paper_report


def test_paper_flops_with_perf_dims():
    """PERF.md costs the paper pattern with D = 128: 4.4e12 + 2.2e12 + 2.2e12 + 1.1e12."""
    text = explain(paper_spec(), lengths=(65536,), qk_dim=128, v_dim=128)
    title = "T = 65536 (forward)"
    assert row(text, title, "cmp")[2] == "4.39e12"
    assert row(text, title, "slc score")[2] == "2.20e12"
    assert row(text, title, "slc")[2] in ("2.11e12", "2.12e12")     # own block partial
    assert row(text, title, "swa")[2] == "1.10e12"
    assert row(text, title, "total")[2].startswith("9.8")
    assert "qk_dim, v_dim: given" in text
    assert "summary" not in text                                   # one length, no summary


def test_formulas_and_weights(paper_report):
    keys = "\n".join(section(paper_report, "keys attended by query t (0 <= t < T)"))
    assert "max(0, floor((t + 1)/16) - 1)" in keys
    assert "64*min(15, floor(t/64)) + (t mod 64) + 1" in keys
    assert "min(512, t + 1)" in keys
    assert "t + 1" in keys
    weights = "\n".join(section(paper_report, "selection scores"))
    assert "w(i, j) = max(0, min(i + 1, 4*j + 3) - max(i, 4*j) + 1)" in weights
    assert "i = max(0, 4*j - 1) .. 4*j + 3: weights 1 2 2 2 1" in weights


def test_layout(paper_report):
    lines = paper_report.splitlines()
    assert lines[0] == "nsa-dsl explain: attention nsa_paper"
    assert max(len(x) for x in lines) <= 100
    for n in (4096, 8192, 16384, 32768, 65536, 131072):
        assert f"T = {n} (forward)" in lines
    assert "heads 64, kv_heads 4 (group 16), qk_dim 192, v_dim 128, 2 bytes per element" in paper_report
    assert "declared in the spec" in paper_report and "defaulted" not in paper_report
    # the table's numeric columns line up
    body = section(paper_report, "T = 65536 (forward)")
    ends = {len(x) for x in body[2:7]}
    assert len(ends) == 1
    summary = section(paper_report, "summary (forward, all heads)")
    assert len(summary) == 7


def test_defaults_are_stated():
    spec = ir_spec(Select("moba", 512, 3, "mean_pool", 0, 1, SPAN), name="moba")
    text = explain(spec, lengths=(8192,))
    assert "heads 64, kv_heads 4 (group 16), qk_dim 128, v_dim 128" in text
    assert "defaulted" in text
    assert "moba score" in text and "mean-pooled" in text
    assert "selection scores" not in text


def test_inexact_and_sinks():
    spec = ir_spec(Compress("c", 32, 16, "mean", SPAN), Select("s", 64, 4, "c", 1, 0, SPAN),
                   Window("w", 128, 4, SPAN), heads=8, kv_heads=2, qk_dim=64, v_dim=64)
    text = explain(spec, lengths=(1000, 5000))
    assert "at most min(256, t + 1)" in text and "at least" in text
    assert "* upper bound" in text
    assert row(text, "T = 1000 (forward)", "s*")
    assert "min(128, t + 1) + min(4, max(0, t - 127))" in text
    assert "heads 8, kv_heads 2 (group 4)" in text
    assert max(len(x) for x in text.splitlines()) <= 100


def test_extra_sections_for_the_cli():
    spec = paper_spec()
    plan = Section("kernel plan", "  compress.fwd  grid (T/64, 4)")
    text = explain(spec, lengths=(4096,), extra_sections=[plan])
    assert text.rstrip().endswith("kernel plan\n  compress.fwd  grid (T/64, 4)")
    sections = explain_sections(spec, lengths=(4096,))
    assert [s.title for s in sections][:2] == ["spec", "keys attended by query t (0 <= t < T)"]
    assert format_report(spec, sections + [plan]) == text


def test_fast_at_long_lengths():
    spec = paper_spec()
    t0 = time.perf_counter()
    text = explain(spec, lengths=(1 << 20, 1_000_003))
    assert time.perf_counter() - t0 < 5
    assert "T = 1048576 (forward)" in text


def test_every_example_explains():
    nsa_dsl = pytest.importorskip("nsa_dsl")
    from pathlib import Path
    files = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.nsa"))
    if not files:
        pytest.skip("no examples")
    for path in files:
        try:
            specs = nsa_dsl.load_file(path).specs
        except ImportError:
            pytest.skip("parser not available")
        for spec in specs:
            text = explain(spec, lengths=(1000, 65536))
            assert max(len(x) for x in text.splitlines()) <= 100, path
            dense = "dense causal" if spec.causal else "dense attention (not causal)"
            assert "T = 65536 (forward)" in text and dense in text
