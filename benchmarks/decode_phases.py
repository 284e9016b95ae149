"""Where a decode step's time goes, program by program (GPU; `--check` compiles on a CPU).

Takes the generated decode source of a spec, patches `globaltimer()` stores in at phase
boundaries of one kernel, and replays decoding steps (``nsa_dsl.decode.decode_bench``) with the
patched module. The stamps go to an int64 buffer passed where the launcher passes its dummy
index pointer (no aux outputs are requested); 16 slots per program, slot 15 its SM.

    python benchmarks/decode_phases.py OUT.json [--spec FILE] [--kernel decode_kernel|decode_split_kernel]
    python benchmarks/decode_phases.py --check        # compile the patched kernel for sm_90, ptxas -v

Phases of ``decode_kernel`` (ONEPASS): compression with fused scores, score gather, extraction
and block list, selection loop, selected branch's finish, window and store. Of
``decode_split_kernel`` (one slice with the combining tail, pinned ``TAIL``): compression, window,
ticket, merge, top-k, selection, window merge and store. Prints per case the median and maximum
of each phase over programs (microseconds) and writes them, with the raw stamps, as JSON.
The stamps order issue, not completion, of the memory operations around them; phases that
stream keys are timed well, single loads are not.
"""
import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import nsa_dsl  # noqa: E402
from nsa_dsl.decode import DecodeOp, decode_bench  # noqa: E402

SHAPES = (64, 4, 128, 128)       # HQ, H, Dqk, Dv
MARKS = {   # the source lines (stripped) that open each phase after the first, in order
    "decode_kernel": ["# ---- selection", "m_elig =", "# attention over the chosen blocks", "if AUX:",
                      "# w0: window attention", "tl.store(o + o_row"],
    "decode_split_kernel": ["# w0: window attention", "if TAIL:", "FLOOR: tl.constexpr", "# ---- selection",
                            "# attention over the chosen blocks", "if AUX:", "tl.store(o + o_row"],
}
AFTER = {"FLOOR: tl.constexpr"}  # stamped after the marked line (the tail's entry), the rest before
CASES = {"decode_kernel": [(64, 65536, None), (64, 131072, None), (8, 65536, {"ONEPASS": True}),
                           (1, 65536, {"ONEPASS": True})],
         "decode_split_kernel": [(64, 65536, {"NS": 1, "SPLIT": True, "TAIL": True}),
                                 (8, 65536, {"TAIL": True}), (1, 65536, {"TAIL": True})]}


def patch(src: str, kernel: str) -> tuple[str, int]:
    """The source with stamps in `kernel`; returns (source, number of phases)."""
    lines = src.split("\n")
    a = next(i for i, line in enumerate(lines) if line.startswith(f"def {kernel}("))
    b = next((i for i, line in enumerate(lines) if line.startswith("def ") and i > a), len(lines))
    marks, out, k, started = MARKS[kernel], [], 0, False
    stamp = "tl.store(PP + {}, tl.extra.cuda.globaltimer())"
    for i, line in enumerate(lines):
        s, ind = line.strip(), " " * (len(line) - len(line.lstrip()))
        inside = a < i < b and started and k < len(marks)
        if inside and s.startswith(marks[k]) and marks[k] not in AFTER:
            k += 1
            out.append(ind + stamp.format(k))
        out.append(line)
        if inside and k < len(marks) and s.startswith(marks[k]) and marks[k] in AFTER:
            k += 1
            out.append(ind + stamp.format(k))
        if a < i < b and not started and s.startswith("b_q = tl.load(p_q"):
            out += [ind + "PP = idx0.to(tl.pointer_type(tl.int64)) + ((tl.program_id(0) * tl.num_programs(1)"
                          " + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * 16",
                    ind + stamp.format(0), ind + "tl.store(PP + 15, tl.extra.cuda.smid().to(tl.int64))"]
            started = True
    assert k == len(marks), f"{kernel}: found {k} of {len(marks)} phase marks; the template changed"
    src = "\n".join(out).replace("import triton.language as tl\n",
                                 "import triton.language as tl\nimport triton.language.extra.cuda\n", 1)
    dummy = "    dummy = torch.empty(1, dtype=torch.float32, device=q.device)"
    assert dummy in src
    src = src.replace(dummy, "    dummy = PROF if PROF is not None else torch.empty(1, dtype=torch.float32, device=q.device)")
    return src + "\nPROF = None\n", len(marks)


def load(src: str):
    path = Path(tempfile.mkdtemp()) / "decode_phases_kernels.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(args) -> None:
    op = DecodeOp(nsa_dsl.load(args.spec))
    src, n = patch(op.source(*SHAPES), args.kernel)
    mod = load(src)
    op._modules[SHAPES] = mod        # the op launches the patched kernels
    result = {}
    for B, T, cfg in CASES[args.kernel]:
        mod.CONFIG = cfg
        mod.PROF = torch.zeros(B * SHAPES[1] * 64 * 16, dtype=torch.int64, device="cuda")
        row = decode_bench(op, (T,), (B,), HQ=SHAPES[0], H=SHAPES[1], Dqk=SHAPES[2], Dv=SHAPES[3],
                           peers=(), cuda_graph=True)[0]
        p = mod.PROF.view(-1, 16).cpu()
        p = p[(p[:, 0] > 0) & (p[:, n] > 0)]            # programs that ran every phase (the tail's slice)
        rel = (p[:, :n + 1] - p[:, 0].min()).double() / 1000.0
        summary = {"B": B, "T": T, "config": str(cfg), "programs": len(p), "sms": int(p[:, 15].unique().numel()),
                   "graph_ms": round(row.get("nsa_graph_ms", float("nan")), 4), "span_us": round(float(rel.max()), 1)}
        for i in range(1, n + 1):
            d = rel[:, i] - rel[:, i - 1]
            summary[f"phase{i}_us"] = (round(float(d.median()), 1), round(float(d.max()), 1))
        print(summary, flush=True)
        result[f"B{B}-T{T}-{cfg}"] = {"summary": summary, "stamps": p.tolist()}
    Path(args.out).write_text(json.dumps(result))


def check(args) -> None:
    from codegen.sm90 import compile_decode, ptxas_usage
    op = DecodeOp(nsa_dsl.load(args.spec))
    mod = load(patch(op.source(*SHAPES), args.kernel)[0])
    c = dict(G=16, GP=16, R=1, BM=16, BN=32, BJ=16, DQK=128, DV=128, BK=128, BV=128, NP=mod.NP, LOWP=True,
             TAIL=True, AUX=False, BJM=64, NJ=1024, SPLIT=False, ONEPASS=True)
    kernel = compile_decode(getattr(mod, args.kernel), c, num_warps=4, num_stages=3)
    print(f"{args.kernel}: shared {kernel.metadata.shared} B; {ptxas_usage(kernel)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="decode_phases.json")
    ap.add_argument("--spec", default=str(ROOT / "examples" / "nsa_paper_mean.nsa"))
    ap.add_argument("--kernel", default="decode_kernel", choices=sorted(MARKS))
    ap.add_argument("--check", action="store_true", help="compile the patched kernel for sm_90 (no GPU needed)")
    a = ap.parse_args()
    check(a) if a.check else run(a)
