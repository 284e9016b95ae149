"""docs/SERVING.md, the serving contract, cannot rot: its ```python blocks run, in order and in one
namespace (the layer's paged cache against the full forward; ``nsa_with_kvcache`` with the engine's
own block table against a contiguous cache, rejected draft tokens and a freed page reused against
the reference), its ```py sketches parse, the signatures it quotes are the code's, and every error
code it names exists. Kernels run through Triton's interpreter (conftest.py), caches NaN-filled;
tiny shapes, float32.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from nsa_dsl.errors import CODES
from nsa_dsl.runtime.decoding import nsa_with_kvcache
from nsa_dsl.runtime.kv_cache import PagedNSACache, check_block_table
from nsa_dsl.runtime.module import SparseAttention
from test_decode import _one_thread  # noqa: F401 - the same autouse fixture (one intra-op thread)

DOC = Path(__file__).resolve().parent.parent / "docs" / "SERVING.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def blocks(lang: str) -> list[tuple[int, str]]:
    """(first line, code) of each block fenced ```lang."""
    text = DOC.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def _compiled(line: int, src: str):
    # padded so that a traceback names the line of docs/SERVING.md
    return compile("\n" * (line - 1) + src, str(DOC), "exec")


def test_the_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "kernels"))
    code = blocks("python")
    assert len(code) >= 4, "the layer example, the engine example and its two continuations"
    assert any("nsa_with_kvcache(" in src and "assert_close" in src for _, src in code)
    ns = {"__name__": "serving_doc"}
    for line, src in code:
        exec(_compiled(line, src), ns)
    assert ns["cache_seqlens"].tolist() == [34, 16]


def test_the_sketches_parse():
    for line, src in blocks("py"):
        _compiled(line, src)


def test_the_error_codes_exist():
    named = set(re.findall(r"\bE\d{3}\b", DOC.read_text()))
    assert named and not named - set(CODES), sorted(named - set(CODES))


def _signature(fn) -> str:
    """``name(a, b, *, c=None)``: parameters and defaults, without annotations."""
    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={_default(p.default)}")
    return f"{fn.__name__}({', '.join(parts)})"


def _default(x) -> str:
    return str(x) if isinstance(x, torch.dtype) else repr(x).replace("'", '"')


@pytest.mark.parametrize("fn", [nsa_with_kvcache, check_block_table, PagedNSACache.__init__,
                                SparseAttention.new_cache])
def test_the_documented_signatures_are_the_code(fn):
    sig = _signature(fn).replace("self, ", "")
    sig = sig.replace("__init__(", "PagedNSACache(").replace("new_cache(", "layer.new_cache(")
    text = " ".join(DOC.read_text().split())          # the doc wraps lines
    if fn is SparseAttention.new_cache:              # quoted as "(batch_size, max_len, page_size=P)" + keywords
        assert "`layer.new_cache(batch_size, max_len, page_size=P)`" in text and sig.endswith(
            "page_size=None, num_pages=None, dtype=None, device=None)"), sig
        return
    assert sig in text, sig
