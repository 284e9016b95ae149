"""examples/train_tiny_lm.py: a few steps on the CPU (the reference attention), its output, its
checkpoint, and the DDP / FSDP2 paths in a one-process gloo group."""
import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import nsa_dsl  # noqa: E402

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "examples" / "train_tiny_lm.py"
FAST = ["--device", "cpu", "--steps", "12", "--batch", "8", "--seq-len", "128", "--log-every", "4",
        "--eval-batches", "1"]
STEP_LINE = re.compile(r"^step (\d+) loss (\d+\.\d+) acc (\d\.\d{3})(?: pairs \d+)? \(\d+\.\d s\)$")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("train_tiny_lm_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                     # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def run(ex, argv):
    lines = []
    results = ex.main(argv, log=lines.append)
    return results, lines


def step_losses(lines):
    return [(int(m.group(1)), float(m.group(2))) for m in map(STEP_LINE.match, lines) if m]


def test_task_batches(ex):
    cfg = ex.Config(seq_len=128, min_gap=32)
    tokens, targets = ex.make_batch(cfg, 4, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (4, 128)
    assert tokens.min() >= 1 and tokens.max() < cfg.vocab
    tail = 1 + 2 * cfg.queries
    for b in range(4):
        row = tokens[b].tolist()
        assert row[128 - tail] == ex.SEP
        answers = (targets[b] >= 0).nonzero().flatten().tolist()
        assert answers == list(range(128 - tail + 1, 128, 2))
        for t in answers:
            key, value = row[t], int(targets[b, t])
            assert cfg.key0 <= key < cfg.value0 <= value < cfg.filler0 and row[t + 1] == value
            (p,) = [p for p in range(128 - tail) if row[p] == key]       # the key occurs once before
            assert row[p + 1] == value and t - p > cfg.min_gap           # beyond the window
    with pytest.raises(ValueError, match="too short"):
        ex.make_batch(cfg, 1, torch.Generator(), seq_len=40)


def test_train_compare_and_checkpoint(ex, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    threads = torch.get_num_threads()
    results, lines = run(ex, FAST + ["--compare", "--save", str(ckpt)])
    assert torch.get_num_threads() == threads                     # restored
    assert set(results) == {"nsa", "sdpa"}

    # two runs of "step N loss X" lines, at steps 1, 4, 8, 12, with the loss falling
    losses = step_losses(lines)
    assert [s for s, _ in losses] == [1, 4, 8, 12] * 2
    for run_losses in (losses[:4], losses[4:]):
        assert run_losses[-1][1] < run_losses[0][1] - 0.3, run_losses
    assert [r for r, _ in results["nsa"]["losses"]] == [1, 4, 8, 12]
    text = "\n".join(lines)
    assert re.search(r"^nsa: final accuracy 0\.\d{4} \(64 answers of 8 held-out sequences\)", text, re.M)
    assert re.search(r"^sdpa: final accuracy 0\.\d{4} ", text, re.M)
    assert re.search(r"^compare: accuracy nsa 0\.\d{4} vs sdpa 0\.\d{4}", text, re.M)
    assert "throughput" not in text                                  # CUDA only
    assert 0.0 <= results["nsa"]["accuracy"] <= 1.0

    # the checkpoint reloads into the same model, and its spec file sits beside it
    model, meta = ex.load_checkpoint(str(ckpt))
    assert meta["attn"] == "nsa" and meta["steps"] == 12
    assert nsa_dsl.load(tmp_path / "tiny.nsa") == model.spec
    assert any(isinstance(m, nsa_dsl.SparseAttention) for m in model.modules())
    trained = results["nsa"]["model"].eval()
    tokens, _ = ex.make_batch(model.cfg, 2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), trained(tokens))
        _, auxes = model(tokens, return_aux=True)
    assert len(auxes) == 2 and auxes[0].indices["slc"].shape == (2, 128, 1, 4)


def test_throughput_probe_runs_on_any_device(ex):
    """The tokens/s probe the script runs against SDPA on CUDA; here on the CPU."""
    spec = nsa_dsl.parse(ex.TINY_SPEC)
    cfg = ex.Config(seq_len=64, layers=1, hidden=32, heads=2, kv_heads=1, pairs=2, queries=2, min_gap=32)
    for attn in ("nsa", "sdpa"):
        assert ex._throughput(cfg, spec, attn, 2, torch.device("cpu"), steps=1) > 0


def test_max_time_log_json_and_curriculum(ex, tmp_path):
    """--max-time stops training (then evaluates as usual), --log-json writes the curve and the
    summary, --curriculum ramps the pairs per sequence up to --pairs."""
    import json
    out = tmp_path / "log.json"
    results, lines = run(ex, FAST + ["--max-time", "0", "--log-json", str(out)])
    r = results["nsa"]
    assert r["steps"] == 1 and [s for s, _ in r["losses"]] == [1]
    assert any(line == "--max-time 0 s reached after 1 of 12 steps" for line in lines)
    assert re.search(r"^nsa: final accuracy 0\.\d{4} \(64 answers of 8 held-out sequences\).*\(1 steps\)$",
                     "\n".join(lines), re.M)
    doc = json.loads(out.read_text())
    assert doc["format"] == "nsa-dsl/train_tiny_lm/log" and set(doc["runs"]) == {"nsa"}
    run_doc = doc["runs"]["nsa"]
    assert run_doc["steps"] == 1 and run_doc["accuracy"] == pytest.approx(r["accuracy"])
    assert [p["step"] for p in run_doc["curve"]] == [1]
    assert set(run_doc["curve"][0]) == {"step", "loss", "acc", "lr", "pairs", "elapsed_s"}
    assert doc["config"]["seq_len"] == 128 and doc["args"]["max_time"] == 0
    assert doc["throughput_tokens_per_s"] is None                   # CUDA only

    args = ex.build_parser().parse_args(["--curriculum", "0.5", "--pairs-start", "2"])
    cfg = ex.Config(pairs=8)
    ramp = [ex._pairs_at(cfg, args, p / 10) for p in range(11)]
    assert ramp[0] == 2 and ramp[5:] == [8] * 6 and ramp == sorted(ramp)
    results, lines = run(ex, FAST + ["--steps", "4", "--log-every", "1", "--curriculum", "1"])
    assert [c["pairs"] for c in results["nsa"]["curve"]] == [2, 3, 5, 7]
    assert step_losses(lines) and all(" pairs " in line for line in lines if line.startswith("step "))


def test_bad_checkpoint(ex, tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"something": 1}, path)
    with pytest.raises(ValueError, match="not a checkpoint"):
        ex.load_checkpoint(str(path))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["--ddp", "--fsdp"])
