"""`nsa-dsl show`: the masks against per-query key sets written from DESIGN.md section 3, the
PNG, and the --from-model round trip through a checkpoint of examples/train_tiny_lm.py."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import nsa_dsl
from nsa_dsl.tools import cli
from nsa_dsl.errors import SpecError
from nsa_dsl.language.ir import Compress, Select, Window

torch = pytest.importorskip("torch")
show = pytest.importorskip("nsa_dsl.tools.show")

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SMALL = """\
attention small {
    branch cmp = compress(block = 8, stride = 4)
    branch slc = select(block = 8, top_k = 3, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 5, sinks = 2)
    output = gate(sigmoid, cmp, slc, swa)
}
"""
MEAN_POOL = """\
attention mp {
    branch slc = select(block = 4, top_k = 2, score = mean_pool, keep_first = 0, keep_last = 1)
    branch swa = window(size = 3)
    output = sum(slc, swa)
}
"""
SCORES_ONLY = """\
attention so {
    branch cmp = compress(block = 4, stride = 2)
    branch slc = select(block = 4, top_k = 3, score = cmp)
    output = slc
}
"""


def _mpl_or_skip():
    pytest.importorskip("matplotlib")


# ---------------------------------------------------------------- brute force (DESIGN section 3)

def brute_keys(branch, t, T, idx_row=None, causal=True):
    """The keys query t attends in one branch, by the letter of docs/SEMANTICS.md."""
    if isinstance(branch, Window):
        last = t if causal else min(T - 1, t + branch.size - 1)
        return {p for p in range(T) if max(0, t - branch.size + 1) <= p <= last} | \
               {p for p in range(branch.sinks) if p <= t or not causal}
    if isinstance(branch, Compress):
        l, d = branch.block, branch.stride
        n_c = (T - l) // d + 1 if T >= l else 0
        keys = set()
        for i in range(n_c):
            if i * d + l - 1 <= t or not causal:
                keys |= set(range(i * d, i * d + l))
        return keys
    assert isinstance(branch, Select)
    keys = set()
    for j in idx_row:
        if j >= 0:
            keys |= {p for p in range(j * branch.block, (j + 1) * branch.block) if (p <= t or not causal) and p < T}
    return keys


def brute_forced(branch, t, T, causal=True):
    """Blocks selected whatever the scores: all eligible when at most top_k are, else the forced;
    a group of query_block positions chooses at its last position."""
    Q = branch.query_block
    last = min((t // Q + 1) * Q, T) - 1
    n_sel = -(-T // branch.block)
    eligible = [j for j in range(n_sel) if j * branch.block <= last or not causal]
    if len(eligible) <= branch.top_k:
        return eligible
    own = last // branch.block
    return [j for j in eligible if j < branch.keep_first or own - branch.keep_last < j <= own]


def brute_mask(branch, T, idx=None, causal=True):
    m = np.zeros((T, T), bool)
    for t in range(T):
        row = idx[t] if idx is not None else None
        for p in brute_keys(branch, t, T, row, causal):
            m[t, p] = True
    return m


def random_indices(spec, T, seed=0):
    """The reference's selection on random inputs (batch 2, 3 kv heads, groups of 2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T, 6, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, T, 3, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, T, 3, 16, generator=g, dtype=torch.float64)
    C = len(spec.output.branches)
    gates = torch.rand(2, T, 6, C, generator=g, dtype=torch.float64) if spec.output.kind == "gate" else None
    _, aux = nsa_dsl.reference(spec, q, k, v, gates, return_aux=True)
    return aux.indices


# ------------------------------------------------------------------------------ exact masks

@pytest.mark.parametrize("text", [SMALL, MEAN_POOL, SCORES_ONLY], ids=["nsa", "mean_pool", "scores_only"])
@pytest.mark.parametrize("T", [1, 7, 8, 9, 33, 70])
def test_masks_equal_brute_force(text, T):
    spec = nsa_dsl.parse(text)
    indices = random_indices(spec, T)
    masks = show.attention_masks(spec, T, indices)
    assert list(masks) == list(spec.branch_names)
    for b in spec.branches:
        idx = indices[b.name][0, :, 0].numpy() if isinstance(b, Select) else None
        assert masks[b.name].dtype == bool and masks[b.name].shape == (T, T)
        np.testing.assert_array_equal(masks[b.name], brute_mask(b, T, idx), err_msg=f"{b.name} T={T}")
    # another batch row / kv head, passed as [T, top_k]
    for b in spec.of_kind("select"):
        idx = indices[b.name][1, :, 2]
        got = show.attention_masks(spec, T, {b.name: idx})[b.name]
        np.testing.assert_array_equal(got, brute_mask(b, T, idx.numpy()))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.nsa")), ids=lambda p: p.stem)
