"""The ``nsa-dsl`` command line; the only module of nsa-dsl that prints.

    nsa-dsl check FILE...                 parse and check specs (no torch needed)
    nsa-dsl explain FILE                  key counts, costs and the kernel plan
    nsa-dsl compile|demo|bench|show|tune  the heavy commands, in nsa_dsl.tools.commands

Exit codes: 0 ok, 1 a bad spec or a failed command, 2 bad usage, 70 an
internal error (a bug: please report it), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from nsa_dsl import __version__

from nsa_dsl import load_file
from nsa_dsl.errors import SpecError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
DEFAULT_LENGTHS = (4096, 16384, 65536)
TUNE_LENGTHS = (8192, 16384, 32768, 65536)
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
    from nsa_dsl.language.parser import pick_spec
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
    explain = _lazy("nsa_dsl.tools.explain", "explain")
    plan = _lazy("nsa_dsl.codegen.plan", "explain")   # plain data: no torch, no triton
    dims = _lazy("nsa_dsl.language.cost", "explain").Dims.of(spec)
    binding = plan.bind(spec, dims.heads, dims.kv_heads, dims.qk_dim, dims.v_dim)
    try:
        text = plan.lower(spec, binding).describe()
    except SpecError as e:          # a spec the kernels do not run yet: explain the rest
        text = f"no kernels: {e.message} ({e.hint})"
    kernel_plan = explain.Section("kernel plan", "\n".join("  " + line for line in text.splitlines()))
    _out(explain.explain(spec, args.lengths, extra_sections=[kernel_plan], cp=args.cp))
    return EXIT_OK


def _heavy(func_name: str, command: str):
    """A handler that forwards to ``nsa_dsl.tools.commands.<func_name>(args, emit=...)``.

    Those commands import torch and triton, so they load only when run.
    """
    def handler(args) -> int:
        commands = _lazy("nsa_dsl.tools.commands", command)
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


def _positive_ints(text: str) -> tuple[int, ...]:
    """'2,4,8' -> (2, 4, 8)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers, e.g. 4,8")
    return tuple(_positive_int(p) for p in parts)


BENCH_PEERS = ("cudnn", "flash", "fla")   # nsa_dsl.tools.bench.PEERS (kept here: bench imports torch)


def _peer_names(text: str) -> tuple[str, ...]:
    """'cudnn,fla' -> ('cudnn', 'fla'); 'none' -> ()."""
    names = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in BENCH_PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected peers among {','.join(BENCH_PEERS)} or 'none', got {text!r}")
    return names


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
    sp.add_argument("--cp", type=_positive_int, metavar="N",
                    help="context parallelism: bytes communicated and memory held per layer and rank, "
                         "for 1 .. N ranks")
    name_option(sp)

    # --- heavy commands: argparse here, work in nsa_dsl.tools.commands (the lead's module)
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
    sp.add_argument("--lengths", type=_lengths_text, metavar="T,T,...",
                    help="sequence lengths (default 8192,16384,32768,65536; 8k = 8192; 128k and 256k "
                         "run too: SDPA stops at --peer-max-len, an out-of-memory reads 'oom')")
    sp.add_argument("--json", metavar="PATH", help="write the results as JSON (fields: nsa_dsl/bench.py)")
    sp.add_argument("--plot", metavar="PATH",
                    help="write a PNG: time and speedup over cuDNN against T (needs matplotlib)")
    sp.add_argument("--decode", action="store_true",
                    help="time decoding steps over a KV cache (default lengths 4k,16k,64k,128k; batches "
                         "1, 8 and 64 unless --batch)")
    sp.add_argument("--q-len", type=_positive_int, metavar="N",
                    help="with --decode: new tokens per sequence and step (default 1; more: speculative decoding)")
    sp.add_argument("--page-size", type=_positive_int, metavar="P",
                    help="with --decode: positions per page of the paged cache timed beside the contiguous "
                         "one (default 64; a power of two)")
    sp.add_argument("--workload", choices=("random", "local", "both"), default="random",
                    help="inputs: iid random, 'local' (slowly drifting keys, queries following them: "
                         "neighbouring tokens choose similar blocks, as in trained models), or both")
    sp.add_argument("--peers", type=_peer_names, metavar="P,P,...",
                    help=f"what to time beside the op, of {','.join(BENCH_PEERS)} (default: all; "
                         "'none' for none); fla (fla-core's parallel_nsa) only where it imports")
    sp.add_argument("--peer-max-len", type=_positive_int, default=65536, metavar="T",
                    help="skip the SDPA peers above this length (default 65536: SDPA takes minutes at 256k)")
    sp.add_argument("--forward-only", action="store_true", help="time the forward only")
    sp.add_argument("--batch", type=_positive_int, metavar="B",
                    help="batch size (default 1; with --decode: 1, 8 and 64)")
    sp.add_argument("--heads", type=_positive_int, metavar="N",
                    help="query heads (default: the spec's, else 64)")
    sp.add_argument("--kv-heads", type=_positive_ints, metavar="N[,N...]",
                    help="kv heads (default: the spec's, else 4); several compare GQA groups in one "
                         "run, e.g. --heads 32 --kv-heads 2,4,8")
    for dim in ("dim", "qk-dim", "v-dim"):
        sp.add_argument(f"--{dim}", type=_positive_int, metavar="N",
                        help="--dim sets qk-dim and v-dim (default: the spec's, else 128)" if dim == "dim" else None)
    name_option(sp)

    sp = command("show", _heavy("show_cmd", "show"),
                 "draw which keys each query attends, per branch")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--seq-len", type=_positive_int, required=True, metavar="T",
                    help="sequence length (8k = 8192); the work is estimated first: minutes of it are "
                         "refused without --force, tens of seconds warned about, and a progress bar shows")
    sp.add_argument("--out", metavar="PNG",
                    help="where to write the picture (default: show_<NAME>_T<T>.png in the current folder)")
    sp.add_argument("--force", action="store_true",
                    help="run even when the estimated work is past the limit")
    sp.add_argument("--from-model", metavar="CKPT", help="take q and k from a model checkpoint")
    sp.add_argument("--layer", type=int, default=0, help="which attention layer of --from-model")
    name_option(sp)

    sp = command("tune", _heavy("tune_cmd", "tune"), "autotune the kernels of a spec on this GPU")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--lengths", type=_lengths, default=TUNE_LENGTHS, metavar="T,T,...",
                    help=f"sequence lengths to tune for (default {','.join(map(str, TUNE_LENGTHS))}); "
                         "each is a bucket of B*T rounded up to a power of two")
    sp.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size (default 1)")
    for dim in ("heads", "kv-heads", "dim", "qk-dim", "v-dim"):  # shapes the spec leaves open
        sp.add_argument(f"--{dim}", type=_positive_int, metavar="N",
                        help="sets qk-dim and v-dim" if dim == "dim" else None)
    sp.epilog = "shapes the spec leaves open default to 64 heads, 4 kv heads, head dim 128"
    sp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    sp.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                    help="tune the backward kernels too (default: yes)")
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
