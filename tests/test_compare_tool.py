"""rapt-reg compare: readers, checks, statistics, resume, sweeps and whole runs on a tiny BERT.

The bad-input tests generate their files (hypothesis over file kinds, encodings, column layouts
and damaged rows) and run the pre-flight checks on each, which read everything and write
nothing; an independent description of each generated file says what must be read or refused.
A few generated inputs are trained end to end; Ctrl-C and SIGKILL are sent to real processes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rapt_reg
from rapt_reg import RaptRegError
from rapt_reg.compare import cli, report, training
from rapt_reg.compare import data as textdata
from rapt_reg.compare.training import CompareConfig, RunResult

pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("single_thread")

VERSION = rapt_reg.__version__
WORDS = ["good", "bad", "fine", "poor", "nice", "sad", "movie", "film", "plot", "actor"]
SIGNAL = {"pos": "good", "neg": "bad", "meh": "fine"}


def _write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows(n=36, seed=0):
    rng = random.Random(seed)
    labels = list(SIGNAL)
    return [
        (" ".join(rng.choice(WORDS) for _ in range(5)) + " " + SIGNAL[labels[i % 3]], labels[i % 3])
        for i in range(n)
    ]


def _tiny_model(folder, layers=4, seed=0, shared=False):
    """A tiny random BERT classifier; ``shared``: an ALBERT whose one layer runs ``layers``
    times a forward."""
    import transformers
    from transformers import (
        AlbertConfig,
        AlbertForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    transformers.utils.logging.disable_progress_bar()  # as the tool does: stderr is checked
    sizes = dict(vocab_size=15, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(seed)
    if shared:
        config = AlbertConfig(**sizes, embedding_size=8, num_hidden_groups=1)
        AlbertForSequenceClassification(config).save_pretrained(folder)
    else:
        BertForSequenceClassification(BertConfig(**sizes)).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT classifier (4 blocks) and its tokenizer, saved to a folder."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "model": _tiny_model(root / "model"),
        "data": str(_write_csv(root / "data.csv", _rows())),
    }


def _args(tiny, out, *extra):
    return [
        "--data",
        tiny["data"],
        "--model",
        tiny["model"],
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "12",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _tree(path):
    """Every file under ``path`` with the SHA-256 of its bytes; None when it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _per_seed(payload):
    """The per-seed numbers of results.json: everything of each run but its timings."""
    runs = sorted(payload["runs"], key=lambda run: (run["seed"], run["method"]))
    return [
        {k: v for k, v in run.items() if k not in ("step_times", "median_step_time")}
        for run in runs
    ]


# --------------------------------------------------------------------------- whole runs


