"""examples/train_code_lm.py: the data (the standard library found through sysconfig, a split by
file), and a few CPU steps of both models at small sizes with the JSON log, the plot and the
generate() timings the device run reports."""
import importlib.util
import json
import sys
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "examples" / "train_code_lm.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("train_code_lm_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                     # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture
def data(tmp_path):
    """A small folder of Python files (a few of them longer than the probe's windows)."""
    root = tmp_path / "src"
    for i in range(14):
        body = "".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(4 + 9 * (i % 5)))
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"mod{i}.py").write_text(body)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "skip.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def test_finds_the_standard_library(ex):
    root = ex.stdlib_root()
    files = ex.find_sources(root)
    rel = {p.relative_to(root).as_posix() for p in files}
    assert "os.py" in rel and "json/__init__.py" in rel
    assert not any("site-packages" in r or "__pycache__" in r for r in rel)
    val = [r for r in rel if ex.is_val(r, 5.0)]
    assert 0.02 < len(val) / len(rel) < 0.09                       # about 5% of the files, by path hash
    assert all(ex.is_val(r, 5.0) == (zlib.crc32(r.encode()) % 10_000 < 500) for r in rel)


def test_corpus_split_by_file(ex, data):
    corpus = ex.load_corpus(data, val_percent=30.0)
    sizes = corpus.sizes
    assert sizes["files_train"] + sizes["files_val"] == 14 and sizes["files_val"] >= 1
    val_names = {rel for rel, _ in corpus.val_files}
    assert all(ex.is_val(rel, 30.0) for rel in val_names)
    assert int((corpus.train == ex.BOS).sum()) == sizes["files_train"]       # one BOS before each file
    text = bytes(corpus.train[corpus.train != ex.BOS].to(torch.uint8).tolist()).decode()
    for rel, tokens in corpus.val_files:                                    # held-out text never trains
        assert bytes(tokens.to(torch.uint8).tolist()).decode() not in text
    x, y = ex.windows(corpus.train, [0, 5], 16)
    assert x.shape == y.shape == (2, 16) and x[0, 0] == ex.BOS
    assert torch.equal(x[1, 1:], corpus.train[6:21].long()) and (y[0] == -100).sum() == (x[0, 1:] == ex.BOS).sum()


def test_cpu_run_writes_the_numbers_the_device_run_reports(ex, data, tmp_path):
    log = tmp_path / "code.json"
    lines = []
    threads = torch.get_num_threads()
    doc = ex.main(["--device", "cpu", "--data", str(data), "--val-percent", "30", "--seq-len", "64",
                   "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--steps", "4",
                   "--batch", "2", "--eval-every", "2", "--eval-windows", "2", "--probe-files", "2",
                   "--gen-prompt", "40", "--gen-tokens", "3", "--gen-batch", "1", "2", "--max-time", "600", "--quiet",
                   "--log-json", str(log)], log=lines.append)
    assert torch.get_num_threads() == threads                     # restored
    assert json.loads(log.read_text()) == doc
    assert (tmp_path / "code.png").stat().st_size > 1000
    assert doc["format"] == "nsa-dsl/train_code_lm/log" and doc["spec_name"] == "code_small"
    runs = doc["runs"]["64"]
    assert set(runs) == {"nsa", "sdpa"}
    for attn, r in runs.items():
        assert r["steps"] == 4 and r["tokens_per_s"] > 0
        assert [p["step"] for p in r["curve"]] == [1, 2, 4]
        assert all(0 < p["val_bpb"] < 9 and p["train_s"] >= 0 for p in r["curve"])
        assert r["long_range"]["files"] >= 1 and 0 < r["long_range"]["second_half_bpb"] < 9
    gen = doc["generate"]
    assert gen["prompt"] == 40 and gen["new_tokens"] == 3 and set(gen["batches"]) == {"1", "2"}
    for B, pair in gen["batches"].items():
        assert pair["nsa"]["cache"] == "NSACacheLayer" and pair["sdpa"]["cache"] == "DynamicLayer"
        for attn in ("nsa", "sdpa"):
            g = pair[attn]
            assert g["batch"] == int(B) and g["prompt"] == 40 and len(g["tokens"]) == 3
            assert g["prefill_s"] > 0 and g["decode_tokens_per_s"] > 0
    text = "\n".join(lines)
    assert "long-range probe" in text and "generate(): prompt 40 bytes, 3 new tokens" in text
    assert "batch   2: decode nsa/sdpa" in text


def test_generate_only_and_errors(ex, data):
    doc = ex.main(["--device", "cpu", "--data", str(data), "--val-percent", "30", "--seq-len", "32",
                   "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--steps", "0",
                   "--attn", "nsa", "--gen-prompt", "24", "--gen-tokens", "2", "--quiet"], log=lambda s: None)
    assert doc["runs"] == {} and doc["generate"]["batches"]["1"]["nsa"]["cache"] == "NSACacheLayer"
    with pytest.raises(SystemExit, match="shorter than --seq-len"):
        ex.main(["--device", "cpu", "--data", str(data), "--seq-len", "100000", "--steps", "1", "--quiet"],
                log=lambda s: None)
    with pytest.raises(SystemExit, match="multiple of --heads"):
        ex.main(["--device", "cpu", "--data", str(data), "--hidden", "30", "--heads", "4"], log=lambda s: None)
