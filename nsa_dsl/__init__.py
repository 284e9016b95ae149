"""nsa-dsl: a compiler for sparse attention.

    spec = nsa_dsl.load("examples/nsa_paper.nsa")   # parse + check; raises SpecError
    op = nsa_dsl.compile(spec)                      # generated, cached Triton kernels
    o = op(q, k, v, gates)                          # [B, T, HQ, Dv], differentiable

The front end (parse, check, shapes) imports neither torch nor triton; the
rest is imported on first use.
"""
from __future__ import annotations

from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Spec, SpecFile

__version__ = "0.1.0"

__all__ = ["SpecError", "Spec", "SpecFile", "parse", "parse_file", "load", "load_file",
           "reference", "compile", "SparseAttention", "compressed_cu_seqlens", "NSACache", "__version__"]


def parse_file(text: str, file: str = "<string>") -> SpecFile:
    """Parse and check every ``attention`` block of ``text``."""
    from nsa_dsl.language.parser import parse_source
    return parse_source(text, file)


def load_file(path) -> SpecFile:
    from nsa_dsl.language.parser import read_spec_text
    text = read_spec_text(path)
    return parse_file(text, str(path))


def _pick(specs: SpecFile, name: str | None) -> Spec:
    from nsa_dsl.language.parser import pick_spec
    return pick_spec(specs, name)


def parse(text: str, name: str | None = None, file: str = "<string>") -> Spec:
    """Parse and check ``text``; return its attention block (``name`` picks one of several)."""
    return _pick(parse_file(text, file), name)


def load(path, name: str | None = None) -> Spec:
    """Read, parse and check a ``.nsa`` file; return its attention block."""
    return _pick(load_file(path), name)


def __getattr__(name):  # lazy: keep `import nsa_dsl` free of torch for the CLI's check/explain
    if name == "reference":
        from nsa_dsl.semantics.reference import reference
        return reference
    if name == "compile":
        from nsa_dsl.runtime.op import compile
        return compile
    if name == "SparseAttention":
        from nsa_dsl.runtime.module import SparseAttention
        return SparseAttention
    if name == "NSACache":              # decoding: a layer's KV cache (layer.new_cache(...))
        from nsa_dsl.runtime.kv_cache import NSACache
        return NSACache
    if name == "compressed_cu_seqlens":   # packed sequences: offsets of their compressed blocks
        from nsa_dsl.semantics.varlen import compressed_cu_seqlens
        return compressed_cu_seqlens
    raise AttributeError(f"module 'nsa_dsl' has no attribute {name!r}")