@pytest.mark.promise("compare-tool", "compare-results-json", "compare-report")
def test_end_to_end_writes_table_json_and_plot(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    methods = "standard,rapt,rapt-embedding,smart,r3f"
    assert cli.main(_args(tiny, out, "--methods", methods, "--seeds", "2")) == 0
    printed = capsys.readouterr().out
    assert "| RAPT |" in printed and "| R3F |" in printed and "| Majority class |" in printed
    assert "RAPT: " in printed and "over standard" in printed
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "| Standard |" in markdown and "95% interval" in markdown
    assert markdown.startswith("# model on data.csv, 2 seeds\n")
    payload = json.loads((out / "results.json").read_text())
    assert payload["complete"] and payload["seeds_done"] == [0, 1]
    assert "load_average" in payload["environment"]
    assert payload["environment"]["rapt_reg"] == rapt_reg.__version__
    assert list(payload["methods"]) == methods.split(",")
    for entry in payload["methods"].values():
        assert len(entry["accuracy"]) == 2
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"])
        assert all(0.0 <= f <= 1.0 for f in entry["macro_f1"])
    assert "standard" not in payload["paired"] and payload["reference"] == "standard"
    base = payload["methods"]["standard"]["accuracy"]
    for name in methods.split(",")[1:]:
        paired = payload["paired"][name]
        deltas = [a - b for a, b in zip(payload["methods"][name]["accuracy"], base)]
        assert paired["deltas"] == pytest.approx(deltas)
        assert paired["delta"] == pytest.approx(sum(deltas) / 2)
        half = report.t_quantile(0.95, 1) * statistics.stdev(deltas) / math.sqrt(2)
        assert paired["ci95"] == pytest.approx([paired["delta"] - half, paired["delta"] + half])
        assert paired["interval"] == "t"
        assert paired["wins"] + paired["ties"] + paired["losses"] == 2
        assert paired["time_ratio"] > 0
        assert paired["verdict"].startswith(training.METHODS[name] + ": ")
        assert "too few seeds to tell (2; a verdict needs 6)" in paired["verdict"]
    runs = payload["runs"]
    assert [(r["seed"], r["method"]) for r in runs][:2] == [(0, "standard"), (0, "rapt")]
    assert all(len(r["step_times"]) == 2 for r in runs)
    assert all(len(r["penalties"]) == 2 for r in runs if r["method"] != "standard")
    assert all(sum(r["predicted"]) == payload["heldout_examples"] for r in runs)
    # The majority-class baseline: always the held-out rows' most common class (a tie here:
    # the first in sorted order), scored on that seed's held-out rows.
    prepared = training.prepare_data(CompareConfig(data=tiny["data"], seeds=(0, 1)))
    for seed, accuracy in zip((0, 1), payload["majority_class"]["accuracy"]):
        held = [prepared.train.labels[i] for i in prepared.splits[seed][1]]
        top = sorted(set(held), key=lambda c: (-held.count(c), c))[0]
        assert accuracy == held.count(top) / len(held)


@pytest.mark.promise("compare-progress")
def test_progress_counts_seeds_overall_and_estimates_the_time_left(tiny, tmp_path, capsys):
    argv = [a for a in _args(tiny, tmp_path / "out", "--seeds", "2") if a != "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    for seed in (0, 1):
        assert f"seed {seed} ({seed + 1}/2) train" in captured.err
        assert f"seed {seed} ({seed + 1}/2) eval" in captured.err
    assert re.search(
        r"^seed 0 \(1/2\) done, \d+ s per seed; about \d+ s left for 1 more seed$",
        captured.out,
        re.M,
    )
    assert re.search(r"^seed 1 \(2/2\) done, \d+ s per seed$", captured.out, re.M)


@pytest.mark.promise("compare-methods-paired")
def test_methods_of_a_seed_share_weights_and_batches(tiny, tmp_path):
    # Same initial weights, same first batch, same dropout stream: the first clean task loss
    # is the same for every method; and a method's run does not depend on the others.
    config = CompareConfig(
        data=tiny["data"],
        model=tiny["model"],
        steps=3,
        batch_size=4,
        max_length=12,
        seeds=(5,),
        methods=("standard", "rapt", "smart", "r3f"),
        progress=False,
    )
    prepared = training.prepare_data(config)
    model = training.load_model(config, 3)
    runs = training.run_comparison(config, prepared, model, log=lambda _: None)
    first = {r.method: r.losses[0] for r in runs}
    assert len(set(first.values())) == 1, first
    alone = training.run_comparison(
        replace(config, methods=("standard",)), prepared, model, log=lambda _: None
    )
    assert alone[0].losses == runs[0].losses
    assert alone[0].accuracy == runs[0].accuracy


# --------------------------------------------------------------------------- interruptions


def _start(tiny, out, *extra):
    argv = _args(tiny, out, "--seeds", "2", "--steps", "40", "--threads", "1", *extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "rapt_reg.compare", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _stop_in_seed_1(process, sig):
    # Wait for the line that starts seed 1 (seed 0 is saved by then), then send the signal.
    for line in process.stdout:
        if line.startswith("seed 1 (2/2):"):
            break
    process.send_signal(sig)
    rest, err = process.communicate(timeout=300)
    return err


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    argv = _args(tiny, out, "--seeds", "2", "--steps", "40", "--threads", "1")
    assert cli.main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.promise("compare-resume", "compare-interrupt")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_stopped_mid_seed_then_resumed_equals_uninterrupted_bit_for_bit(
    tiny, tmp_path, uninterrupted, sig, capsys
):
    out = tmp_path / "out"
    err = _stop_in_seed_1(_start(tiny, out), sig)
    saved = json.loads((out / "results.json").read_text())
    assert not saved["complete"] and saved["seeds_done"] == [0]  # stopped in seed 1
    assert not (out / "results.md").exists()
    argv = _args(tiny, out, "--seeds", "2", "--steps", "40", "--threads", "1")
    if sig == signal.SIGINT:
        # One line: what was saved and the command that resumes, which is what is run next.
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert lines[0].startswith("interrupted in seed 1 (its results are lost); ")
        assert f"{out / 'results.json'} holds seed 0; " in lines[0]
        command = lines[0].split("run the same command again to resume: ", 1)[1]
        words = shlex.split(command)
        assert words[:2] == ["rapt-reg", "compare"]
        argv = words[2:]
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "resuming from" in capsys.readouterr().out
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["complete"] and resumed["seeds_done"] == [0, 1]
    assert _per_seed(resumed) == _per_seed(uninterrupted)


@pytest.mark.promise("compare-interrupt")
def test_ctrl_c_in_process_is_one_line_and_exit_130(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real, calls = training._train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) > 4:  # 2 methods x 2 steps: seed 0 finishes, seed 1 breaks
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(training, "_train_step", step)
    assert cli.main(_args(tiny, out, "--seeds", "2")) == cli.INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("interrupted in seed 1")
    assert err.endswith(
        "resume: rapt-reg compare " + " ".join(map(shlex.quote, _args(tiny, out, "--seeds", "2")))
    )
    saved = json.loads((out / "results.json").read_text())
    assert not saved["complete"] and saved["seeds_done"] == [0]
    # From Python: a KeyboardInterrupt that says so, here before any seed was saved.
    calls[:] = [1] * 10
    config = CompareConfig(
        data=tiny["data"],
        model=tiny["model"],
        out=str(tmp_path / "o2"),
        steps=2,
        seeds=(0,),
        progress=False,
    )
    with pytest.raises(
        cli.CompareInterrupted,
        match="in seed 0 .*; nothing was saved yet; run "
        "the same command again to resume with the same settings",
    ):
        cli.run(config)


# --------------------------------------------------------------------------- resume


@pytest.mark.promise("compare-resume", "compare-seeds")
def test_rerun_continues_and_a_smaller_seeds_request_keeps_every_saved_seed(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(tiny, out, "--seeds", "1")) == 0
    assert "# model on data.csv, 1 seed\n" in (out / "results.md").read_text()
    capsys.readouterr()
    assert cli.main(_args(tiny, out, "--seeds", "3", "--threads", "1")) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'results.json'}: seed 0 already done" in printed
    assert "seed 1 (2/3):" in printed and "seed 0 (" not in printed
    three = json.loads((out / "results.json").read_text())
    assert three["seeds_done"] == [0, 1, 2]

    assert cli.main(_args(tiny, out, "--seeds", "2")) == 0
    printed = capsys.readouterr().out
    assert "also holds seed 2, which --seeds did not ask for: kept" in printed
    assert "nothing to train" in printed and "seed 0 (" not in printed
    after = json.loads((out / "results.json").read_text())
    assert after["seeds_done"] == [0, 1, 2] and _per_seed(after) == _per_seed(three)
    assert after["config"]["seeds"] == [0, 1, 2]
    assert "| Standard | " in printed and "3 seeds" in (out / "results.md").read_text()


@pytest.mark.promise("compare-resume")
def test_paths_and_method_order_are_the_same_key(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    shutil.copy(tiny["data"], tmp_path / "data" / "d.csv")
    shutil.copytree(tiny["model"], tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "2", "--batch-size", "4", "--max-length", "12", "--no-progress"]
    assert (
        cli.main(
            [
                "--data",
                "data/d.csv",
                "--model",
                "m",
                "--out",
                "out",
                "--seeds",
                "2",
                "--methods",
                "standard,rapt",
                *common,
            ]
        )
        == 0
    )
    before = (tmp_path / "out" / "results.json").read_text()
    for data, model, methods in [
        ("./data/d.csv", str(tmp_path / "m"), "rapt,standard"),
        (str(tmp_path / "data" / "d.csv"), "./m", "rapt standard"),
    ]:
        capsys.readouterr()
        argv = ["--data", data, "--model", model, "--out", "out", "--seeds", "2", *common]
        assert cli.main(argv + ["--methods", *methods.split()]) == 0
        printed = capsys.readouterr().out
        assert "nothing to train" in printed and "other settings" not in printed
        payload = json.loads((tmp_path / "out" / "results.json").read_text())
        assert _per_seed(payload) == _per_seed(json.loads(before))
    assert not (tmp_path / "out" / "previous-1").exists()


@pytest.mark.promise("compare-resume")
def test_changed_key_prints_old_and_new_and_moves_results_aside(
    tiny, tmp_path, monkeypatch, capsys
):
    model = _tiny_model(tmp_path / "m", seed=0)
    out = tmp_path / "out"
    argv = _args({"data": tiny["data"], "model": model}, out, "--seeds", "1")
    assert cli.main(argv) == 0
    first = (out / "results.json").read_bytes()
    capsys.readouterr()

    _tiny_model(tmp_path / "m", seed=1)  # weights changed in place, same folder
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r'model_sha256 "[0-9a-f]{12}…" -> "[0-9a-f]{12}…"', printed)
    assert f"moved the earlier files to {out / 'previous-1'}" in printed
    assert (out / "previous-1" / "results.json").read_bytes() == first
    assert {p.name for p in (out / "previous-1").iterdir()} == {
        "results.json",
        "results.md",
        "results.png",
    }
    second = (out / "results.json").read_bytes()

    monkeypatch.setattr(rapt_reg, "__version__", "9.9.9")
    assert cli.main(argv + ["--lr", "0.001"]) == 0
    printed = capsys.readouterr().out
    assert "lr 0.0001 -> 0.001" in printed
    assert f'rapt_reg "{VERSION}" -> "9.9.9"' in printed
    assert (out / "previous-2" / "results.json").read_bytes() == second
    assert json.loads((out / "results.json").read_text())["fingerprint"]["rapt_reg"] == "9.9.9"


@pytest.mark.promise("compare-resume")
def test_unreadable_results_are_moved_aside_not_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{half a file")
    assert cli.main(_args(tiny, out, "--seeds", "1")) == 0
    assert "cannot be read" in capsys.readouterr().out
    assert (out / "previous-1" / "results.json").read_text() == "{half a file"


# --------------------------------------------------------------------------- refusals


def _refused(tiny, tmp_path, capsys, *args, data=None, model=None, out=None):
    out = Path(out or tmp_path / "refused")
    before = _tree(out)
    argv = _args(
        {"data": str(data or tiny["data"]), "model": str(model or tiny["model"])}, out, *args
    )
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "seed 0" not in captured.out, "refused after training started"
    assert _tree(out) == before, "a refused run must leave --out as it was"
    return err


def _parser_refused(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "usage:" not in err
    return err


@pytest.mark.promise("compare-refusals")
def test_max_layer_beyond_the_model_is_refused_before_training(tiny, tmp_path, capsys):
    two = _tiny_model(tmp_path / "two", layers=2)
    err = _refused(tiny, tmp_path, capsys, model=two)  # the default --max-layer 3
    assert "--max-layer 3: the model in" in err and "runs 2 transformer block calls" in err
    assert "pass --max-layer 2 or lower" in err
    err = _refused(tiny, tmp_path, capsys, "--max-layer", "0,1,6")
    assert "--max-layer 6" in err and "runs 4 transformer block calls" in err
    argv = _args({**tiny, "model": two}, tmp_path / "ok", "--max-layer", "2", "--seeds", "1")
    assert cli.main(argv) == 0


@pytest.mark.promise("compare-refusals")
def test_max_layer_counts_the_calls_of_a_shared_layer(tiny, tmp_path, capsys):
    """ALBERT runs its one shared layer 4 times a forward: RAPT's layers are its 4 calls, so
    --max-layer 3 trains and 6 is refused naming the 4 calls (not the 1 block)."""
    albert = _tiny_model(tmp_path / "albert", layers=4, shared=True)
    err = _refused(tiny, tmp_path, capsys, "--max-layer", "6", model=albert)
    assert "runs 4 transformer block calls" in err and "pass --max-layer 4 or lower" in err
    argv = _args({**tiny, "model": albert}, tmp_path / "ok", "--max-layer", "3", "--seeds", "1")
    assert cli.main(argv) == 0


@pytest.mark.promise("compare-refusals")
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--eta", "inf"),
        ("--eta", "1,nan"),
        ("--alpha", "-inf"),
        ("--perturb-rate", "nan"),
        ("--test-fraction", "inf"),
    ],
)
def test_non_finite_numbers_are_refused_in_one_line(tiny, tmp_path, capsys, flag, value):
    err = _parser_refused(_args(tiny, tmp_path / "out", f"{flag}={value}"), capsys)
    assert f"argument {flag}:" in err and "not a finite number" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(RaptRegError, match=r"--lr inf: must be a finite number above 0"):
        CompareConfig(data="d.csv", lr=math.inf).check()


@pytest.mark.promise("compare-refusals")
def test_out_that_is_a_file_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    err = _refused(tiny, tmp_path, capsys, out=out)
    assert f"--out {out}: is a file" in err


@pytest.mark.promise("compare-refusals")
def test_missing_column_names_file_line_and_flag(tiny, tmp_path, capsys):
    data = _write_csv(tmp_path / "d.csv", _rows(), header=("sentence", "label"))
    err = _refused(tiny, tmp_path, capsys, data=data)
    assert "d.csv: line 1: the header has no column 'text'" in err and "--text-column" in err
    assert "'sentence'" in err


@pytest.mark.promise("compare-refusals")
def test_one_class_only_is_refused(tiny, tmp_path, capsys):
    data = _write_csv(tmp_path / "d.csv", [(t, "pos") for t, _ in _rows()])
    err = _refused(tiny, tmp_path, capsys, data=data)
    assert "d.csv" in err and "'pos'" in err and "at least two classes" in err


@pytest.mark.promise("compare-refusals")
def test_test_label_unseen_in_training_names_the_test_line(tiny, tmp_path, capsys):
    test = _write_csv(tmp_path / "t.csv", [("good film", "pos"), ("odd plot", "weird")])
    err = _refused(tiny, tmp_path, capsys, "--test", str(test))
    assert "t.csv: line 3: the label 'weird' is not a label of the training data" in err
    test = _write_csv(tmp_path / "t.csv", [("good film", "1.0")])
    data = _write_csv(tmp_path / "n.csv", [(t, str(1 + i % 2)) for i, (t, _) in enumerate(_rows())])
    err = _refused(tiny, tmp_path, capsys, "--test", str(test), data=data)
    assert "the label '1.0'" in err and "(it writes that number '1')" in err


@pytest.mark.promise("compare-refusals")
def test_empty_text_names_its_line(tiny, tmp_path, capsys):
    rows = _rows()
    rows[4] = ("   ", rows[4][1])
    err = _refused(tiny, tmp_path, capsys, data=_write_csv(tmp_path / "d.csv", rows))
    assert "d.csv: line 6, column 'text': the text is empty" in err


@pytest.mark.promise("compare-reads-formats", "compare-refusals")
def test_invalid_utf8_names_the_line_and_encoding_reads_it(tiny, tmp_path, capsys):
    rows = _rows()
    data = _write_csv(tmp_path / "d.csv", rows)
    raw = data.read_bytes().replace(b"actor", b"act\xa3r", 1)
    data.write_bytes(raw)
    line = raw[: raw.index(b"\xa3")].count(b"\n") + 1
    err = _refused(tiny, tmp_path, capsys, data=data)
    assert f"d.csv: line {line}, byte " in err and "is not valid utf-8" in err
    assert "--encoding" in err
    corpus = textdata.read_table(data, encoding="cp1252")
    assert any("act£r" in t for t in corpus.texts)
    err = _refused(tiny, tmp_path, capsys, "--encoding", "no-such-codec", data=data)
    assert "unknown encoding 'no-such-codec'" in err


@pytest.mark.promise("compare-reads-formats")
def test_a_utf8_byte_order_mark_is_read_as_utf8(tiny, tmp_path):
    data = tmp_path / "excel.csv"
    data.write_bytes(b"\xef\xbb\xbf" + Path(tiny["data"]).read_bytes())
    corpus = textdata.read_table(data)
    assert corpus.texts == textdata.read_table(Path(tiny["data"])).texts
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a b", "label": "x"}\n')
    assert textdata.read_table(jsonl).labels == ["x"]
    folder = tmp_path / "f" / "pos"
    folder.mkdir(parents=True)
    (folder / "1.txt").write_bytes(b"\xef\xbb\xbfgood film")
    assert textdata.read_folder(tmp_path / "f").texts == ["good film"]


@pytest.mark.promise("compare-refusals")
def test_model_folder_that_does_not_load(tiny, tmp_path, capsys):
    err = _refused(tiny, tmp_path, capsys, model=tmp_path / "nowhere")
    assert "nowhere: no such folder" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    err = _refused(tiny, tmp_path, capsys, model=broken)
    assert "broken: does not load" in err and "save_pretrained" in err


@pytest.mark.promise("compare-refusals")
def test_unknown_method_is_refused(tiny, tmp_path, capsys):
    err = _refused(tiny, tmp_path, capsys, "--methods", "standard,rapt,fgm")
    assert "--methods: unknown method 'fgm'" in err and "r3f" in err


@pytest.mark.promise("compare-tool")
def test_python_dash_m_runs_the_same_command(tiny, tmp_path):
    argv = _args(tiny, tmp_path / "out", "--methods", "fgm")
    done = subprocess.run(
        [sys.executable, "-m", "rapt_reg.compare", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --methods: unknown method 'fgm'")
    assert not (tmp_path / "out").exists()


@pytest.mark.promise("compare-splits", "compare-refusals")
def test_too_few_examples_for_few_shot(tiny, tmp_path, capsys):
    err = _refused(tiny, tmp_path, capsys, "--train-per-class", "12")
    assert "--train-per-class 12" in err and "has 12 examples" in err


@pytest.mark.promise("compare-refusals")
def test_refusal_does_not_touch_a_previous_results_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(tiny, out, "--seeds", "1")) == 0
    capsys.readouterr()
    _refused(tiny, tmp_path, capsys, "--methods", "nope", out=out)
    _refused(tiny, tmp_path, capsys, "--max-layer", "9", out=out)


@pytest.mark.promise("compare-refusals")
def test_a_second_run_on_the_same_out_is_refused(tiny, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "out"
    assert cli.main(_args(tiny, out, "--seeds", "1")) == 0
    capsys.readouterr()
    with open(out / ".lock", "a") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = _refused(tiny, tmp_path, capsys, "--seeds", "2", out=out)
    assert f"--out {out}: another rapt-reg compare is writing into it" in err


@pytest.mark.promise("compare-refusals")
def test_text_column_equal_to_label_column_is_refused(tiny, tmp_path, capsys):
    err = _refused(tiny, tmp_path, capsys, "--text-column", "label")
    assert "--text-column and --label-column both name 'label'" in err


@pytest.mark.promise("compare-refusals")
def test_duplicate_header_and_non_labels_are_refused(tmp_path):
    cases = {
        "text,label,text\na,pos,b\n": "line 1: the header names 'text' twice (columns 1 and 3)",
        "text,label\na,NaN\n": "line 2, column 'label': the label 'NaN' is how pandas",
        "text,label\na,nan\n": "the label 'nan' is how pandas, R or JSON write a missing value",
        'text,label\na,"[""pos"", ""neg""]"\n': 'the label \'["pos", "neg"]\' is a list',
        "text,label\na,1\nb,1.0\n": "line 3, column 'label': the label '1.0' is the number of "
        "line 2's label '1', written another way",
    }
    for text, message in cases.items():
        (tmp_path / "d.csv").write_text(text)
        with pytest.raises(RaptRegError, match=re.escape(message)):
            textdata.read_table(tmp_path / "d.csv")
    jsonl = {
        '{"text": "a", "label": NaN}\n': "line 1, column 'label': the label is nan",
        '{"text": "a", "label": null}\n': "the label is null, a missing value",
        '{"text": "a", "label": ["x", "y"]}\n': "the label is a list",
        '{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n': "line 2, column 'label': the "
        "label '1.0' is the number of line 1's label '1'",
        '{"text": "a", "text": "b", "label": 1}\n': "line 1: the key 'text' appears twice",
    }
    for text, message in jsonl.items():
        (tmp_path / "d.jsonl").write_text(text)
        with pytest.raises(RaptRegError, match=re.escape(message)):
            textdata.read_table(tmp_path / "d.jsonl")


@pytest.mark.promise("compare-refusals")
def test_unterminated_and_stray_quotes_name_line_and_column(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\ngood film,pos\n"bad plot,neg\nfine,meh\n')
    with pytest.raises(
        RaptRegError,
        match=re.escape(
            "d.csv: line 3, column 1 'text': the quote at character 1 opens a field that is never "
            "closed"
        ),
    ):
        textdata.read_table(tmp_path / "d.csv")
    # Closed much later, by a quote that ends a field: the rows in between would be swallowed.
    rows = "".join(f"{t},{lab}\n" for t, lab in _rows(9))
    swallowing = 'text,label\n"bad plot,neg\nfine film,meh\na 12",pos\n' + rows
    (tmp_path / "d.csv").write_text(swallowing)
    with pytest.raises(
        RaptRegError,
        match=r"line 2, column 1 'text': a quoted field runs on over 3 lines, and "
        r"its line 3 reads like a row \('fine film,meh'\)",
    ):
        textdata.read_table(tmp_path / "d.csv")
    (tmp_path / "d.csv").write_text('text,label\n"good" film,pos\n')
    with pytest.raises(
        RaptRegError,
        match=r"line 2, column 1 'text': the quoted field that opens "
        r"on line 2 closes at character 6 and goes on with ' '",
    ):
        textdata.read_table(tmp_path / "d.csv")


@pytest.mark.promise("compare-reads-formats", "compare-refusals")
def test_long_fields_are_read_up_to_the_stated_limit(tmp_path, monkeypatch):
    big = " ".join(["word"] * 200_000)  # about 1 MB, past the csv module's 131,072 default
    _write_csv(tmp_path / "d.csv", [(big, "pos"), ("short", "neg")])
    assert textdata.read_table(tmp_path / "d.csv").texts[0] == big
    assert csv.field_size_limit() == 131_072  # the global limit is put back
    monkeypatch.setattr(textdata, "MAX_FIELD_CHARS", 1000)
    with pytest.raises(
        RaptRegError,
        match=r"d.csv: line 2, column 1 'text': a field longer than "
        r"1,000 characters, the most read",
    ):
        textdata.read_table(tmp_path / "d.csv")


@pytest.mark.promise("compare-reads-formats", "compare-refusals")
def test_class_folders_say_what_was_skipped(tiny, tmp_path, capsys):
    root = tmp_path / "data"
    for cls, signal_word in SIGNAL.items():
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.txt").write_text(f"{signal_word} film {i}")
    (root / "pos" / "4.TXT").write_text("good plot")
    (root / "pos" / "notes.md").write_text("not an example")
    (root / "README.md").write_text("about the data")
    (root / ".DS_Store").write_bytes(b"\0")
    corpus = textdata.read_folder(root)
    assert "pos/4.TXT" in corpus.sources
    assert corpus.skipped == ("README.md", "pos/notes.md")
    assert cli.main(_args({**tiny, "data": str(root)}, tmp_path / "out", "--seeds", "1")) == 0
    assert (
        f"{root}: skipped 2 files that are not a class folder's .txt: README.md, pos/notes.md"
        in capsys.readouterr().out
    )

    (root / "empty").mkdir()
    err = _refused(tiny, tmp_path, capsys, data=root)
    assert "the class folder 'empty' holds nothing" in err
    (root / "empty").rmdir()
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("x")
    (root / "docs" / "b.rtf").write_text("x")
    err = _refused(tiny, tmp_path, capsys, data=root)
    assert "the class folder 'docs' holds only a.md, b.rtf, which are not .txt" in err


@pytest.mark.promise("compare-refusals")
def test_a_mistyped_path_suggests_the_near_one(tiny, tmp_path, capsys):
    (tmp_path / "reviews").mkdir()
    err = _refused(tiny, tmp_path, capsys, data=tmp_path / "revews")
    assert (
        f"--data {tmp_path / 'revews'}: no such file or folder; did you mean "
        f"{tmp_path / 'reviews'}?" in err
    )


@pytest.mark.promise("compare-refusals")
def test_a_label_column_of_ids_is_refused(tmp_path):
    rows = [(f"text {i}", f"id-{i}") for i in range(30)]
    corpus = textdata.read_table(_write_csv(tmp_path / "d.csv", rows))
    with pytest.raises(RaptRegError, match="30 distinct labels in 30 examples"):
        textdata.check_training_classes(corpus)


# --------------------------------------------------------------------------- generated inputs

# Words a generated text is made of: commas, quotes, tabs and newlines make the writer quote
# fields; the accented ones exist in cp1252, so every text can be written in every encoding.
POOL = [*WORDS, "café", "naïve", "£5", "a,b", 'say "hi"', "tab\there", "two\nlines"]
CLASSES = {
    "names": ["pos", "neg", "meh"],
    "ints": [1, 2, 3],
    "floats": [0.5, 1.5, 2.25],
    "bools": [True, False],
}
MISSING = ["NaN", "nan", "null", "None", "N/A", "NA", "<NA>"]


@dataclass
class Generated:
    """A generated data set: the settings that read it, and what must happen."""

    config: dict[str, Any]
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (source, text, label)
    refusal: list[str] = field(default_factory=list)  # regexes the one-line message matches
    skipped: list[str] = field(default_factory=list)


def _label_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _record(fields_, delimiter):
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerow(fields_)
    return buffer.getvalue()


def _wrong(written, declared):
    """Whether a file written in one encoding is read with another (a UTF-8 byte-order mark
    read as UTF-8 is right)."""
    return written != declared and (written, declared) != ("utf-8-sig", "utf-8")


def _first_non_ascii_line(text):
    for number, line in enumerate(text.split("\n"), start=1):
        if any(ord(c) > 127 for c in line):
            return number
    return None


@dataclass
class TableSpec:
    """A generated table: its kind, rows, layout, encodings, and the damage done to row ``at``."""

    kind: str  # csv, tsv or jsonl
    label_kind: str  # a key of CLASSES
    labels: list[Any]
    texts: list[str]
    text_name: str
    label_name: str
    order: list[str]  # the columns, in file order
    encoding: str  # written in
    declared: str  # read with (--encoding)
    damage: Optional[str]
    at: int


@st.composite
def tables(draw):
    kind = draw(st.sampled_from(["csv", "tsv", "jsonl"]))
    label_kind = draw(
        st.sampled_from(
            ["names", "ints", "floats", "bools"] if kind == "jsonl" else ["names", "ints"]
        )
    )
    pool = CLASSES[label_kind]
    classes = pool[: draw(st.integers(2, len(pool)))]
    labels = [c for c in classes for _ in range(draw(st.integers(3, 5)))]
    labels = draw(st.permutations(labels))
    texts = [
        " ".join(draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=4))) for _ in labels
    ]
    text_name = draw(st.sampled_from(["text", "body", "Review Text"]))
    label_name = draw(st.sampled_from(["label", "category", "y"]))
    extra = draw(st.lists(st.sampled_from(["id", "notes"]), unique=True, max_size=2))
    order = draw(st.permutations([text_name, label_name, *extra]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "cp1252", "utf-16"]))
    declared = "utf-8" if encoding == "utf-8-sig" else encoding
    if encoding in ("cp1252", "utf-16") and draw(st.booleans()):
        declared = "utf-8"  # the wrong one
    damages = [
        None,
        None,
        None,
        "empty-text",
        "empty-label",
        "missing-label",
        "list-label",
        "wrong-column",
        "same-column",
        "bad-ending",
        "typo-path",
        "long-field",
    ]
    if kind == "jsonl":
        damages += [
            "bad-json",
            "not-object",
            "dup-key",
            "missing-key",
            "null-label",
            "nan-label",
            "text-null",
        ]
    else:
        damages += ["unterminated", "stray-quote", "extra-field", "short-row", "dup-header"]
    if label_kind == "ints":
        damages.append("mixed-number")
    damage = draw(st.sampled_from(damages))
    at = draw(st.integers(0, len(labels) - 1))
    if damage in ("unterminated", "stray-quote"):
        texts[at] = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=2, max_size=3)))
    if damage == "long-field":
        texts[at] = " ".join(["word"] * 30_000)  # 150,000 characters
    return TableSpec(
        kind,
        label_kind,
        labels,
        texts,
        text_name,
        label_name,
        order,
        encoding,
        declared,
        damage,
        at,
    )


