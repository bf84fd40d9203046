"""The side-by-side script runs end to end (smoke sizes) and writes its plot and figures."""

import json
import os

import compare
import pytest
import workloads


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux")
def test_compare_smoke(tmp_path):
    lines = []
    argv = ["--smoke", "--models", "bert", "--rounds", "2", "--steps", "1", "--memory", "inprocess"]
    argv += ["--plot", str(tmp_path / "plot.png"), "--json", str(tmp_path / "figures.json")]
    figures = compare.main(argv, log=lines.append)
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert json.loads((tmp_path / "figures.json").read_text())["models"] == figures["models"]
    (bert,) = figures["models"]
    assert set(bert["seconds"]) == set(workloads.ENCODER_METHODS)
    assert all(len(times) == 2 and min(times) > 0 for times in bert["seconds"].values())
    assert set(bert["peak_mib"]) == set(workloads.ENCODER_METHODS)
    text = "\n".join(lines)
    assert "| RAPT (pair, layers 1-3) |" in text and "RAPT step / SMART(k=1) step" in text
    # The saved figures alone give the same report and a new plot.
    again = []
    argv = ["--from-json", str(tmp_path / "figures.json"), "--plot", str(tmp_path / "re.png")]
    compare.main(argv, log=again.append)
    assert again[-2:-1] == lines[-2:-1] and (tmp_path / "re.png").stat().st_size > 1000