def test_example_specs_static_masks(path):
    for spec in nsa_dsl.load_file(path).specs:
        T = 100
        masks = show.attention_masks(spec, T)
        for b in spec.branches:
            if b.kind == "indexer":        # scores only: no mask of its own
                assert b.name not in masks
                continue
            if isinstance(b, Select):
                forced = [brute_forced(b, t, T, spec.causal) for t in range(T)]
                idx = np.array([f + [-1] * (b.top_k - len(f)) for f in forced])
            else:
                idx = None
            np.testing.assert_array_equal(masks[b.name], brute_mask(b, T, idx, spec.causal), err_msg=b.name)


@pytest.mark.parametrize("T", [5, 40, 97])
def test_static_selection_is_what_every_selection_contains(T):
    """Without indices a select branch shows its forced blocks: a subset of every actual choice."""
    spec = nsa_dsl.parse(SMALL)
    static = show.attention_masks(spec, T)["slc"]
    b = spec.branch("slc")
    for t in range(T):
        assert set(np.flatnonzero(static[t])) == brute_keys(b, t, T, brute_forced(b, t, T))
    indices = random_indices(spec, T, seed=3)["slc"]
    for row in range(2):
        for h in range(3):
            actual = show.attention_masks(spec, T, {"slc": indices[row, :, h]})["slc"]
            assert not (static & ~actual).any()


def test_keys_per_query_counts_each_key_once():
    spec = nsa_dsl.parse(SMALL)
    T = 61
    indices = random_indices(spec, T)
    stats = show.keys_per_query(spec, T, indices)
    idx = indices["slc"][0, :, 0].numpy()
    union = 0
    for b in spec.branches:
        counts = [len(brute_keys(b, t, T, idx[t] if isinstance(b, Select) else None)) for t in range(T)]
        assert stats[b.name] == pytest.approx(np.mean(counts))
    for t in range(T):
        union += len(set().union(*(brute_keys(spec.branch(n), t, T, idx[t] if n == "slc" else None)
                                   for n in spec.output.branches)))
    assert stats["combined"] == pytest.approx(union / T)


# --------------------------------------------------------------------------- downsampling

@pytest.mark.parametrize("T, size", [(100, 16), (97, 10), (64, 64), (64, 100), (200, 7)])
def test_downsampled_masks_are_query_shares_of_max_pooled_cells(T, size):
    spec = nsa_dsl.parse(SMALL)
    indices = random_indices(spec, T)
    exact = show.attention_masks(spec, T, indices)
    small = show.attention_masks(spec, T, indices, size=size)
    n = min(T, size)
    cell = np.arange(T) * n // T
    for name, m in exact.items():
        got = small[name]
        assert got.shape == (n, n)
        if n == T:
            np.testing.assert_array_equal(got, m)
            continue
        # per query: does it attend any key of column c?  then the share of each row's queries
        hit = np.zeros((T, n), bool)
        for c in range(n):
            hit[:, c] = m[:, cell == c].any(1)
        want = np.stack([hit[cell == r].mean(0) for r in range(n)])
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(got > 0, np.stack(
            [[m[np.ix_(cell == r, cell == c)].any() for c in range(n)] for r in range(n)]))


def test_a_one_key_band_survives_downsampling():
    spec = nsa_dsl.parse("attention w { branch swa = window(size = 1, sinks = 1) output = swa }")
    T, size = 8192, 512
    m = show.attention_masks(spec, T, size=size)["swa"]
    assert m.shape == (size, size)
    assert (np.diag(m) == 1).all()             # every query attends its own key
    assert (m[:, 0] > 0).all()                 # and the sink
    assert (m > 0).sum() == 2 * size - 1


def test_bad_arguments():
    spec = nsa_dsl.parse(SMALL)
    with pytest.raises(SpecError) as e:
        show.attention_masks(spec, 0)
    assert e.value.code == "E631"
    with pytest.raises(SpecError, match="expected"):
        show.attention_masks(spec, 10, {"slc": np.zeros((9, 3), int)})
    with pytest.raises(SpecError, match="outside"):
        show.attention_masks(spec, 10, {"slc": np.full((10, 3), 5)})
    two = nsa_dsl.parse("attention two { branch a = select(block = 4, top_k = 1, score = mean_pool, "
                        "keep_first = 0, keep_last = 1) branch b = select(block = 8, top_k = 1, score = mean_pool, "
                        "keep_first = 0, keep_last = 1) output = sum(a, b) }")
    with pytest.raises(SpecError, match="dict"):
        show.attention_masks(two, 10, np.zeros((10, 1), int))


# ---------------------------------------------------------------------------------- the PNG

