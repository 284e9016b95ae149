"""Small helpers shared by the kernel-family tests: render + load a template, compare, random inputs."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch


from nsa_dsl.codegen import launch
from nsa_dsl.codegen.loader import load_module
from nsa_dsl.codegen.plan import select_vars, tile_vars, topk_vars
from nsa_dsl.codegen.render import render


def with_tiles(variables: dict, template: str = "") -> dict:
    """A family's template variables with the plan's derived tile constants (GP, BDK, BDV; the
    selection's TOPKP, BN, NT, ... for ``select.py.j2``; the top-k's TOPKP, A, C for ``topk.py.j2``)."""
    if "G" in variables and "GP" not in variables:
        variables = {**tile_vars(variables["G"], variables.get("DQK", 16), variables.get("DV", 16)), **variables}
    if template.startswith("select") and "BN" not in variables:
        variables = {**select_vars(variables["LS"], variables["TOPK"]), **variables}
    if template.startswith("topk") and "TOPKP" not in variables:   # L, STRIDE: LS for mean_pool
        v = variables
        variables = {**topk_vars(v.get("L", v["LS"]), v.get("STRIDE", v["LS"]), v["LS"], v["TOPK"], v["SCORE"]), **v}
    if "DV" in variables and "BDV" not in variables:   # combine (C, DV, GATED): its row tiles' width
        variables = {**variables, "BDV": tile_vars(1, variables["DV"], variables["DV"])["BDV"]}
    return variables


def render_family(template: str, **variables) -> str:
    """``templates/<template>`` rendered as the plan would (derived tile constants added)."""
    return render(template, **with_tiles(variables, template))


@functools.lru_cache(maxsize=None)
def _load(template: str, items: tuple):
    variables = with_tiles(dict(items), template)
    stem = template.split(".")[0]
    source = render(template, **variables)
    name = stem + "_" + "_".join(f"{k}{v}" for k, v in items)
    return launch.launchers(stem, variables, load_module(source, name))


def load_family(template: str, **variables):
    """Render ``templates/<template>`` with ``variables``, import it and return its launchers
    (cached per variable set)."""
    return _load(template, tuple(sorted(variables.items())))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (absolute error when ``b`` is all zeros). NaN anywhere -> inf."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        # non-finite values must agree exactly (e.g. lse = -inf rows)
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
            return float("inf")
        a, b = a[fa], b[fb]
    num = (a - b).norm().item()
    den = b.norm().item()
    return num / den if den > 0 else num


def rand(shape, dtype=torch.float32, seed: int = 0, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Reproducible standard-normal tensor (generated in float32 on the CPU, then cast/moved)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
    return x.to(device=device, dtype=dtype)


def run_sm90_check(script: str, args, tmp_path) -> None:
    """Run ``script`` (it compiles kernels for sm_90 through ptxas and prints "compiled") in a
    process without TRITON_INTERPRET; skips where this triton build has no CUDA backend / ptxas."""
    import os
    import subprocess
    import sys

    import pytest
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=900)
    if "No module named" in run.stderr or "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("no CUDA backend / ptxas in this triton build")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def assert_near_ties(idx, ref, scores, select_block, keep_first, keep_last, rtol=1e-5, *, causal=True,
                     query_block=1, q_start=0, n_keys=None):
    """``idx`` (a kernel's choice) equals ``ref`` (the float64 reference's), except between blocks
    whose float64 ``scores [B, T, H, n_sel]`` (each row's: its group's with ``query_block``, see
    :func:`ranked_scores`) are tied within ``rtol`` of the row's largest score: where exact
    arithmetic ties, rounding in the kernel's precision decides (the contract promises the lower
    block only for ties that are exact in the arithmetic that ranks them). Forced blocks and the
    number chosen must agree everywhere. Rows are positions ``q_start ..`` of ``n_keys`` keys."""
    from nsa_dsl.semantics.reference import group_last
    assert idx.shape == ref.shape and idx.dtype == torch.int32, (idx.shape, ref.shape, idx.dtype)
    idx, ref, scores = idx.cpu(), ref.cpu(), scores.double().cpu()
    T = idx.shape[1]
    n_keys = q_start + T if n_keys is None else n_keys
    own = group_last(torch.arange(q_start, q_start + T), query_block, n_keys) // select_block   # the choice's own block
    n_sel = -(-n_keys // select_block)
    for b, t, h in (idx != ref).any(-1).nonzero().tolist():
        got, want = idx[b, t, h], ref[b, t, h]
        assert (got >= 0).sum() == (want >= 0).sum(), (t, got.tolist(), want.tolist())
        g, w = got[got >= 0].long(), want[want >= 0].long()
        assert torch.all(g[1:] > g[:-1]) and int(g.max()) <= (int(own[t]) if causal else n_sel - 1), (t, got.tolist())
        forced = lambda j: (j < keep_first) | ((j > own[t] - keep_last) & (j <= own[t]))
        assert torch.equal(g[forced(g)], w[forced(w)]), (t, got.tolist(), want.tolist())
        s = scores[b, t, h]
        sg = torch.nan_to_num(s[g[~forced(g)]].sort().values, neginf=-1e300)
        sw = torch.nan_to_num(s[w[~forced(w)]].sort().values, neginf=-1e300)
        tol = rtol * s[torch.isfinite(s)].abs().max().clamp(min=1e-30)
        assert torch.all((sg - sw).abs() <= tol), (t, got.tolist(), want.tolist(), sg.tolist(), sw.tolist())


def ranked_scores(q, k, select_block, *, lse=None, scale=None, block=None, stride=None, causal=True,
                  query_block=1, q_start=0, n_keys=None):
    """The float64 scores each row's choice ranks ``[B, T, H, n_sel]``: ``score = mean_pool`` when
    ``lse`` is None (``k``: the raw keys), else ``score = <compress branch>`` (``k``: its compressed
    keys ``k_cmp``, ``lse`` its log-sum-exps, ``block`` / ``stride`` its shape); with
    ``query_block`` each row holds its group's (the sum over the group's positions; mean_pool:
    ``-inf`` for blocks incomplete at the group's last position when causal). Rows are positions
    ``q_start ..`` of ``n_keys`` keys (mean_pool: ``k``'s)."""
    from nsa_dsl.semantics import reference as S
    q, k = q.detach().double(), k.detach().double()
    Tq, Q = q.shape[1], query_block
    t = torch.arange(q_start, q_start + Tq, device=q.device)
    if lse is None:
        g = S._scores_mean_pool(q, t, S._block_means(k, select_block), select_block, causal, Q, k.shape[1])
    else:
        n_keys = q_start + Tq if n_keys is None else n_keys
        n_sel = S.num_select_blocks(n_keys, select_block)
        w = S.overlap_weights(block, stride, select_block, k.shape[1], n_sel, dtype=q.dtype, device=q.device)
        g = S._group_rows(S._scores_cmp(q, t, k, lse.detach().double(), scale, block, stride, w, causal), Q)
    return g.repeat_interleave(Q, dim=1)[:, :Tq]


def assert_selections(spec, indices, q, k, *, compressed=None, scale=None, rtol=1e-5):
    """Each select branch's ``indices`` (an op's aux, one sequence) against the float64 reference
    choice from ``q`` and ``k`` (a tensor or a dict by branch), near ties allowed
    (:func:`assert_near_ties`; the spec's causal and each branch's query_block)."""
    from nsa_dsl.semantics import reference as S
    q64 = q.detach().double()
    kd = k if isinstance(k, dict) else {b.name: k for b in spec.branches}
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    causal = spec.causal
    for b in spec.of_kind("select"):
        if b.name not in indices:
            continue
        Q = b.query_block
        if b.score == "mean_pool":
            kb = kd[b.name].detach().double()
            ref = S.select_blocks_mean_pool(q64, kb, b.block, b.top_k, b.keep_first, b.keep_last, causal, Q)
            scores = ranked_scores(q64, kb, b.block, causal=causal, query_block=Q)
        else:
            c = spec.branch(b.score)
            if compressed and c.name in compressed:
                k_cmp = compressed[c.name][0].detach().double()
            else:
                k_cmp = S.mean_pool(kd[c.name].detach().double(), c.block, c.stride)
            _, lse = S.compress_attention(q64, k_cmp, k_cmp, c.block, c.stride, scale, causal)
            ref = S.select_blocks_cmp(q64, k_cmp, lse, scale, c.block, c.stride, b.block, b.top_k,
                                      b.keep_first, b.keep_last, causal, Q)
            scores = ranked_scores(q64, k_cmp, b.block, lse=lse, scale=scale, block=c.block, stride=c.stride,
                                   causal=causal, query_block=Q)
        assert_near_ties(indices[b.name], ref, scores, b.block, b.keep_first, b.keep_last, rtol,
                         causal=causal, query_block=Q)