def _build_table(root: Path, spec: TableSpec) -> Generated:
    kind, labels, texts, order, damage, at = (
        spec.kind,
        spec.labels,
        list(spec.texts),
        spec.order,
        spec.damage,
        spec.at,
    )
    text_name, label_name = spec.text_name, spec.label_name
    encoding, declared = spec.encoding, spec.declared
    suffix = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl"}[kind]
    name = "data" + (".xlsx" if damage == "bad-ending" else suffix)
    path = root / name
    config = {
        "data": str(path),
        "text_column": text_name,
        "label_column": label_name,
        "encoding": declared,
    }
    gen = Generated(config)
    refuse = gen.refusal.extend
    values = [_label_text(v) for v in labels]
    lines: list[str] = []
    line = 1
    starts = []
    cut: list[str] = []  # a row cut short in the text or label column
    if kind != "jsonl":
        delimiter = "," if kind == "csv" else "\t"
        header = list(order) + ([text_name] if damage == "dup-header" else [])
        lines.append(_record(header, delimiter))
        line += 1
        for i, (text, label) in enumerate(zip(texts, labels)):
            row = {text_name: text, label_name: _label_text(label), "id": str(i), "notes": "n"}
            if i == at and damage == "empty-text":
                row[text_name] = " "
            if i == at and damage == "empty-label":
                row[label_name] = ""
            if i == at and damage == "missing-label":
                row[label_name] = MISSING[i % len(MISSING)]
            if i == at and damage == "list-label":
                row[label_name] = '["pos", "neg"]'
            if i == at and damage == "mixed-number":
                row[label_name] = f"{label}.0"
            fields_ = [row[c] for c in order] + ([texts[at]] if damage == "dup-header" else [])
            record = _record(fields_, delimiter)
            if i == at and damage == "unterminated":
                record = (
                    delimiter.join('"' + f if c == text_name else f for c, f in zip(order, fields_))
                    + "\n"
                )
            if i == at and damage == "stray-quote":
                record = (
                    delimiter.join(
                        f'"{f.split()[0]}" ' + " ".join(f.split()[1:]) if c == text_name else f
                        for c, f in zip(order, fields_)
                    )
                    + "\n"
                )
            if i == at and damage == "extra-field":
                record = record[:-1] + delimiter + "x\n"
            short = i == at and damage == "short-row"
            if short:
                record = _record(fields_[:-1], delimiter)
            starts.append(line)
            line += record.count("\n")
            lines.append(record)
            if short and order[-1] in (text_name, label_name):
                cut = [
                    rf"line {starts[-1]} has {len(order) - 1} fields?, the header "
                    rf"{len(order)}: no value for column '{re.escape(order[-1])}'"
                ]
    else:
        for i, (text, label) in enumerate(zip(texts, labels)):
            obj = {
                c: (text if c == text_name else label if c == label_name else f"v{i}")
                for c in order
            }
            if i == at:
                if damage == "empty-text":
                    obj[text_name] = "  "
                if damage == "empty-label":
                    obj[label_name] = ""
                if damage == "missing-label":
                    obj[label_name] = MISSING[i % len(MISSING)]
                if damage == "list-label":
                    obj[label_name] = ["pos", "neg"]
                if damage == "mixed-number":
                    obj[label_name] = float(label)
                if damage == "null-label":
                    obj[label_name] = None
                if damage == "nan-label":
                    obj[label_name] = float("nan")
                if damage == "text-null":
                    obj[text_name] = None
                if damage == "missing-key":
                    del obj[label_name]
            raw = json.dumps(obj, ensure_ascii=False)
            if i == at and damage == "bad-json":
                raw = raw[:-1]
            if i == at and damage == "not-object":
                raw = json.dumps([text, label])
            if i == at and damage == "dup-key":
                raw = "{" + json.dumps(text_name) + ': "x", ' + raw[1:]
            if i % 4 == 3:
                lines.append("\n")  # blank lines are skipped
                line += 1
            starts.append(line)
            lines.append(raw + "\n")
            line += 1
    content = "".join(lines)
    path.write_bytes(content.encode(encoding))
    L = starts[at]
    column = re.escape(f"column '{label_name}'")
    text_col = re.escape(f"column '{text_name}'")
    # What must happen, in the order the checks run: settings, path, bytes, header, rows.
    if damage == "same-column":
        config["label_column"] = text_name
        refuse([f"--text-column and --label-column both name '{re.escape(text_name)}'"])
    elif damage == "typo-path":
        config["data"] = str(root / ("dta" + suffix))
        refuse([r"--data .*dta\.\w+: no such file or folder; did you mean .*data\.\w+\?"])
    elif damage == "bad-ending":
        refuse([r"unknown file type '\.xlsx'"])
    elif _wrong(encoding, declared) and (encoding == "utf-16" or _first_non_ascii_line(content)):
        bad = 1 if encoding == "utf-16" else _first_non_ascii_line(content)
        refuse([rf"{name}: line {bad}, byte \d+ of the line is not valid utf-8", "--encoding"])
    elif damage == "wrong-column":
        config["text_column"] = "texte"
        refuse([r"no (column|key) 'texte'", "--text-column"])
    elif damage == "dup-header":
        refuse([rf"line 1: the header names '{re.escape(text_name)}' twice"])
    elif damage in ("unterminated", "stray-quote"):
        refuse([rf"line {L}\b", "quote"])
    elif cut:
        refuse(cut)
    elif damage == "extra-field":
        refuse([rf"line {L} has {len(order) + 1} fields, the header {len(order)}"])
    elif damage == "bad-json":
        refuse([rf"line {L}, column \d+ is not valid JSON"])
    elif damage == "not-object":
        refuse([rf"line {L} is not a JSON object"])
    elif damage == "dup-key":
        refuse([rf"line {L}: the key '{re.escape(text_name)}' appears twice"])
    elif damage == "missing-key":
        refuse([rf"line {L} has no key '{re.escape(label_name)}'"])
    elif damage in ("empty-text", "text-null"):
        refuse([rf"line {L}, {text_col}: the text is (empty|null)"])
    elif damage == "empty-label":
        refuse([rf"line {L}, {column}: the label is empty"])
    elif damage in ("missing-label", "null-label", "nan-label"):
        refuse([rf"line {L}, {column}: the label .*(missing value)"])
    elif damage == "list-label":
        refuse([rf"line {L}, {column}: the label .*list"])
    elif damage == "mixed-number":
        first: dict[float, str] = {}
        for i, label in enumerate(labels):
            spelled = f"{label}.0" if i == at else str(label)
            if first.setdefault(float(spelled), spelled) != spelled:
                refuse([rf"line {starts[i]}, {column}: the label '{spelled}' is the number of"])
                break
    if not gen.refusal:
        gen.rows = [
            (f"{name}:{starts[i]}", " ".join(texts[i].split()), values[i])
            for i in range(len(labels))
        ]
    return gen


