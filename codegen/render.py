"""Render kernel templates with jinja2 (StrictUndefined: a missing variable is a bug, not a blank)."""
from __future__ import annotations

import functools
from pathlib import Path

import jinja2


def templates_dir() -> Path:
    """The kernel templates: the package data of ``nsa_dsl.templates`` (the source tree's
    templates/ folder in an editable install)."""
    from importlib.resources import files
    return Path(str(files("nsa_dsl.templates")))


def visible_cmp(t: str, L: int, STRIDE: int) -> str:
    """Triton code for the number of compressed blocks visible to query ``t`` (a variable name).

    The expression comes from the symbolic shapes module, simplified for this (L, STRIDE)
    (``l == d`` gives ``(t + 1) // L``), so kernels and ``nsa-dsl explain`` share one derivation.
    """
    from nsa_dsl.language import shapes, symbolic
    if not (isinstance(t, str) and t.isidentifier()):
        raise ValueError(f"visible_cmp needs a variable name, got {t!r}")
    return symbolic.render(shapes.compress_visible(symbolic.t, int(L), int(STRIDE)), "triton", {"t": t})


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.globals["visible_cmp"] = visible_cmp   # symbolic index arithmetic, rendered as code
    return env


def template_source(name: str) -> str:
    return (templates_dir() / name).read_text()


def render(name: str, **variables) -> str:
    """Render ``templates/<name>`` (e.g. ``"window.py.j2"``) with validated variables."""
    return environment().get_template(name).render(**variables)
