"""The ``nsa-dsl`` command line; the only module of nsa-dsl that prints.

    nsa-dsl check FILE...                 parse and check specs (no torch needed)
    nsa-dsl explain FILE                  key counts, costs and the kernel plan
    nsa-dsl compile|demo|bench|show|tune  the heavy commands, in nsa_dsl.commands

Exit codes: 0 ok, 1 a bad spec or a failed command, 2 bad usage, 70 an
internal error (a bug: please report it), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from . import __version__, load_file
from .errors import SpecError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
DEFAULT_LENGTHS = (4096, 16384, 65536)
REPORT_URL = "the nsa-dsl issue tracker"


def _out(text: str = "") -> None:
    print(text, file=sys.stdout)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


class _Unavailable(Exception):
    """A lazily imported part of nsa-dsl (or torch) is not installed."""


def _lazy(module: str, command: str):
    """Import ``module`` when ``command`` runs, so `check` never pays for torch."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise _Unavailable(f"nsa-dsl {command}: not available in this installation "
                               f"({module} is missing)") from None
        if e.name and e.name.split(".")[0] in ("torch", "triton", "matplotlib", "numpy"):
            raise _Unavailable(f"nsa-dsl {command} needs {e.name.split('.')[0]}; "
                               f"install it with: pip install {e.name.split('.')[0]}") from None
        raise


# ----------------------------------------------------------------- commands

def _load_spec(path: str, name: Optional[str]):
    from .parser import pick_spec
    return pick_spec(load_file(path), name)


def _check(args) -> int:
    failed = 0
    for path in args.files:
        try:
            specfile = load_file(path)
        except SpecError as e:
            _err(e.render())
            failed += 1
            continue
        n = len(specfile.specs)
        names = ", ".join(s.name for s in specfile.specs)
        _out(f"{path}: ok ({n} attention block{'' if n == 1 else 's'}: {names})")
    return EXIT_ERROR if failed else EXIT_OK


def _explain(args) -> int:
    spec = _load_spec(args.file, args.name)
    explain = _lazy("nsa_dsl.explain", "explain")
    plan = _lazy("codegen.plan", "explain")   # plain data: no torch, no triton
    dims = _lazy("nsa_dsl.shapes", "explain").Dims.of(spec)
    binding = plan.bind(spec, dims.heads, dims.kv_heads, dims.qk_dim, dims.v_dim)
    kernel_plan = explain.Section(
        "kernel plan", "\n".join("  " + line for line in plan.lower(spec, binding).describe().splitlines()))
    _out(explain.explain(spec, args.lengths, extra_sections=[kernel_plan]))
    return EXIT_OK


def _heavy(func_name: str, command: str):
    """A handler that forwards to ``nsa_dsl.commands.<func_name>(args, emit=...)``.

    Those commands import torch and triton, so they load only when run.
    """
    def handler(args) -> int:
        commands = _lazy("nsa_dsl.commands", command)
        code = getattr(commands, func_name)(args, emit=_out)
        return EXIT_OK if code is None else int(code)
    return handler


# ------------------------------------------------------------ argument types

def _positive_int(text: str) -> int:
    value = _size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _size(text: str) -> int:
    """'4096', '8k' (x1024) or '1m' (x1024**2)."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 ** 2}.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not digits.isdigit() or len(digits) > 12:
        raise argparse.ArgumentTypeError(f"expected an integer such as 4096 or 8k, got {text!r}")
    return int(digits) * scale


def _lengths(text: str) -> tuple[int, ...]:
    """'4096,16k,65536' -> (4096, 16384, 65536)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated lengths, e.g. 4096,16384")
    return tuple(_positive_int(p) for p in parts)


def _lengths_text(text: str) -> str:
    """Validated lengths, handed on as the text '4096,16384' (bench splits it itself)."""
    return ",".join(str(n) for n in _lengths(text))


# ------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nsa-dsl",
        description="A compiler for sparse attention: check a spec, explain it, "
                    "compile it to Triton kernels, run and benchmark them.",
        epilog="examples:\n  nsa-dsl check examples/nsa_paper.nsa\n"
               "  nsa-dsl explain examples/nsa_paper.nsa --lengths 8k,64k\n  nsa-dsl demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"nsa-dsl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    def name_option(sp):
        sp.add_argument("--name", metavar="NAME",
                        help="the attention block to use when the file declares several")

    sp = command("check", _check, "parse and check spec files")
    sp.add_argument("files", nargs="+", metavar="FILE")

    sp = command("explain", _explain,
                 "keys per query, FLOPs and bytes against dense attention, and the kernel plan")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--lengths", type=_lengths, default=DEFAULT_LENGTHS, metavar="T,T,...",
                    help=f"sequence lengths (default {','.join(map(str, DEFAULT_LENGTHS))}; 8k = 8192)")
    name_option(sp)

    # --- heavy commands: argparse here, work in nsa_dsl.commands (the lead's module)
    sp = command("compile", _heavy("compile_cmd", "compile"),
                 "generate, cache and load the kernels of a spec")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--emit", metavar="DIR", help="write the rendered kernels and the plan to DIR")
    name_option(sp)
    for dim in ("heads", "kv-heads", "qk-dim", "v-dim"):  # bind shapes the spec leaves open
        sp.add_argument(f"--{dim}", type=_positive_int, metavar="N")

    sp = command("demo", _heavy("demo_cmd", "demo"),
                 "compile a spec (the packaged NSA one by default), run it, compare with the reference")
    sp.add_argument("file", nargs="?", metavar="FILE")
    sp.add_argument("--device", choices=("cpu", "cuda"),
                    help="cuda when a GPU is present, else cpu (Triton's interpreter)")
    sp.add_argument("--seq-len", type=_positive_int, metavar="T")
    name_option(sp)

    sp = command("bench", _heavy("bench_cmd", "bench"),
                 "time the kernels against dense attention (GPU)")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--lengths", type=_lengths_text, metavar="T,T,...", help="sequence lengths")
    sp.add_argument("--json", metavar="PATH", help="write the results as JSON")
    sp.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    sp.add_argument("--decode", action="store_true", help="time decoding (one new token per sequence)")
    name_option(sp)

    sp = command("show", _heavy("show_cmd", "show"),
                 "draw which keys each query attends, per branch")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--seq-len", type=_positive_int, required=True, metavar="T")
    sp.add_argument("--out", metavar="PNG", help="where to write the picture")
    sp.add_argument("--from-model", metavar="CKPT", help="take q and k from a model checkpoint")
    sp.add_argument("--layer", type=int, default=0, help="which attention layer of --from-model")
    name_option(sp)

    sp = command("tune", _heavy("tune_cmd", "tune"), "autotune the kernels of a spec on this GPU")
    sp.add_argument("file", metavar="FILE")
    name_option(sp)
    return p


# --------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except SpecError as e:
        _err(e.render())
        return EXIT_ERROR
    except _Unavailable as e:
        _err(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("nsa-dsl: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `nsa-dsl ... | head`: stop quietly
        try:  # keep Python's exit-time flush from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except Exception as e:  # a bug in nsa-dsl, not in the user's spec
        if os.environ.get("NSA_DSL_DEBUG") == "1":
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        _err(f"nsa-dsl: internal error: {type(e).__name__}: {first} "
             f"(please report it to {REPORT_URL} with the spec and the command; "
             f"NSA_DSL_DEBUG=1 shows the traceback)")
        return EXIT_INTERNAL