def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_show_writes_a_png(tmp_path, capsys):
    _mpl_or_skip()
    out = tmp_path / "sub" / "paper.png"
    assert cli.main(["show", str(EXAMPLES / "nsa_paper_mean.nsa"), "--seq-len", "300", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}\n" and captured.err == ""
    w, h = _png_size(out)
    assert 600 < w < 2000 and 600 < h < 2000
    assert out.stat().st_size > 20_000


def test_show_long_sequence_stays_fixed_size(tmp_path, capsys):
    _mpl_or_skip()
    out = tmp_path / "sinks.png"
    assert cli.main(["show", str(EXAMPLES / "sinks.nsa"), "--seq-len", "8k", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    w, h = _png_size(out)
    assert w < 2000 and h < 2000


def test_show_default_output_name(tmp_path, monkeypatch, capsys):
    _mpl_or_skip()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["show", str(EXAMPLES / "multi.nsa"), "--name", "short_ctx", "--seq-len", "64"]) == 0
    assert capsys.readouterr().out == "wrote show_short_ctx_T64.png\n"
    _png_size(tmp_path / "show_short_ctx_T64.png")


def test_random_selection_is_the_reference_on_random_inputs():
    spec = nsa_dsl.load(EXAMPLES / "nsa_paper.nsa")        # pool = mlp, 64 heads declared
    sel, note = show.random_selection(spec, 200)
    assert "random inputs" in note and "mean pooling" in note and "heads 16" in note
    assert sel["slc"].shape == (200, 16)
    b = spec.branch("slc")
    for t in (0, 63, 64, 199):                     # the forced blocks are always there
        assert set(brute_forced(b, t, 200)) <= set(sel["slc"][t].tolist())


def test_missing_matplotlib_is_a_spec_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SpecError) as e:
        show._import_pyplot()
    assert e.value.code == "E630" and "pip install matplotlib" in str(e.value)
    rc = cli.main(["show", str(EXAMPLES / "sinks.nsa"), "--seq-len", "64", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "E630" in err and "Traceback" not in err


# ------------------------------------------------------------------------- --from-model

def _train_example():
    spec = importlib.util.spec_from_file_location("train_tiny_lm_for_show", EXAMPLES / "train_tiny_lm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                     # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def checkpoint(tmp_path):
    ex = _train_example()
    spec = nsa_dsl.parse(ex.TINY_SPEC)
    cfg = ex.Config(seq_len=128, layers=2, hidden=32, heads=2, kv_heads=1, min_gap=ex.spec_gap(spec))
    torch.manual_seed(0)
    model = ex.TinyLM(cfg, spec, "nsa")
    path = tmp_path / "tiny.pt"
    ex.save_checkpoint(str(path), model, model.state_dict(), {"steps": 0})
    spec_path = tmp_path / "tiny.nsa"
    spec_path.write_text(ex.TINY_SPEC)
    return ex, model, path, spec_path


def test_from_model_round_trip(checkpoint, tmp_path, capsys):
    _mpl_or_skip()
    ex, model, path, spec_path = checkpoint
    spec = nsa_dsl.load(spec_path)
    T = 160
    sel, note, marks = show.model_selection(spec, T, str(path), layer=1)
    assert "layer 1" in note and "tiny.pt" in note
    tokens, targets = ex.make_batch(model.cfg, 1, torch.Generator().manual_seed(0), seq_len=T)
    with torch.no_grad():
        _, auxes = model.eval()(tokens, return_aux=True)
    np.testing.assert_array_equal(sel["slc"], auxes[1].indices["slc"][0, :, 0].numpy())
    answers = (targets[0] >= 0).nonzero().flatten().tolist()
    assert [t for t, _ in marks] == answers and len(answers) == model.cfg.queries
    for t, p in marks:               # the value of the pair whose key the answer's query repeats
        assert p < t - model.cfg.min_gap and tokens[0, p - 1] == tokens[0, t] and targets[0, t] == tokens[0, p]
    masks = show.attention_masks(spec, T, sel)
    np.testing.assert_array_equal(masks["slc"], brute_mask(spec.branch("slc"), T, sel["slc"]))

    out = tmp_path / "model.png"
    assert cli.main(["show", str(spec_path), "--seq-len", str(T), "--out", str(out),
                     "--from-model", str(path)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert _png_size(out)[0] > 600


def test_from_model_errors(checkpoint, tmp_path, capsys):
    ex, model, path, spec_path = checkpoint
    other = tmp_path / "other.nsa"
    other.write_text(ex.TINY_SPEC.replace("size = 32", "size = 64"))
    cases = [
        ([str(other), "--from-model", str(path)], "E633"),
        ([str(spec_path), "--from-model", str(tmp_path / "missing.pt")], "E632"),
        ([str(spec_path), "--from-model", str(spec_path)], "E632"),          # not a checkpoint
    ]
    sdpa = ex.TinyLM(model.cfg, model.spec, "sdpa")
    ex.save_checkpoint(str(tmp_path / "sdpa.pt"), sdpa, sdpa.state_dict(), {})
    cases.append(([str(spec_path), "--from-model", str(tmp_path / "sdpa.pt")], "E634"))
    for argv, code in cases:
        rc = cli.main(["show", *argv, "--seq-len", "128", "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert rc == 1 and f"error[{code}]" in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SpecError) as e:
        show.model_selection(nsa_dsl.load(spec_path), 128, str(path), layer=2)
    assert e.value.code == "E634"
    with pytest.raises(SpecError) as e:                      # too short for the task
        show.model_selection(nsa_dsl.load(spec_path), 30, str(path))
    assert e.value.code == "E631"
