"""A Spec built by hand gets the parser's checks at compile(); specs that pass `check` never fail
later with anything but a SpecError (limits refused up front, at check time)."""
import dataclasses
import time

import pytest

import nsa_dsl
from nsa_dsl import SpecError

BASE = nsa_dsl.parse("""
attention h {
    branch cmp = compress(block = 16, stride = 8)
    branch slc = select(block = 16, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 16, sinks = 2)
    output = gate(sigmoid, cmp, slc, swa)
}
""")


def _with(branch, **changes):
    b = BASE.branch(branch)
    return dataclasses.replace(BASE, branches=tuple(dataclasses.replace(x, **changes) if x is b else x
                                                    for x in BASE.branches))


HAND_BUILT = {
    "window size 0": (lambda: _with("swa", size=0), "E203"),
    "duplicate branch names": (lambda: _with("slc", name="cmp"), "E303"),
    "top_k 0": (lambda: _with("slc", top_k=0), "E203"),
    "keep_first > top_k": (lambda: _with("slc", keep_first=5), "E208"),
    "block 0": (lambda: _with("cmp", block=0), "E203"),
    "score at a window": (lambda: _with("slc", score="swa"), "E311"),
    "activation relu": (lambda: dataclasses.replace(BASE, output=dataclasses.replace(BASE.output, activation="relu")), "E403"),
    "output kind max": (lambda: dataclasses.replace(BASE, output=dataclasses.replace(BASE.output, kind="max")), "E400"),
    "unknown output branch": (lambda: dataclasses.replace(BASE, output=dataclasses.replace(
        BASE.output, branches=("cmp", "slc", "nope"))), "E310"),
    "block as text": (lambda: _with("cmp", block="16"), "E213"),
    "bool size": (lambda: _with("swa", size=True), "E213"),
    "70-character name": (lambda: _with("swa", name="w" * 70), "E116"),
}


@pytest.mark.parametrize("case", list(HAND_BUILT))
def test_compile_checks_hand_built_ir(case, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    make, code = HAND_BUILT[case]
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(make())
    assert e.value.code == code, str(e.value)
    with pytest.raises(SpecError) as e:
        nsa_dsl.SparseAttention(make(), hidden_size=32, heads=2)
    assert e.value.code == code


LIMITS = {
    "top_k 256": ("branch slc = select(block = 16, top_k = 256, score = cmp)", "E217"),
    "segments per block": ("branch cmp = compress(block = 16384, stride = 1)", "E218"),
    "select strides": ("branch slc = select(block = 65536, top_k = 3, score = cmp)", "E218"),
    "learned pool block": ("branch cmp = compress(block = 1048576, stride = 16384, pool = linear)", "E219"),
    "70-character name": ("branch " + "w" * 70 + " = window(size = 16)", "E116"),
}


@pytest.mark.parametrize("case", list(LIMITS))
def test_limits_are_refused_at_check_time(case):
    line, code = LIMITS[case]
    text = """attention h {
    branch cmp = compress(block = 16, stride = 8)
    branch slc = select(block = 16, top_k = 3, score = cmp)
    branch swa = window(size = 16)
    output = gate(sigmoid, cmp, slc, swa)
}"""
    kind = line.split("=")[1].strip().split("(")[0]
    old = next(l for l in text.splitlines() if f"= {kind}(" in l)
    text = text.replace(old, "    " + line)
    if "w" * 70 in line:
        text = text.replace("slc, swa)", "slc, " + "w" * 70 + ")")
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        nsa_dsl.parse(text)
    assert e.value.code == code and time.perf_counter() - t0 < 5, str(e.value)


def test_explain_of_a_wide_scoring_block_is_quick():
    spec = nsa_dsl.parse("""attention a {
    branch cmp = compress(block = 4096, stride = 64)
    branch slc = select(block = 8192, top_k = 4, score = cmp)
    output = sum(cmp, slc)
}""")
    from nsa_dsl.tools.explain import explain
    t0 = time.perf_counter()
    explain(spec)
    assert time.perf_counter() - t0 < 10