@st.composite
def folders(draw):
    classes = draw(
        st.lists(
            st.sampled_from(["pos", "neg", "meh", "1", "x y"]), min_size=2, max_size=3, unique=True
        )
    )
    files = {
        c: [
            (
                f"{i:02d}" + draw(st.sampled_from([".txt", ".txt", ".TXT"])),
                " ".join(draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=4))),
            )
            for i in range(draw(st.integers(3, 4)))
        ]
        for c in classes
    }
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "cp1252"]))
    declared = "utf-8" if encoding != "cp1252" or draw(st.booleans()) else "cp1252"
    clutter = draw(
        st.lists(
            st.sampled_from(["README.md", ".DS_Store", "_cache/", "cls/notes.md", "cls/sub/"]),
            unique=True,
            max_size=3,
        )
    )
    damage = draw(
        st.sampled_from(
            [None, None, None, "empty-class", "md-only", "empty-file", "typo-path", "no-classes"]
        )
    )
    return classes, files, encoding, declared, clutter, damage


def _build_folder(root: Path, drawn) -> Generated:
    classes, files, encoding, declared, clutter, damage = drawn
    data = root / "data"
    gen = Generated({"data": str(data), "encoding": declared})
    texts = {(cls, name): text for cls, items in files.items() for name, text in items}
    if damage == "empty-file":
        texts[sorted(texts)[len(texts) // 2]] = " \n"
    for (cls, name), text in texts.items():
        (data / cls).mkdir(parents=True, exist_ok=True)
        (data / cls / name).write_bytes(text.encode(encoding))
    for item in clutter:
        target = data / item.replace("cls", classes[0])
        if item.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            (target / "x.txt").write_text("inside")
        else:
            target.write_text("clutter")
    listing = {cls: sorted(name for name, _ in items) for cls, items in files.items()}
    if damage == "empty-class":
        (data / "zzz").mkdir()
        listing["zzz"] = []
    if damage == "md-only":
        (data / "zzz").mkdir()
        (data / "zzz" / "a.md").write_text("x")
        listing["zzz"] = []
    if damage == "typo-path":
        gen.config["data"] = str(root / "dta")
        gen.refusal.append(r"--data .*dta: no such file or folder; did you mean .*data\?")
        return gen
    if damage == "no-classes":
        shutil.rmtree(data)
        data.mkdir()
        (data / "a.csv").write_text("text,label\n")
        gen.refusal.append(r"no class folders \(it holds: a\.csv\)")
        return gen
    # What must happen, in the order the folder is read: class by class, file by file.
    for cls in sorted(listing):
        if not listing[cls]:
            what = r"only a\.md, which are not \.txt" if damage == "md-only" else "nothing"
            gen.refusal.append(f"the class folder '{cls}' holds {what}")
            return gen
        for name in listing[cls]:
            text = texts[(cls, name)]
            if _wrong(encoding, declared) and any(ord(c) > 127 for c in text):
                gen.refusal.append(
                    rf"{re.escape(name)}: line \d+, byte \d+ of the line is not valid utf-8"
                )
                return gen
            if not text.strip():
                gen.refusal.append(rf"{re.escape(name)}: the file is empty")
                return gen
    gen.rows = [
        (f"{cls}/{name}", " ".join(texts[(cls, name)].split()), cls)
        for cls in sorted(listing)
        for name in listing[cls]
    ]
    gen.skipped = sorted(
        item.replace("cls", classes[0])
        for item in clutter
        if item in ("README.md", "cls/notes.md", "cls/sub/")
    )
    return gen


def _check_generated(gen: Generated, model: str, root: Path):
    """Run the pre-flight checks on a generated data set: refused in one line naming what the
    description says, or read exactly; either way nothing is written."""
    out = root / "out"
    config = CompareConfig(model=model, out=str(out), seeds=(0,), progress=False, **gen.config)
    try:
        plan = cli.preflight(config)
    except RaptRegError as error:
        message = str(error)
        event("refused")
        assert gen.refusal, f"refused a good input: {message}"
        assert "\n" not in message
        for pattern in gen.refusal:
            assert re.search(pattern, message), (pattern, message)
    else:
        event("read")
        assert not gen.refusal, f"accepted what must be refused ({gen.refusal})"
        corpus = plan.prepared.train
        got = list(zip(corpus.sources, corpus.texts, corpus.labels))
        assert got == gen.rows
        train, held = plan.prepared.splits[0]
        assert sorted(train + held) == list(range(len(gen.rows))) and not set(train) & set(held)
        if gen.skipped:
            assert all(s in "\n".join(plan.notes) for s in gen.skipped), plan.notes
    assert not out.exists(), "the pre-flight checks wrote into --out"


@pytest.mark.promise("compare-refusals", "compare-reads-formats")
@settings(max_examples=180, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=tables())
def test_generated_tables_are_read_exactly_or_refused_before_anything_is_written(tiny, spec):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _check_generated(_build_table(root, spec), tiny["model"], root)


@pytest.mark.promise("compare-refusals", "compare-reads-formats")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=folders())
def test_generated_folders_are_read_exactly_or_refused_before_anything_is_written(tiny, drawn):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _check_generated(_build_folder(root, drawn), tiny["model"], root)


GOOD_ONES = {
    "csv-bom-ints-extra-column": TableSpec(
        "csv",
        "ints",
        [1, 2] * 4,
        ["good film", "bad, plot", 'say "hi" café', "two\nlines", "fine", "nice", "£5", "sad"],
        "text",
        "label",
        ["id", "label", "text"],
        "utf-8-sig",
        "utf-8",
        None,
        0,
    ),
    "jsonl-bools-utf16": TableSpec(
        "jsonl",
        "bools",
        [True, False] * 4,
        ["good"] * 4 + ["bad"] * 4,
        "body",
        "y",
        ["y", "body"],
        "utf-16",
        "utf-16",
        None,
        0,
    ),
    "tsv-cp1252-names": TableSpec(
        "tsv",
        "names",
        ["pos", "neg", "meh"] * 3,
        ["naïve\tplot"] * 9,
        "text",
        "label",
        ["text", "label", "notes"],
        "cp1252",
        "cp1252",
        None,
        0,
    ),
}


@pytest.mark.promise("compare-reads-formats")
@pytest.mark.parametrize("name", list(GOOD_ONES))
def test_generated_inputs_train_end_to_end(tiny, tmp_path, name):
    gen = _build_table(tmp_path, GOOD_ONES[name])
    assert not gen.refusal
    options = {
        "--text-column": "text_column",
        "--label-column": "label_column",
        "--encoding": "encoding",
    }
    argv = _args({**tiny, "data": gen.config["data"]}, tmp_path / "out", "--seeds", "1")
    for flag, key in options.items():
        argv += [flag, gen.config[key]]
    assert cli.main(argv) == 0
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["classes"] == sorted({label for _, _, label in gen.rows})
    held = payload["heldout"]["0"]
    assert set(held) <= {source for source, _, _ in gen.rows}
    assert len(held) == payload["heldout_examples"] == sum(payload["heldout_class_counts"].values())
    assert all(0 <= r["accuracy"] <= 1 for r in payload["runs"])


# --------------------------------------------------------------------------- splits


@pytest.mark.promise("compare-splits")
def test_test_file_with_train_per_class_scores_exactly_the_test_rows(tiny, tmp_path, capsys):
    train = _write_csv(tmp_path / "train.csv", _rows(12))  # smaller than the test file
    test = _write_csv(tmp_path / "test.csv", _rows(60, seed=1))
    config = CompareConfig(data=str(train), test=str(test), seeds=(0, 1), train_per_class=3)
    prepared = training.prepare_data(config)
    for seed in (0, 1):
        drawn, held = prepared.splits[seed]
        assert held == list(range(60))
        assert len(drawn) == 9 and max(drawn) < 12
        assert sorted(prepared.train.labels[i] for i in drawn) == sorted(list(SIGNAL) * 3)
    assert prepared.splits[0][0] != prepared.splits[1][0]
    assert prepared.heldout().origin == str(test)
    argv = _args(
        {**tiny, "data": str(train)},
        tmp_path / "out",
        "--test",
        str(test),
        "--train-per-class",
        "3",
        "--seeds",
        "1",
    )
    assert cli.main(argv) == 0
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["heldout"]["0"] == [f"test.csv:{line}" for line in range(2, 62)]
    assert payload["heldout_class_counts"] == {"meh": 20, "neg": 20, "pos": 20}
    assert "seed 0 (1/1): 9 training examples, 60 held out" in capsys.readouterr().out


@pytest.mark.promise("compare-refusals")
def test_test_file_equal_to_data_and_out_inside_data_are_refused(tiny, tmp_path, capsys):
    copy = shutil.copy(tiny["data"], tmp_path / "copy.csv")
    err = _refused(tiny, tmp_path, capsys, "--test", str(copy))
    assert "holds the same data as --data" in err
    folder = tmp_path / "folder"
    for cls in SIGNAL:
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            (folder / cls / f"{i}.txt").write_text(f"{SIGNAL[cls]} film {i}")
    err = _refused(tiny, tmp_path, capsys, data=folder, out=folder / "out")
    assert f"--out {folder / 'out'} is inside the data folder" in err
    test = _write_csv(tmp_path / "t.csv", _rows(6) + [("a new text", "pos")])
    argv = _args(tiny, tmp_path / "out", "--test", str(test), "--seeds", "1")
    assert cli.main(argv) == 0
    assert f"{test}: 6 of its 7 texts are also in {tiny['data']}" in capsys.readouterr().out


@pytest.mark.promise("compare-splits")
def test_test_file_splits(tmp_path):
    train = _write_csv(tmp_path / "train.csv", _rows(30))
    test = _write_csv(tmp_path / "test.csv", _rows(12, seed=1))
    config = CompareConfig(data=str(train), test=str(test), seeds=(0, 1))
    prepared = training.prepare_data(config)
    assert prepared.splits[0] == (list(range(30)), list(range(12)))
    few = training.prepare_data(replace(config, train_per_class=10))
    assert len(few.splits[0][0]) == 30 and few.splits[0][1] == list(range(12))
    drawn = training.prepare_data(replace(config, eval_size=5))
    assert len(drawn.splits[0][1]) == 5 and drawn.splits[0][1] != drawn.splits[1][1]
    with pytest.raises(RaptRegError, match="--test-fraction splits --data when there is no --test"):
        training.prepare_data(replace(config, test_fraction=0.3))


@pytest.mark.promise("compare-splits")
def test_fraction_split_is_stratified_disjoint_and_seeded():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 2
    train, held = textdata.fraction_split(labels, 0.2, seed=3)
    assert not set(train) & set(held) and sorted(train + held) == list(range(62))
    assert [sum(labels[i] == c for i in held) for c in "abc"] == [10, 2, 1]
    assert textdata.fraction_split(labels, 0.2, seed=3) == (train, held)
    train2, held2 = textdata.fraction_split(labels, 0.2, seed=3, eval_size=5)
    assert train2 == train and len(held2) == 5 and set(held2) <= set(held)
    with pytest.raises(RaptRegError, match="single example"):
        textdata.fraction_split(["a", "a", "b"], 0.5, seed=0)


@pytest.mark.promise("compare-reads-formats")
def test_tsv_jsonl_and_folder_read_the_same_examples(tmp_path):
    rows = [("a good film", "pos"), ("a bad plot", "neg"), ("fine", 3)]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("label\ttext\n" + "".join(f"{lab}\t{t}\n" for t, lab in rows))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rows) + "\n\n")
    folder = tmp_path / "folder"
    for i, (text, label) in enumerate(rows):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{i}.txt").write_text(f"  {text}\n")
    tab, ndjson = tmp_path / "d.tab", tmp_path / "d.ndjson"
    tab.write_bytes(tsv.read_bytes())
    ndjson.write_bytes(jsonl.read_bytes())
    for corpus in map(textdata.read_table, (tsv, jsonl, tab, ndjson)):
        assert corpus.texts == [t for t, _ in rows]
        assert corpus.labels == ["pos", "neg", "3"]
    got = textdata.read_corpus(folder)
    assert sorted(zip(got.texts, got.labels)) == sorted((t, str(lab)) for t, lab in rows)
    assert got.class_names == ["3", "neg", "pos"]


