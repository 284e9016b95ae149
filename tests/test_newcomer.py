"""What a newcomer meets first: the README's calls and commands work as written, errors name
their fix, long commands say so before they start, and the docs cite only files that exist."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import nsa_dsl
from nsa_dsl.tools import cli
from nsa_dsl.errors import SpecError

torch = pytest.importorskip("torch")

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
TINY = """\
attention tiny {
    branch cmp = compress(block = 8, stride = 4)
    branch slc = select(block = 8, top_k = 2, score = cmp, keep_first = 1, keep_last = 1)
    branch swa = window(size = 8)
    output = gate(sigmoid, cmp, slc, swa)
}
"""


# ------------------------------------------------------------------- source, plan and emit

def test_source_plan_emit_use_the_shapes_of_the_last_call(tmp_path):
    """README: `print(op.source("window_swa"))` after a call, for a spec without shape fields."""
    op = nsa_dsl.compile(nsa_dsl.parse(TINY), cache_dir=tmp_path / "cache")
    with pytest.raises(SpecError) as e:           # nothing bound yet: the hint fits Python and the CLI
        op.source("window_swa")
    assert e.value.code == "E612" and "heads, kv_heads, qk_dim, v_dim" in e.value.message
    assert "op.source(heads=" in e.value.hint and "--heads" in e.value.hint
    T, HQ, H, D = 16, 2, 1, 16
    q, k, v = torch.randn(1, T, HQ, D), torch.randn(1, T, H, D), torch.randn(1, T, H, D)
    op(q, k, v, torch.randn(1, T, HQ, 3))
    src = op.source("window_swa")
    assert "@triton.jit" in src
    plan = op.plan()
    assert (plan.binding.heads, plan.binding.kv_heads, plan.binding.qk_dim, plan.binding.v_dim) == (HQ, H, D, D)
    assert {p.name for p in op.emit(tmp_path / "emit")} >= {"window_swa.py", "plan.txt"}
    assert op.plan(heads=4).binding.heads == 4                   # given shapes still win
    assert op.plan().binding.heads == HQ                         # and do not replace the call's


def test_cli_compile_emit_assumes_the_explain_defaults(tmp_path, monkeypatch, capsys):
    from nsa_dsl.language.cost import DEFAULT_HEAD_DIM, DEFAULT_HEADS, DEFAULT_KV_HEADS
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    out_dir = tmp_path / "emit"
    assert cli.main(["compile", str(EXAMPLES / "nsa_paper_mean.nsa"), "--emit", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    line = next(ln for ln in out.splitlines() if ln.startswith("shapes:"))
    assert (f"heads = {DEFAULT_HEADS}, kv_heads = {DEFAULT_KV_HEADS}, qk_dim = {DEFAULT_HEAD_DIM}, "
            f"v_dim = {DEFAULT_HEAD_DIM} assumed") in line
    assert "--heads N --kv-heads N --qk-dim N --v-dim N" in line and "explain" in line
    assert (out_dir / "window_swa.py").is_file() and (out_dir / "plan.txt").is_file()
    assert err == ""
    # a flag given replaces its default; the line names only what was assumed
    assert cli.main(["compile", str(EXAMPLES / "nsa_paper_mean.nsa"), "--heads", "8", "--kv-heads", "2",
                     "--qk-dim", "64", "--v-dim", "64"]) == 0
    out = capsys.readouterr().out
    assert "shapes:" not in out and "heads=8 kv_heads=2" in out


# ------------------------------------------------------------------------ errors with a fix

def test_train_tiny_lm_window_longer_than_the_task(capsys):
    path = EXAMPLES / "train_tiny_lm.py"
    spec = importlib.util.spec_from_file_location("train_tiny_lm_for_newcomer", path)
    ex = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ex                   # dataclasses look their module up
    spec.loader.exec_module(ex)
    with pytest.raises(SystemExit) as e:
        ex.main(["--spec", str(EXAMPLES / "nsa_paper_mean.nsa"), "--steps", "1"], log=lambda *a: None)
    message = str(e.value.code)
    need = ex.min_seq_len(ex.Config(min_gap=512))
    assert "\n" not in message and f"--seq-len {need}" in message and "window (512 keys)" in message
    cfg = ex.Config(seq_len=need, min_gap=512)    # the length it names is enough, one less is not
    ex.make_batch(cfg, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        ex.make_batch(cfg, 2, torch.Generator().manual_seed(0), seq_len=need - 1)


@pytest.mark.parametrize("bad", [None, 3, ["examples/moba.nsa"]])
def test_compile_a_wrong_type(bad):
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(bad)
    assert e.value.code == "E600" and "a Spec, a .nsa file's path or spec text" in e.value.message
    assert "nsa_dsl.load" in e.value.hint


def test_meta_tensors():
    spec = nsa_dsl.parse(TINY)
    T, HQ, H, D = 16, 2, 1, 16
    q = torch.empty(1, T, HQ, D, device="meta")
    k, v = torch.empty(1, T, H, D, device="meta"), torch.empty(1, T, H, D, device="meta")
    gates = torch.empty(1, T, HQ, 3, device="meta")
    with pytest.raises(SpecError) as e:
        nsa_dsl.compile(spec)(q, k, v, gates)
    assert e.value.code == "E607" and "meta" in e.value.message and "nsa_dsl.reference" in e.value.hint
    o, aux = nsa_dsl.reference(spec, q, k, v, gates, return_aux=True)    # shapes only, no data
    assert o.device.type == "meta" and o.shape == (1, T, HQ, D)
    assert aux.indices["slc"].shape == (1, T, H, 2)


# ---------------------------------------------------------------------------- nsa-dsl show

def test_show_refuses_minutes_of_work(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    show = pytest.importorskip("nsa_dsl.tools.show")
    spec_path = EXAMPLES / "nsa_paper.nsa"
    assert show.estimate(nsa_dsl.load(spec_path), 1 << 20).seconds > show.REFUSE_SECONDS
    out = tmp_path / "x.png"
    assert cli.main(["show", str(spec_path), "--seq-len", "1m", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "E631" in err and "--force" in err and "smaller --seq-len" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2 and not out.exists()      # the error and its hint


def test_show_estimate_grows_and_bounds_a_quick_length():
    show = pytest.importorskip("nsa_dsl.tools.show")
    spec = nsa_dsl.load(EXAMPLES / "nsa_paper_mean.nsa")
    costs = [show.estimate(spec, T).seconds for T in (256, 4096, 65536, 1 << 20)]
    assert costs == sorted(costs) and costs[0] < show.PROGRESS_SECONDS
    quick = show.longest_within(spec, show.WARN_SECONDS)
    assert show.estimate(spec, quick).seconds <= show.WARN_SECONDS < show.estimate(spec, quick + 1).seconds
    static = nsa_dsl.load(EXAMPLES / "sinks.nsa")               # no selection: no reference run
    assert [name for name, _ in show.estimate(static, 4096).phases] == ["masks", "key counts", "picture"]


def test_show_warns_and_draws_a_progress_bar(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    show = pytest.importorskip("nsa_dsl.tools.show")
    monkeypatch.setattr(show, "WARN_SECONDS", 0.0)
    monkeypatch.setattr(show, "PROGRESS_SECONDS", 0.0)
    out = tmp_path / "p.png"
    spec = tmp_path / "tiny.nsa"
    spec.write_text(TINY)
    assert cli.main(["show", str(spec), "--seq-len", "64", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}\n" and out.is_file()
    assert "is about" in captured.err and "smaller --seq-len" in captured.err
    assert "show T=64" in captured.err and "100%" in captured.err and "Traceback" not in captured.err


def test_show_force_runs_past_the_limit(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    show = pytest.importorskip("nsa_dsl.tools.show")
    monkeypatch.setattr(show, "REFUSE_SECONDS", 0.0)
    monkeypatch.setattr(show, "WARN_SECONDS", 1e9)
    monkeypatch.setattr(show, "PROGRESS_SECONDS", 1e9)
    argv = ["show", str(EXAMPLES / "sinks.nsa"), "--seq-len", "64", "--out", str(tmp_path / "f.png")]
    assert cli.main(argv) == 1 and "E631" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0
    assert capsys.readouterr().err == ""


def test_show_help_names_the_default_output(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "show_<NAME>_T<T>.png in the current folder" in text and "--force" in text


# ---------------------------------------------------------------------------------- the docs

MISSING_FILES = ("DESIGN.md", "PERF.md", "NSA_DSL_DEBUG_NAN")
SKIP_DIRS = ("templates", "codegen")         # rewritten elsewhere at the moment


def _doc_files():
    yield ROOT / "README.md"
    for folder, patterns in (("docs", ("*.md",)), ("nsa_dsl", ("*.py", "*.lark")), ("examples", ("*",))):
        for pattern in patterns:
            for path in sorted((ROOT / folder).rglob(pattern)):
                if path.is_file() and not set(path.relative_to(ROOT).parts) & set(SKIP_DIRS) \
                        and "__pycache__" not in path.parts:
                    yield path


def test_docs_cite_only_files_that_exist():
    found = []
    for path in _doc_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in MISSING_FILES:
                if name in line:
                    found.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not found, "\n".join(found)


def test_docs_links_resolve():
    """Every relative Markdown link of README.md and docs/ names a file of the repository."""
    broken = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)    # code is not linked
        for target in re.findall(r"\]\(([^)#\s]+)", prose):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
