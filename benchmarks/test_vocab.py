"""The vocabulary benchmark and the GPU script run end to end (smoke sizes, on CPU)."""

import json
import os

import gpu
import pytest
import torch
import vocab


@pytest.mark.promise("benchmark-scripts")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux")
def test_vocab_smoke(tmp_path):
    lines = []
    argv = ["--smoke", "--inprocess", "--methods", "standard,rapt", "--label", "now"]
    argv += ["--json", str(tmp_path / "v.json"), "--plot", str(tmp_path / "v.png")]
    results = vocab.main(argv, log=lines.append)
    assert (tmp_path / "v.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["runs"]["now"] == results["runs"]["now"]
    sizes = results["runs"]["now"]
    assert [s["vocab"] for s in sizes] == list(vocab.SMOKE_SIZES)
    for size in sizes:
        assert size["methods"]["standard"]["extra_copies"] == 0
        assert size["methods"]["rapt"]["peak_mib"] >= 0  # in one heap a tiny step may reuse it
    assert "| rapt |" in "\n".join(lines)


def test_logits_copy_size():
    assert vocab.logits_mib(32000, 256) == pytest.approx(125.0)


@pytest.mark.promise("benchmark-scripts")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_script_without_cuda_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA device.*--device cpu --smoke"):
        gpu.main([])


def test_gpu_script_arguments_are_checked():
    with pytest.raises(SystemExit):
        gpu.main(["--methods", "rapt"])  # no standard to compare with


@pytest.mark.promise("benchmark-scripts")
def test_gpu_script_smoke_on_cpu(tmp_path):
    lines = []
    argv = ["--device", "cpu", "--smoke", "--models", "llama", "--methods", "standard,rapt"]
    figures = gpu.main([*argv, "--sync-debug", "--json", str(tmp_path / "g.json")], lines.append)
    methods = figures["models"]["llama"]["methods"]
    assert set(methods) == {"standard", "rapt"} and methods["rapt"]["step_ms"] > 0
    assert methods["rapt"]["sync_debug"] == "n/a (not CUDA)"
    assert json.loads((tmp_path / "g.json").read_text())["models"].keys() == {"llama"}
    assert "| RAPT (pair, layers 1-3) |" in "\n".join(lines)
