"""The command line: `check`, `explain`, the frame of the heavy commands, exit codes."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

from nsa_dsl.tools import cli

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.nsa"))
GOOD = "attention a { branch w = window(size = 8) output = w }\n"


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.nsa"
    p.write_text(GOOD)
    return p


@pytest.fixture
def bad(tmp_path):
    p = tmp_path / "bad.nsa"
    p.write_text("attention a {\n    branch w = window(size = 0)\n    output = w\n}\n")
    return p


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "nsa_dsl", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


# ------------------------------------------------------------------- check

def test_check_examples(capsys):
    assert cli.main(["check", *map(str, EXAMPLES)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == len(EXAMPLES)
    assert f"{ROOT / 'examples' / 'multi.nsa'}: ok (2 attention blocks: short_ctx, long_ctx)" in lines
    assert f"{ROOT / 'examples' / 'sinks.nsa'}: ok (1 attention block: sinks)" in lines


def test_check_reports_every_file(good, bad, capsys):
    assert cli.main(["check", str(bad), str(good), str(bad.with_name("missing.nsa"))]) == 1
    out, err = capsys.readouterr()
    assert out == f"{good}: ok (1 attention block: a)\n"
    assert f"{bad}:2:30: error[E203]: size must be positive, got 0" in err
    assert "                             ^" in err
    assert "error[E105]: cannot read" in err and "missing.nsa" in err
    assert "Traceback" not in err


def test_python_m_nsa_dsl(good, bad):
    r = run_module("check", good)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"{good}: ok (1 attention block: a)\n"
    r = run_module("check", bad)
    assert r.returncode == 1 and r.stdout == ""
    assert "error[E203]" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, code", [([], 2), (["frobnicate"], 2), (["check"], 2),
                                        (["--version"], 0), (["--help"], 0), (["check", "--help"], 0)])
def test_usage(argv, code, capsys):
    assert cli.main(argv) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 2:
        assert "usage: nsa-dsl" in err


def test_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("check", "explain", "compile", "demo", "bench", "show", "tune"):
        assert command in out


# ----------------------------------------------------------------- explain

@pytest.fixture
def fake_explain(monkeypatch):
    import nsa_dsl.tools.explain as real_explain
    calls = []
    mod = types.ModuleType("nsa_dsl.tools.explain")

    def explain(spec, lengths, extra_sections=(), cp=None):
        calls.append((spec, lengths))
        assert [s.title for s in extra_sections] == ["kernel plan"]
        return f"explained {spec.name} at {lengths}"
    mod.explain = explain
    mod.Section = real_explain.Section
    monkeypatch.setitem(sys.modules, "nsa_dsl.tools.explain", mod)
    return calls


def test_explain_calls_the_explainer(good, fake_explain, capsys):
    assert cli.main(["explain", str(good)]) == 0
    assert capsys.readouterr().out == f"explained a at {cli.DEFAULT_LENGTHS}\n"
    assert cli.main(["explain", str(ROOT / "examples" / "multi.nsa"), "--name", "long_ctx",
                     "--lengths", "8k, 65536,1m"]) == 0
    spec, lengths = fake_explain[-1]
    assert spec.name == "long_ctx" and lengths == (8192, 65536, 1 << 20)


def test_explain_needs_a_name_for_several_blocks(fake_explain, capsys):
    assert cli.main(["explain", str(ROOT / "examples" / "multi.nsa")]) == 1
    err = capsys.readouterr().err
    assert "error[E110]" in err and "short_ctx, long_ctx" in err and "--name" in err
    assert not fake_explain
    assert cli.main(["explain", str(ROOT / "examples" / "multi.nsa"), "--name", "long"]) == 1
    assert "error[E111]" in capsys.readouterr().err


@pytest.mark.parametrize("lengths", ["", "0", "-5", "abc", "4096,x", "1.5k"])
def test_explain_bad_lengths(good, lengths, fake_explain, capsys):
    assert cli.main(["explain", str(good), "--lengths", lengths]) == 2
    assert "usage:" in capsys.readouterr().err
    assert not fake_explain


def test_explain_reports_a_bad_spec(bad, fake_explain, capsys):
    assert cli.main(["explain", str(bad)]) == 1
    assert "error[E203]" in capsys.readouterr().err


def test_explain_without_the_module(good, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nsa_dsl.tools.explain", None)  # import raises ModuleNotFoundError
    assert cli.main(["explain", str(good)]) == 1
    err = capsys.readouterr().err
    assert "not available" in err and "Traceback" not in err


def test_explain_for_real(capsys):
    pytest.importorskip("nsa_dsl.tools.explain")
    assert cli.main(["explain", str(ROOT / "examples" / "nsa_paper_mean.nsa")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "Traceback" not in err


# ----------------------------------------------------- the heavy commands

@pytest.fixture
def fake_commands(monkeypatch):
    calls = {}
    mod = types.ModuleType("nsa_dsl.tools.commands")
    for name in ("compile_cmd", "demo_cmd", "bench_cmd", "show_cmd", "tune_cmd"):
        def cmd(args, emit=print, _name=name):
            calls[_name] = args
            emit(f"ran {_name}")
            return getattr(args, "fake_rc", 0)
        setattr(mod, name, cmd)
    monkeypatch.setitem(sys.modules, "nsa_dsl.tools.commands", mod)
    return calls


@pytest.mark.parametrize("argv, func, expect", [
    (["compile", "s.nsa"], "compile_cmd", dict(file="s.nsa", emit=None, name=None, heads=None)),
    (["compile", "s.nsa", "--emit", "out", "--name", "x", "--heads", "8", "--kv-heads", "2",
      "--qk-dim", "64", "--v-dim", "32"], "compile_cmd",
     dict(file="s.nsa", emit="out", name="x", heads=8, kv_heads=2, qk_dim=64, v_dim=32)),
    (["demo"], "demo_cmd", dict(file=None, device=None, seq_len=None)),
    (["demo", "s.nsa", "--device", "cpu", "--seq-len", "160"], "demo_cmd",
     dict(file="s.nsa", device="cpu", seq_len=160)),
    (["bench", "s.nsa"], "bench_cmd", dict(file="s.nsa", lengths=None, json=None, plot=None, decode=False)),
    (["bench", "s.nsa", "--lengths", "8k,16384", "--json", "r.json", "--plot", "r.png", "--decode"],
     "bench_cmd", dict(lengths="8192,16384", json="r.json", plot="r.png", decode=True)),
    (["bench", "s.nsa", "--decode", "--q-len", "4", "--batch", "8", "--kv-heads", "2,4"], "bench_cmd",
     dict(decode=True, q_len=4, batch=8, kv_heads=(2, 4))),
    (["show", "s.nsa", "--seq-len", "256", "--out", "p.png", "--from-model", "ckpt.pt"], "show_cmd",
     dict(file="s.nsa", seq_len=256, out="p.png", from_model="ckpt.pt")),
    (["tune", "s.nsa"], "tune_cmd", dict(file="s.nsa", name=None)),
])
def test_heavy_commands_forward_their_arguments(argv, func, expect, fake_commands, capsys):
    assert cli.main(argv) == 0
    args = fake_commands[func]
    for key, value in expect.items():
        assert getattr(args, key) == value, key
    assert capsys.readouterr().out == f"ran {func}\n"


@pytest.mark.parametrize("argv", [["show", "s.nsa"], ["demo", "--device", "tpu"],
                                  ["demo", "--seq-len", "0"], ["bench", "s.nsa", "--lengths", "x"]])
def test_heavy_commands_usage_errors(argv, fake_commands, capsys):
    assert cli.main(argv) == 2
    assert not fake_commands


def test_command_exit_code_passes_through(fake_commands, monkeypatch):
    mod = sys.modules["nsa_dsl.tools.commands"]
    monkeypatch.setattr(mod, "tune_cmd", lambda args, emit=print: 3)
    assert cli.main(["tune", "s.nsa"]) == 3
    monkeypatch.setattr(mod, "tune_cmd", lambda args, emit=print: None)
    assert cli.main(["tune", "s.nsa"]) == 0


def test_spec_error_from_a_command(fake_commands, monkeypatch, capsys):
    from nsa_dsl.errors import SpecError

    def fail(args, emit=print):
        raise SpecError("E601", "q has 3 dims, expected 4", hint="pass q as [B, T, HQ, D]")
    monkeypatch.setattr(sys.modules["nsa_dsl.tools.commands"], "demo_cmd", fail)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err == "error[E601]: q has 3 dims, expected 4\n    hint: pass q as [B, T, HQ, D]\n"


def test_internal_error_is_one_line(fake_commands, monkeypatch, capsys):
    def boom(args, emit=print):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(sys.modules["nsa_dsl.tools.commands"], "compile_cmd", boom)
    monkeypatch.delenv("NSA_DSL_DEBUG", raising=False)
    assert cli.main(["compile", "s.nsa"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "internal error: RuntimeError: boom" in err and "report" in err and "NSA_DSL_DEBUG=1" in err
    assert "second line" not in err and "Traceback" not in err
    monkeypatch.setenv("NSA_DSL_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["compile", "s.nsa"])


def test_keyboard_interrupt(fake_commands, monkeypatch, capsys):
    def interrupted(args, emit=print):
        raise KeyboardInterrupt
    monkeypatch.setattr(sys.modules["nsa_dsl.tools.commands"], "bench_cmd", interrupted)
    assert cli.main(["bench", "s.nsa"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_missing_commands_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nsa_dsl.tools.commands", None)
    assert cli.main(["tune", "s.nsa"]) == 1
    err = capsys.readouterr().err
    assert "nsa-dsl tune: not available" in err and "Traceback" not in err


def test_missing_torch_is_explained(monkeypatch, capsys):
    real_import = cli.importlib.import_module

    def import_module(name, *a):
        if name == "nsa_dsl.tools.commands":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real_import(name, *a)
    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    assert cli.main(["compile", "s.nsa"]) == 1
    assert "nsa-dsl compile needs torch" in capsys.readouterr().err


def test_demo_runs_end_to_end(capsys, tmp_path, monkeypatch):
    """README's main job: `nsa-dsl demo` compiles the paper pattern and checks it (interpreter on CPU)."""
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "result    OK" in out and "rows choose the same blocks" in out
    # the shapes it ran, and that they are not the ones the packaged spec declares
    assert "inputs    B=1 T=160 HQ=16 H=1 Dqk=64 Dv=32 float32" in out
    assert ("the spec declares heads=64, kv_heads=4, qk_dim=192, v_dim=128; this CPU run uses "
            "heads=16, kv_heads=1, qk_dim=64, v_dim=32") in out
    # its pointer to the generated source is a command that works as printed
    source = next(line for line in out.splitlines() if line.startswith("source"))
    assert "op.source('all') prints" not in source
    command = source.split("`")[1].replace("DIR", str(tmp_path / "emit")).split()
    assert command[0] == "nsa-dsl" and cli.main(command[1:]) == 0
    assert (tmp_path / "emit" / "plan.txt").is_file() and (tmp_path / "emit" / "window_swa.py").is_file()