@pytest.mark.promise("compare-refusals")
def test_jsonl_and_csv_format_errors_name_the_line(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    with pytest.raises(RaptRegError, match="line 2 is not a JSON object"):
        textdata.read_table(bad)
    bad.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(RaptRegError, match="line 2, column 2 is not valid JSON"):
        textdata.read_table(bad)
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(RaptRegError, match="unknown file type '.xlsx'"):
        textdata.read_table(tmp_path / "d.xlsx")
    multi = _write_csv(tmp_path / "m.csv", [("one\nline two", "pos"), ("", "neg")])
    with pytest.raises(RaptRegError, match="line 4, column 'text': the text is empty"):
        textdata.read_table(multi)  # the second row starts on line 4, after a two-line field


@pytest.mark.promise("compare-refusals")
def test_empty_file_in_a_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text(" \n")
    with pytest.raises(RaptRegError, match=r"1.txt: the file is empty"):
        textdata.read_folder(tmp_path)


# --------------------------------------------------------------------------- statistics


@pytest.mark.promise("compare-report")
def test_t_interval_and_sign_flip_test_against_their_definitions():
    # Student's t quantiles (two-sided 95%) from the published tables.
    for df, value in {1: 12.706, 2: 4.303, 4: 2.776, 5: 2.571, 9: 2.262, 30: 2.042}.items():
        assert report.t_quantile(0.95, df) == pytest.approx(value, abs=5e-4)
    values = [0.01, -0.02, 0.03, 0.0, 0.015]
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = report.t_quantile(0.95, 4) * sd / math.sqrt(5)
    assert report.t_interval(values) == pytest.approx((mean - half, mean + half))
    assert all(math.isnan(x) for x in report.t_interval([0.1]))
    rng = random.Random(0)
    for n in range(1, 9):  # the exact test enumerates every sign pattern
        deltas = [rng.choice([-2, -1, 0, 1, 2, 3]) / 100 for _ in range(n)]
        flips = [
            abs(sum(s * d for s, d in zip(signs, deltas)))
            for signs in itertools.product([1, -1], repeat=n)
        ]
        expected = sum(f >= abs(sum(deltas)) - 1e-12 for f in flips) / 2**n
        assert report.sign_flip_p(deltas) == pytest.approx(expected)
    assert report.sign_flip_p([0.01] * 5) == 2 / 32 and report.sign_flip_p([0.01] * 6) == 2 / 64
    assert 0 < report.sign_flip_p([0.01] * 20) < 0.001  # sampled beyond 16 seeds


@pytest.mark.promise("compare-report")
def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    assert report.bootstrap_interval([0.02] * 5) == pytest.approx((0.02, 0.02))
    values = [0.01, -0.02, 0.03, 0.0, 0.015]
    low, high = report.bootstrap_interval(values)
    assert low < sum(values) / 5 < high
    assert min(values) <= low and high <= max(values)
    assert report.bootstrap_interval(values) == (low, high)
    assert report.bootstrap_interval([0.0, 0.0, 0.0, 1.0])[1] > 0.5


def _runs(deltas, ratio=1.5, methods=("standard", "rapt")):
    runs = []
    for seed, delta in enumerate(deltas):
        runs.append(RunResult(methods[0], seed, 0.8, 0.7, step_times=[1.0], predicted=[3, 2]))
        runs.append(
            RunResult(
                methods[1], seed, 0.8 + delta, 0.7 + delta, step_times=[ratio], predicted=[5, 0]
            )
        )
    return runs


@pytest.mark.promise("compare-report")
@pytest.mark.parametrize(
    ("deltas", "finding"),
    [
        # The case: two seeds, each one held-out example better.
        (
            [0.031, 0.031],
            "too few seeds to tell (2; a verdict needs 6); at this spread about 6 seeds would tell",
        ),
        ([0.01, 0.02, 0.015, 0.01, 0.02], "too few seeds to tell (5; a verdict needs 6)"),
        ([0.01, 0.02, 0.015, 0.01, 0.02, 0.01], "better than standard at 6 seeds."),
        ([-0.01, -0.02, -0.015, -0.01, -0.03, -0.02, -0.01], "worse than standard at 7 seeds."),
        (
            [0.01, -0.01, 0.02, -0.02, 0.0, 0.01],
            "not distinguishable from standard at 6 seeds; at this spread about",
        ),
        ([0.01, -0.01, 0.02, -0.02, 0.01, -0.01], "the mean difference is 0"),
        # The interval excludes 0, but with a tie and a small loss the sign-flip p is 4/32.
        (
            [0.02, 0.02, 0.02, 0.02, 0.0, -0.003],
            "not distinguishable from standard at 6 seeds "
            "(the interval excludes 0 but the sign-flip test does not agree, p = 0.12); more seeds "
            "would tell.",
        ),
        ([0.01], "one seed gives no interval; run at least 6 seeds"),
    ],
)
def test_verdicts(deltas, finding):
    rows = report.summarize(_runs(deltas), ["standard", "rapt"])
    sentence = report.verdict(rows[1])
    assert sentence.startswith("RAPT: ") and finding in sentence, sentence
    assert "1.5× the time per step" in sentence
    decided = len(deltas) >= 6 and report.sign_flip_p(deltas) < 0.05
    assert ("better" in sentence or "worse" in sentence) == decided


@pytest.mark.promise("compare-report")
def test_seeds_needed_is_the_first_count_whose_interval_excludes_zero():
    values = [0.01, -0.005, 0.02, 0.0, 0.012]
    needed = report.seeds_needed(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)

    def excludes(n):
        return report.t_quantile(0.95, n - 1) * sd / math.sqrt(n) < mean

    assert needed >= report.MIN_SEEDS and excludes(needed) and not excludes(needed - 1)
    assert report.seeds_needed([0.01, -0.01]) is None
    assert report.seeds_needed([0.02, 0.02]) == report.MIN_SEEDS


@pytest.mark.promise("compare-report")
def test_table_from_known_results():
    rows = report.summarize(_runs([0.01, 0.03]), ["standard", "rapt", "smart"])
    assert [r.method for r in rows] == ["standard", "rapt"]
    p = rows[1].paired
    assert p.delta == pytest.approx(0.02) and (p.wins, p.ties, p.losses) == (2, 0, 0)
    table = report.format_table(
        rows, f1=True, baseline={"accuracy": [0.6, 0.6], "macro_f1": [0.25, 0.25]}
    )
    lines = table.splitlines()
    assert lines[2] == "| Standard | 80.0 ± 0.0 | 70.0 ± 0.0 | – | – | – | 1000 ± 0 | 1.00 |"
    # t(0.975, 1) = 12.706: 2.0 ± 12.706 * 1.414 / 1.414 points
    assert lines[3] == (
        "| RAPT | 82.0 ± 1.4 | 72.0 ± 1.4 | +2.0 (\u221210.7 to +14.7) | 0.50 | "
        "2 / 0 / 0 | 1500 ± 0 | 1.50 |"
    )
    assert lines[4] == "| Majority class | 60.0 ± 0.0 | 25.0 ± 0.0 | – | – | – | – | – |"


@pytest.mark.promise("compare-report")
def test_without_standard_the_first_method_is_the_reference(tiny, tmp_path, capsys):
    rows = report.summarize(_runs([0.01, 0.03], methods=("rapt", "smart")), ["rapt", "smart"])
    assert rows[0].paired is None and rows[1].paired.reference == "rapt"
    assert "over RAPT" in report.verdict(rows[1], "RAPT")
    assert cli.main(_args(tiny, tmp_path / "out", "--methods", "rapt,smart", "--seeds", "1")) == 0
    printed = capsys.readouterr().out
    assert "no standard in --methods: the differences are against RAPT, the first method" in printed
    assert "| Method | Accuracy (%) | Δ vs RAPT (points, 95% interval)" in printed
    assert "SMART: " in printed and "over RAPT" in printed


@pytest.mark.promise("compare-report")
def test_single_class_predictions_are_warned_about():
    rows = report.summarize(_runs([0.0, 0.0]), ["standard", "rapt"])
    lines = report.single_class_warnings(rows, ["neg", "pos"])
    assert lines == [
        "warning: RAPT predicted one class ('neg') for every held-out example in seeds 0, 1: it "
        "learnt nothing beyond the majority class; train longer (--steps) or with a higher --lr"
    ]
    collapsed = report.summarize(
        [replace(r, predicted=[0, 5]) for r in _runs([0.0])], ["standard", "rapt"]
    )
    lines = report.single_class_warnings(collapsed, ["neg", "pos"])
    assert len(lines) == 3 and "every method collapsed to one class" in lines[-1]


def test_signed_points_never_show_minus_zero():
    assert [report._signed(x) for x in (-0.04, 0.04, -0.06, 1.25)] == [
        "+0.0",
        "+0.0",
        "\u22120.1",
        "+1.2",
    ]


@pytest.mark.promise("compare-report")
def test_macro_f1_and_unbalanced():
    gold = torch.tensor([0, 0, 0, 1])
    assert training.macro_f1(torch.tensor([0, 0, 0, 0]), gold) == pytest.approx((6 / 7 + 0) / 2)
    assert training.macro_f1(gold, gold) == 1.0
    assert report.unbalanced([30, 20]) and not report.unbalanced([30, 21])


@pytest.mark.promise("compare-results-json")
def test_json_has_no_nan():
    text = report.dumps({"a": math.nan, "b": [1.0, math.nan]})
    assert json.loads(text) == {"a": None, "b": [1.0, None]}


@pytest.mark.promise("compare-model-head")
def test_a_head_of_another_size_is_replaced_and_the_rest_loaded(tiny):
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tiny["model"])
    config = CompareConfig(data=tiny["data"], model=tiny["model"])
    model = training.load_model(config, 5).load(0)
    assert saved.classifier.out_features == 2 and model.classifier.out_features == 5
    for name, value in saved.bert.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], value), name


