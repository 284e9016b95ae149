"""The house's rules, checked: templates hold device code only, the wheel installs one import
name, and the front end starts without torch."""
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import nsa_dsl
from nsa_dsl.codegen.cache import render_plan
from nsa_dsl.codegen.plan import bind, lower, lower_decode

ROOT = Path(__file__).resolve().parents[1]


def _jit(node) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def _rendered_modules():
    for path in sorted((ROOT / "examples").glob("*.nsa")):
        for spec in nsa_dsl.load_file(path).specs:
            binding = bind(spec, spec.heads or 12, spec.kv_heads or 4, spec.qk_dim or 48, spec.v_dim or 32)
            plans = [lower(spec, binding), lower(spec, binding, varlen=True), lower(spec, binding, offsets=True)]
            if spec.causal and not spec.of_kind("indexer"):
                plans.append(lower_decode(spec, binding))
            for plan in plans:
                yield from ((f"{path.name}:{name}", src) for name, src in render_plan(plan).items())


def test_every_def_in_a_rendered_template_is_a_triton_kernel():
    """Templates keep device code only: the launchers, configs and planning live in
    nsa_dsl.codegen (plain Python)."""
    bad = []
    for where, src in _rendered_modules():
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not (
                    isinstance(node, ast.FunctionDef) and _jit(node)):
                bad.append(f"{where}: {node.name}")
        imports = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        bad += [f"{where}: {i}" for i in imports if i not in ("import triton", "import triton.language as tl")]
    assert not bad, bad


def test_templates_import_only_the_shared_device_macros():
    for path in (ROOT / "templates").glob("*.j2"):
        text = path.read_text()
        assert "{% include" not in text, path.name
        for line in text.splitlines():
            if "{% import" in line or "{%- import" in line:
                assert '"_device.py.j2"' in line, (path.name, line)


def test_the_wheel_installs_one_import_name(tmp_path):
    """A wheel built from the tree holds nsa_dsl only (codegen, templates and examples under it)."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {out.stderr[-300:]}")
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"nsa_dsl"}, top
    for need in ("nsa_dsl/codegen/plan.py", "nsa_dsl/codegen/launch/window.py", "nsa_dsl/templates/window.py.j2",
                 "nsa_dsl/templates/_device.py.j2", "nsa_dsl/language/grammar.lark", "nsa_dsl/examples/nsa_paper.nsa"):
        assert need in names, need


def test_the_front_end_imports_no_torch():
    code = ("import sys, nsa_dsl; s = nsa_dsl.parse('attention a { branch w = window(size = 4) output = w }'); "
            "import nsa_dsl.language.cost, nsa_dsl.tools.explain, nsa_dsl.codegen.plan; "
            "print('torch' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stdout + out.stderr