def test_distributed_world_of_one_matches_plain_run(ex, mode, monkeypatch, tmp_path):
    """One gloo process, initialised from the environment as torchrun would: DDP and FSDP2
    (fully_shard) train exactly as the plain run does, and FSDP2 saves a full checkpoint."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    argv = FAST + ["--steps", "4", "--log-every", "2"]
    plain, _ = run(ex, argv)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    ckpt = tmp_path / "d.pt"
    results, lines = run(ex, argv + [mode, "--save", str(ckpt)])
    assert not dist.is_initialized()
    assert any("x 1 ranks" in line for line in lines)
    assert [l for _, l in results["nsa"]["losses"]] == pytest.approx([l for _, l in plain["nsa"]["losses"]],
                                                                    rel=1e-5)
    model, _ = ex.load_checkpoint(str(ckpt))
    assert set(model.state_dict()) == set(plain["nsa"]["model"].state_dict())


def test_ddp_needs_torchrun(ex, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="torchrun"):
        ex.main(FAST + ["--ddp"], log=lambda s: None)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_two_ranks_ddp():
    """Two gloo ranks each train on half of the global batch; the logged losses equal one
    process training on the whole batch (equal shards: DDP's mean of gradients is the mean)."""
    argv = FAST + ["--steps", "4", "--log-every", "2"]
    r = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(_free_port()),
                        str(SCRIPT), "--ddp", *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 ranks (ddp)" in r.stdout
    two = step_losses(r.stdout.splitlines())
    one = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert [l for _, l in two] == pytest.approx([l for _, l in step_losses(one.stdout.splitlines())], abs=2e-4)


@pytest.mark.slow
def test_check_distributed_two_gloo_ranks():
    """examples/check_distributed.py: DDP and FSDP2 gradients over two gloo ranks equal the
    single-process gradients on the whole batch (reference attention on the CPU)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), str(ROOT / "examples" / "check_distributed.py"),
                        "--device", "cpu", "--quiet", "--seq-len", "128"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        m = re.search(rf"^{mode} vs single: max rel diff (\S+) over (\d+) params .*: PASS$", r.stdout, re.M)
        assert m, r.stdout
        assert float(m.group(1)) < 1e-4 and int(m.group(2)) > 20
    assert "check_distributed: PASS" in r.stdout