# --------------------------------------------------------------------------- sweeps


@pytest.mark.promise("compare-sweeps")
def test_sweep_settings_expand_into_one_method_each(tiny):
    config = CompareConfig(
        data=tiny["data"],
        methods=("standard", "rapt", "smart"),
        eta=(1.0, 2.0),
        max_layer=(0, 1, 3),
        alpha=1.0,
        min_layer=1,
    )
    variants = config.variants()
    assert [v.name for v in variants] == [
        "standard",
        *[f"rapt[eta={e:g},max_layer={m}]" for e in (1, 2) for m in (0, 1, 3)],
        "smart",
    ]
    assert variants[1].label == "RAPT (η=1, max_layer=embed)"
    model = training.load_model(replace(config, model=tiny["model"]), 3).load(0)
    for v in variants[1:-1]:
        reg = training._build_regularizer(v, model, 0)
        try:
            expected = (v.eta, v.max_layer, 0 if v.max_layer == 0 else 1, v.alpha)
            assert (reg.eta, reg.max_layer, reg.min_layer, reg.alpha) == expected
        finally:
            reg.remove()
    alphas = CompareConfig(data="d", methods=("standard", "smart"), alpha=(0.5, 1.0)).variants()
    assert [v.name for v in alphas] == ["standard", "smart[alpha=0.5]", "smart[alpha=1]"]
    with pytest.raises(RaptRegError, match="--eta: 2 is listed twice"):
        CompareConfig(data="d", eta=(2.0, 1.0, 2.0)).check()
    with pytest.raises(RaptRegError, match="--min-layer 2 is above --max-layer 1"):
        CompareConfig(data="d", max_layer=(0, 1, 3), min_layer=2).check()


