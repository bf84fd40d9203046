"""The vocabulary benchmark and the GPU script run end to end (smoke sizes, on CPU)."""

import json
import os
import subprocess
import sys

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


@pytest.mark.promise("benchmark-scripts")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip shown without CUDA")
def test_gpu_script_skips_zero3_without_cuda(tmp_path):
    lines = []
    argv = ["--device", "cpu", "--smoke", "--models", "llama,zero3", "--methods", "standard,rapt"]
    figures = gpu.main([*argv, "--json", str(tmp_path / "g.json")], lines.append)
    assert figures["models"].keys() == {"llama"}
    assert figures["skipped"]["zero3"].startswith("needs CUDA")
    assert "zero3: skipped, needs CUDA" in "\n".join(lines)
    assert json.loads((tmp_path / "g.json").read_text())["skipped"] == figures["skipped"]


# The ZeRO-3 runner on CPU, in a process of its own (DeepSpeed makes a process group).
ZERO3_ON_CPU = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import gpu
base, batch, _ = gpu.build("zero3", smoke=True)
out = {}
for method in gpu.ZERO3_METHODS:
    runner = gpu.Zero3Runner(method, base, batch, torch.device("cpu"), "autocast")
    gpu.measure(runner, warmup=1, steps=1, sync_debug=False)
    reg = runner.regularizer
    out[method] = {
        "stage": runner.engine.zero_optimization_stage(),
        "steps": runner.engine.global_steps,
        "layer": None if reg is None else reg.last_layer,
    }
    runner.remove()
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.engines
def test_gpu_script_zero3_runner_steps_on_cpu():
    pytest.importorskip("deepspeed", reason="needs deepspeed (pip install 'rapt-reg[engines]')")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", ZERO3_ON_CPU, os.path.dirname(gpu.__file__)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["standard"] == {"stage": 3, "steps": 2, "layer": None}
    assert out["rapt"]["stage"] == 3 and out["rapt"]["steps"] == 2
    assert out["rapt"]["layer"] in (1, 2, 3)
