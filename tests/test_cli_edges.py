"""The CLI's edges: paths it cannot write, unsupported formats, lengths beyond a command's limit
and odd checkpoint paths end as one-line errors with exit code 1; emitted files never write
through a link."""
import os
from pathlib import Path

import pytest

from nsa_dsl.tools.cli import main

SPEC = str(Path(__file__).resolve().parents[1] / "examples" / "nsa_paper_mean.nsa")


def _run(capsys, args):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("target", ["file", "/dev/null", "/proc/nsa-dsl-x"])
def test_compile_emit_into_something_that_is_not_a_writable_folder(capsys, tmp_path, target):
    if target == "file":
        target = str(tmp_path / "existing.txt")
        Path(target).write_text("")
    code, err = _run(capsys, ["compile", SPEC, "--emit", target])
    assert code == 1 and "error[E640]" in err and "internal error" not in err and "Traceback" not in err


def test_emit_replaces_a_link_instead_of_writing_through_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep me")
    os.symlink(victim, out / "plan.txt")
    code, _ = _run(capsys, ["compile", SPEC, "--emit", str(out)])
    assert code == 0
    assert victim.read_text() == "keep me" and not (out / "plan.txt").is_symlink()
    assert "plan for" in (out / "plan.txt").read_text()


@pytest.mark.parametrize("out,code_", [("x.nsa", "E631"), ("/proc/nsa-dsl/x.png", "E640")])
def test_show_out_errors(capsys, tmp_path, out, code_):
    if not out.startswith("/"):
        out = str(tmp_path / out)
    code, err = _run(capsys, ["show", SPEC, "--seq-len", "64", "--out", out])
    assert code == 1 and f"error[{code_}]" in err and "internal error" not in err


@pytest.mark.parametrize("args,code_", [(["show", SPEC, "--seq-len", "9999999999"], "E631"),
                                        (["demo", "--seq-len", "999999999999"], "E640"),
                                        (["show", SPEC, "--seq-len", "64", "--from-model", "/dev/zero"], "E632")])
def test_lengths_and_checkpoints(capsys, args, code_):
    code, err = _run(capsys, args)
    assert code == 1 and f"error[{code_}]" in err and "internal error" not in err
    if code_ == "E632":
        assert "not a regular file" in err


def test_written_files_get_the_umask_mode_not_a_private_one(tmp_path):
    from nsa_dsl.runtime.files import replace_file
    old = os.umask(0o022)
    try:
        path = replace_file(tmp_path / "k.py", "x = 1\n")
    finally:
        os.umask(old)
    assert path.read_text() == "x = 1\n"
    assert (path.stat().st_mode & 0o777) == 0o644
