"""One table of error codes: every code raised anywhere is in nsa_dsl.errors.CODES, every code
in the table is raised somewhere, and docs/LANGUAGE.md lists exactly the table."""
import re
from pathlib import Path

from nsa_dsl.errors import CODES

ROOT = Path(__file__).resolve().parents[1]
RAISED = re.compile(r"""(?:SpecError|_err)\(\s*["'](E\d{3})["']|["'](E\d{3})["']\s*(?:if|,\s*f?["'])""")


def _sources():
    for folder in ("nsa_dsl", "codegen", "examples"):
        yield from (ROOT / folder).rglob("*.py")


def _raised() -> dict:
    found = {}
    for path in _sources():
        for m in RAISED.finditer(path.read_text()):
            found.setdefault(m.group(1) or m.group(2), path.relative_to(ROOT))
    return found


def test_every_raised_code_is_in_the_table():
    missing = {c: str(p) for c, p in _raised().items() if c not in CODES}
    assert not missing, f"codes raised but not in nsa_dsl.errors.CODES: {missing}"


def test_every_code_in_the_table_is_raised():
    text = "\n".join(p.read_text() for p in _sources())
    unused = [c for c in CODES if f'"{c}"' not in text]
    assert not unused, f"codes in the table that nothing raises: {unused}"


def test_language_md_lists_exactly_the_table():
    doc = (ROOT / "docs" / "LANGUAGE.md").read_text()
    rows = dict(re.findall(r"^\| (E\d{3}) \| (.*) \|$", doc, flags=re.M))
    assert set(rows) == set(CODES), (sorted(set(CODES) - set(rows)), sorted(set(rows) - set(CODES)))
    wrong = {c: (rows[c], m) for c, m in CODES.items() if rows[c] != m}
    assert not wrong, wrong