@pytest.mark.promise("compare-sweeps")
def test_sweep_runs_every_setting_against_standard_and_draws_the_papers_figure(tiny, tmp_path):
    out = tmp_path / "out"
    argv = _args(tiny, out, "--max-layer", "0,1,2", "--eta", "1,2", "--seeds", "2", "--steps", "1")
    assert cli.main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    names = [f"rapt[eta={e},max_layer={m}]" for e in (1, 2) for m in (0, 1, 2)]
    assert list(payload["methods"]) == ["standard", *names]
    assert list(payload["paired"]) == names
    assert all(payload["paired"][n]["reference"] == "standard" for n in names)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = CompareConfig(data=tiny["data"], eta=(1.0, 2.0), max_layer=(0, 1, 2))
    _, runs, _ = cli._read_saved(out / "results.json")
    variants = config.variants()
    rows = report.summarize(runs, [v.name for v in variants], {v.name: v.label for v in variants})
    fig = report.sweep_figure(rows, variants, "sweep")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "1", "2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["RAPT (η=1)", "RAPT (η=2)"]
    lines = [container.lines[0] for container in ax.containers]
    assert len(lines) == 2
    for line, eta in zip(lines, (1, 2)):
        expected = [
            100 * payload["paired"][f"rapt[eta={eta},max_layer={m}]"]["delta"] for m in (0, 1, 2)
        ]
        assert list(line.get_ydata()) == pytest.approx(expected)