def test_bench_decode_cases_and_json(tmp_path, monkeypatch):
    """`bench --decode`: one decode_bench case per (kv heads, length, batch), the options' shapes
    (the spec's declared ones dropped), q_len through; the JSON carries the run's meta."""
    import json
    import types

    import torch

    import nsa_dsl
    import nsa_dsl.runtime.decoding
    from nsa_dsl.tools import commands
    calls = []

    def fake_bench(spec, lengths, batches, **kw):
        calls.append((spec.heads, tuple(lengths), tuple(batches), kw["HQ"], kw["H"], kw["Dqk"], kw["q_len"]))
        return [dict(B=batches[0], T=lengths[0], H=kw["H"], nsa_kernel_ms=0.5, nsa_graph_ms=0.25, speedup=2.0,
                     speedup_graph=4.0)]
    from nsa_dsl.tools import decode_bench
    monkeypatch.setattr(decode_bench, "decode_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a stand-in GPU")
    spec = nsa_dsl.load(Path(__file__).resolve().parents[1] / "examples" / "nsa_paper_mean.nsa")
    args = types.SimpleNamespace(file="x.nsa", lengths="4096,8192", batch=None, q_len=3, heads=32,
                                 kv_heads=(4, 8), dim=64, json=str(tmp_path / "d.json"), plot=None)
    lines = []
    assert commands._bench_decode(spec, args, lines.append) == 0
    assert len(calls) == 2 * 2 * 3 and {c[2] for c in calls} == {(1,), (8,), (64,)}
    assert all(c[0] is None and c[3] == 32 and c[5] == 64 and c[6] == 3 for c in calls)
    assert {c[4] for c in calls} == {4, 8}
    out = json.loads((tmp_path / "d.json").read_text())
    assert out["meta"]["q_len"] == 3 and out["meta"]["kv_heads"] == [4, 8] and len(out["rows"]) == 12
    assert any("speedup_graph" in line for line in lines)
