"""API edges: unknown names in every dict argument are errors naming the known ones; one spec
coercion rule (an existing path is a file, whatever it contains); a bool is no scale."""
import pytest
import torch

import nsa_dsl
from nsa_dsl import SpecError

SPEC = """
attention e {
    branch cmp = compress(block = 16, stride = 8)
    branch slc = select(block = 16, top_k = 2, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 16)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


@pytest.fixture
def call(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    spec = nsa_dsl.parse(SPEC)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, h, 16, generator=g) for h in (2, 1, 1))
    gates = torch.randn(1, 40, 2, 3, generator=g)
    return spec, (q, k, v, gates)


@pytest.mark.parametrize("fn", ["op", "reference"])
@pytest.mark.parametrize("kw,code,known", [
    (lambda k, v: {"compressed": {"cmpp": (k[:, :4], v[:, :4])}}, "E610", "cmp"),
    (lambda k, v: {"indices": {"slcc": torch.zeros(1, 40, 1, 2, dtype=torch.int32)}}, "E626", "slc"),
    (lambda k, v: {"index": {"idx": (k, k, k)}}, "E627", "none"),
], ids=["compressed", "indices", "index"])
def test_unknown_names_in_dict_arguments(call, fn, kw, code, known):
    spec, (q, k, v, gates) = call
    run = nsa_dsl.compile(spec) if fn == "op" else (lambda *a, **x: nsa_dsl.reference(spec, *a, **x))
    with pytest.raises(SpecError) as e:
        run(q, k, v, gates, **kw(k, v))
    assert e.value.code == code and known in str(e.value)


def test_an_existing_path_is_a_file_whatever_it_holds(tmp_path):
    weird = tmp_path / "{weird}"
    weird.mkdir()
    path = weird / "a.nsa"
    path.write_text(SPEC)
    layer = nsa_dsl.SparseAttention(str(path), hidden_size=32, heads=2, kv_heads=1)
    assert layer.spec.name == "e"
    assert nsa_dsl.compile(str(path)).spec.name == "e"
    with pytest.raises(SpecError) as e:                      # text is text; a missing path says so
        nsa_dsl.compile(str(tmp_path / "missing.nsa"))
    assert e.value.code == "E105"


@pytest.mark.parametrize("scale", [True, False, "0.5"])
def test_a_bool_or_a_string_is_no_scale(call, scale):
    spec, (q, k, v, gates) = call
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(spec)(q, k, v, gates, scale=scale)
    assert e.value.code == "E618"