# --------------------------------------------------------------------------- plot and help


def _overlapping(texts, renderer):
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]
    return [(a, b) for (a, x), (b, y) in itertools.combinations(boxes, 2) if x.overlaps(y)]


@pytest.mark.promise("compare-plot")
@pytest.mark.parametrize("with_standard", [True, False], ids=["standard", "no-standard"])
def test_plot_starts_at_zero_shows_ties_and_no_labels_overlap(with_standard, tmp_path):
    methods = ["standard", "rapt", "rapt-embedding", "smart", "r3f"][0 if with_standard else 1 :]
    runs = []
    for seed in range(4):
        for i, m in enumerate(methods):
            # Seeds 0-2 tie (the same accuracy): their crosses must not sit on one another.
            accuracy = 0.5 + (0.02 * i if seed < 3 else 0.01 * seed)
            runs.append(
                RunResult(m, seed, accuracy, accuracy, step_times=[1.0 + i / 3], predicted=[1, 1])
            )
    labels = {**training.METHODS, "rapt-embedding": "RAPT (Embedding), a long label"}
    rows = report.summarize(runs, methods, labels)
    reference = labels[methods[0]]
    fig = report.summary_figure(rows, "title", reference, baseline=0.33)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    accuracy, paired, timing = fig.axes
    assert accuracy.get_xlim() == (0.0, 100.0)
    assert timing.get_xlim()[0] == 0.0
    for ax in fig.axes:
        assert not _overlapping(ax.get_xticklabels(), renderer)
        assert not _overlapping(ax.get_yticklabels(), renderer)
    figure_box = fig.bbox
    for label in accuracy.get_yticklabels():
        box = label.get_window_extent(renderer)
        assert box.x0 >= figure_box.x0 and not box.overlaps(accuracy.get_window_extent(renderer))
    crosses = [line for line in paired.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == len(methods) - 1
    for line in crosses:
        xs, ys = line.get_xdata(), line.get_ydata()
        tied = [y for x, y in zip(xs, ys) if x == xs[0]]
        assert len(tied) == 3 and len(set(tied)) == 3  # side by side, not stacked
    assert f"{reference}: the reference" in [t.get_text() for t in paired.texts]
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.promise("compare-help")
def test_help_reads_right(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "95% interval" in text and "%%" not in text
    assert "(default: standard,rapt)" in text and "['standard" not in text
    assert text.index("--data") < text.index("--methods") < text.index("--steps")
    assert "data (--data is required)" in text
    assert "examples:\n  rapt-reg compare --data reviews.csv --seeds 10" in text
    assert "--max-layer 0,1,2,3,6" in text
    err = _parser_refused(["--steps", "3"], capsys)
    assert err == "error: the following arguments are required: --data; see rapt-reg compare --help"
