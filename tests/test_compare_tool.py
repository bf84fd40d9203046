"""rapt-reg compare: readers, checks, statistics, and whole runs on a tiny random BERT."""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from rapt_reg import RaptRegError
from rapt_reg.compare import cli, report, training
from rapt_reg.compare import data as textdata
from rapt_reg.compare.training import CompareConfig, RunResult

pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("single_thread")

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT classifier and its tokenizer, saved to a folder (from a config)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    config = BertConfig(
        vocab_size=15,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = root / "model"
    BertForSequenceClassification(config).save_pretrained(model)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model)
    return {"model": str(model), "data": str(_write_csv(root / "data.csv", _rows()))}


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


# --------------------------------------------------------------------------- whole runs


@pytest.mark.promise("compare-tool", "compare-results-json")
def test_end_to_end_writes_table_json_and_plot(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    methods = "standard,rapt,rapt-embedding,smart,r3f"
    assert cli.main(_args(tiny, out, "--methods", methods, "--seeds", "2")) == 0
    printed = capsys.readouterr().out
    assert "| RAPT |" in printed and "| R3F |" in printed
    assert "RAPT: " in printed and "over standard" in printed
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "| Standard |" in markdown and "95% interval" in markdown
    payload = json.loads((out / "results.json").read_text())
    assert payload["complete"] and payload["seeds_done"] == [0, 1]
    assert "load_average" in payload["environment"]
    assert list(payload["methods"]) == methods.split(",")
    for entry in payload["methods"].values():
        assert len(entry["accuracy"]) == 2
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"])
        assert all(0.0 <= f <= 1.0 for f in entry["macro_f1"])
    assert "standard" not in payload["paired"]
    for name in methods.split(",")[1:]:
        paired = payload["paired"][name]
        low, high = paired["ci95"]
        assert low <= paired["delta"] <= high
        accuracy, base = payload["methods"][name]["accuracy"], payload["methods"]["standard"]
        assert paired["delta"] == pytest.approx(
            sum(a - b for a, b in zip(accuracy, base["accuracy"])) / 2
        )
        assert paired["wins"] + paired["ties"] + paired["losses"] == 2
        assert paired["time_ratio"] > 0
        assert paired["verdict"].startswith(training.METHODS[name] + ": ")
    runs = payload["runs"]
    assert [(r["seed"], r["method"]) for r in runs][:2] == [(0, "standard"), (0, "rapt")]
    assert all(len(r["step_times"]) == 2 for r in runs)
    assert all(len(r["penalties"]) == 2 for r in runs if r["method"] != "standard")


@pytest.mark.promise("compare-progress")
def test_progress_bars_per_seed(tiny, tmp_path, capsys):
    argv = [a for a in _args(tiny, tmp_path / "out", "--seeds", "2") if a != "--no-progress"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    for seed in (0, 1):
        assert f"seed {seed} train" in err and f"seed {seed} eval" in err


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
    tokenizer, load = training.load_model(config, 3)
    runs = training.run_comparison(config, prepared, tokenizer, load, log=lambda _: None)
    first = {r.method: r.losses[0] for r in runs}
    assert len(set(first.values())) == 1, first
    alone = training.run_comparison(
        CompareConfig(**{**config.__dict__, "methods": ("standard",)}),
        prepared,
        tokenizer,
        load,
        log=lambda _: None,
    )
    assert alone[0].losses == runs[0].losses
    assert alone[0].accuracy == runs[0].accuracy


@pytest.mark.promise("compare-resume", "compare-seeds")
def test_rerun_resumes_and_a_changed_configuration_starts_afresh(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(tiny, out, "--seeds", "2")) == 0
    before = json.loads((out / "results.json").read_text())
    capsys.readouterr()

    assert cli.main(_args(tiny, out, "--seeds", "3", "--threads", "1")) == 0
    printed = capsys.readouterr().out
    assert "seeds 0, 1 already done" in printed
    assert "seed 2:" in printed and "seed 0:" not in printed
    after = json.loads((out / "results.json").read_text())
    assert after["seeds_done"] == [0, 1, 2]
    assert after["methods"]["rapt"]["accuracy"][:2] == before["methods"]["rapt"]["accuracy"]

    assert cli.main(_args(tiny, out, "--seeds", "1", "--lr", "0.001")) == 0
    printed = capsys.readouterr().out
    assert "different configuration (changed: lr)" in printed and "starting afresh" in printed
    assert "seed 0:" in printed
    assert json.loads((out / "results.json").read_text())["seeds_done"] == [0]


@pytest.mark.promise("compare-resume")
def test_each_seed_is_saved_at_once_and_an_interrupted_run_continues(
    tiny, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    real, calls = training._train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) > 4:  # 2 methods x 2 steps: seed 0 finishes, seed 1 breaks
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(training, "_train_step", step)
    with pytest.raises(KeyboardInterrupt):
        cli.main(_args(tiny, out, "--seeds", "2"))
    saved = json.loads((out / "results.json").read_text())
    assert not saved["complete"] and saved["seeds_done"] == [0]
    assert len(saved["methods"]["standard"]["accuracy"]) == 1
    assert not (out / "results.md").exists()

    monkeypatch.setattr(training, "_train_step", real)
    capsys.readouterr()
    assert cli.main(_args(tiny, out, "--seeds", "2")) == 0
    assert "seeds 0 already done" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["complete"]


# --------------------------------------------------------------------------- bad input


def _refused(tiny, tmp_path, capsys, *args, data=None, model=None):
    out = tmp_path / "refused"
    argv = _args(
        {"data": str(data or tiny["data"]), "model": str(model or tiny["model"])}, out, *args
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not out.exists(), "a refused run must leave nothing in --out"
    return err


@pytest.mark.promise("compare-refusals")
def test_missing_column_names_file_line_and_flag(tiny, tmp_path, capsys):
    data = _write_csv(tmp_path / "d.csv", _rows(), header=("sentence", "label"))
    err = _refused(tiny, tmp_path, capsys, data=data)
    assert "d.csv: line 2 has no column 'text'" in err and "--text-column" in err
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
    assert "t.csv: line 3 has the label 'weird'" in err and "never has" in err


@pytest.mark.promise("compare-refusals")
def test_empty_text_names_its_line(tiny, tmp_path, capsys):
    rows = _rows()
    rows[4] = ("   ", rows[4][1])
    err = _refused(tiny, tmp_path, capsys, data=_write_csv(tmp_path / "d.csv", rows))
    assert "d.csv: line 6: the text ('text') is empty" in err


@pytest.mark.promise("compare-reads-formats", "compare-refusals")
def test_invalid_utf8_names_the_line_and_encoding_reads_it(tiny, tmp_path, capsys):
    rows = _rows()
    data = _write_csv(tmp_path / "d.csv", rows)
    raw = data.read_bytes().replace(b"actor", b"act\xa3r", 1)
    data.write_bytes(raw)
    line = raw[: raw.index(b"\xa3")].count(b"\n") + 1
    err = _refused(tiny, tmp_path, capsys, data=data)
    assert f"d.csv: line {line} is not valid utf-8" in err and "--encoding" in err
    corpus = textdata.read_table(data, encoding="cp1252")
    assert any("act£r" in t for t in corpus.texts)
    err = _refused(tiny, tmp_path, capsys, "--encoding", "no-such-codec", data=data)
    assert "unknown encoding 'no-such-codec'" in err


@pytest.mark.promise("compare-refusals")
def test_model_folder_that_does_not_load(tiny, tmp_path, capsys):
    err = _refused(tiny, tmp_path, capsys, model=tmp_path / "nowhere")
    assert "nowhere does not exist" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    err = _refused(tiny, tmp_path, capsys, model=broken)
    assert "broken does not load" in err and "save_pretrained" in err


@pytest.mark.promise("compare-refusals")
def test_unknown_method_is_refused(tiny, tmp_path, capsys):
    err = _refused(tiny, tmp_path, capsys, "--methods", "standard,rapt,fgm")
    assert "unknown method 'fgm'" in err and "r3f" in err


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
    assert done.stderr.strip().startswith("error: unknown method 'fgm'")
    assert not (tmp_path / "out").exists()


@pytest.mark.promise("compare-splits", "compare-refusals")
def test_too_few_examples_for_few_shot(tiny, tmp_path, capsys):
    err = _refused(tiny, tmp_path, capsys, "--train-per-class", "12")
    assert "--train-per-class 12" in err and "has 12 examples" in err


@pytest.mark.promise("compare-refusals")
def test_refusal_does_not_touch_a_previous_results_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(tiny, out, "--seeds", "1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(_args(tiny, out, "--methods", "nope")) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --------------------------------------------------------------------------- readers


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
    with pytest.raises(RaptRegError, match="line 2 is not valid JSON"):
        textdata.read_table(bad)
    with pytest.raises(RaptRegError, match="unknown file type '.xlsx'"):
        textdata.read_table(tmp_path / "d.xlsx")
    multi = _write_csv(tmp_path / "m.csv", [("one\nline two", "pos"), ("", "neg")])
    with pytest.raises(RaptRegError, match="line 4: the text"):
        textdata.read_table(multi)  # the second row starts on line 4, after a two-line field


@pytest.mark.promise("compare-refusals")
def test_empty_file_in_a_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text(" \n")
    with pytest.raises(RaptRegError, match=r"1.txt: the file is empty"):
        textdata.read_folder(tmp_path)


@pytest.mark.promise("compare-splits")
def test_test_file_splits(tmp_path):
    train = _write_csv(tmp_path / "train.csv", _rows(30))
    test = _write_csv(tmp_path / "test.csv", _rows(12, seed=1))
    config = CompareConfig(data=str(train), test=str(test), seeds=(0, 1))
    prepared = training.prepare_data(config)
    assert prepared.splits[0] == (list(range(30)), list(range(12)))
    assert prepared.heldout().origin == str(test)
    few = training.prepare_data(CompareConfig(**{**config.__dict__, "train_per_class": 10}))
    assert len(few.splits[0][0]) == 30  # a class may give all its examples to training
    drawn = training.prepare_data(CompareConfig(**{**config.__dict__, "eval_size": 5}))
    assert len(drawn.splits[0][1]) == 5 and drawn.splits[0][1] != drawn.splits[1][1]


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


# --------------------------------------------------------------------------- statistics


@pytest.mark.promise("compare-report")
def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    assert report.bootstrap_interval([0.02] * 5) == pytest.approx((0.02, 0.02))
    values = [0.01, -0.02, 0.03, 0.0, 0.015]
    low, high = report.bootstrap_interval(values)
    assert low < sum(values) / 5 < high
    assert min(values) <= low and high <= max(values)
    assert report.bootstrap_interval(values) == (low, high)
    assert report.bootstrap_interval([0.0, 0.0, 0.0, 1.0])[1] > 0.5


def _runs(deltas, ratio=1.5):
    runs = []
    for seed, delta in enumerate(deltas):
        runs.append(RunResult("standard", seed, 0.8, 0.7, step_times=[1.0]))
        runs.append(RunResult("rapt", seed, 0.8 + delta, 0.7 + delta, step_times=[ratio]))
    return runs


@pytest.mark.promise("compare-report")
@pytest.mark.parametrize(
    ("deltas", "finding"),
    [
        ([0.01, 0.02, 0.015, 0.01, 0.02], "better than standard at 5 seeds"),
        ([-0.01, -0.02, -0.015], "worse than standard at 3 seeds"),
        ([0.01, -0.01, 0.02, -0.02], "not distinguishable from standard at 4 seeds"),
        ([0.01], "one seed gives no interval"),
    ],
)
def test_verdicts(deltas, finding):
    rows = report.summarize(_runs(deltas), ["standard", "rapt"])
    sentence = report.verdict(rows[1])
    assert sentence.startswith("RAPT: ") and finding in sentence
    assert "1.5× the time per step" in sentence


@pytest.mark.promise("compare-report")
def test_table_from_known_results():
    rows = report.summarize(_runs([0.01, 0.03]), ["standard", "rapt", "smart"])
    assert [r.method for r in rows] == ["standard", "rapt"]
    p = rows[1].paired
    assert p.delta == pytest.approx(0.02) and (p.wins, p.ties, p.losses) == (2, 0, 0)
    table = report.format_table(rows, f1=True)
    assert (
        table.splitlines()[2] == "| Standard | 80.0 ± 0.0 | 70.0 ± 0.0 | – | – | 1000 ± 0 | 1.00 |"
    )
    assert (
        "| RAPT | 82.0 ± 1.4 | 72.0 ± 1.4 | +2.0 (+1.0 to +3.0) | 2 / 0 / 0 | 1500 ± 0 | 1.50 |"
        in table
    )


def test_signed_points_never_show_minus_zero():
    assert [report._signed(x) for x in (-0.04, 0.04, -0.06, 1.25)] == [
        "+0.0",
        "+0.0",
        "\u22120.1",
        "+1.2",
    ]


@pytest.mark.promise("compare-report")
def test_macro_f1_and_unbalanced():
    import torch

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
    _, load = training.load_model(config, 5)
    model = load(0)
    assert saved.classifier.out_features == 2 and model.classifier.out_features == 5
    for name, value in saved.bert.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], value), name
