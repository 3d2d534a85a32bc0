import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fibec.data import (
    SHARED_DATASETS,
    TextClassificationData,
    default_task,
    dirichlet_partition,
    load_hf_dataset,
    load_shared,
    load_table,
    make_batches,
    model_inputs,
    shortest_first,
    token_lengths,
    train_test_split,
)

SHARED_ROOT = Path(os.environ.get("FIBEC_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED_ROOT.is_dir(), reason=f"shared data folder {SHARED_ROOT} absent")

ROWS = [
    {"text": 'he said "hi", then left', "other": "a pair, with comma", "label": "pos"},
    {"text": "plain\ttext", "other": "second", "label": "neg"},
    {"text": "third one", "other": "third pair", "label": "pos"},
]


def write_table(path: Path, fmt: str, rows=ROWS) -> Path:
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        return path
    import csv
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t",
                                quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_load_table_reads_texts_pairs_and_sorted_string_labels(tmp_path, fmt):
    data = load_table(write_table(tmp_path / f"d.{fmt}", fmt), text_column="text", label_column="label",
                      text_pair_column="other")
    assert data.texts == [r["text"] for r in ROWS]
    assert data.text_pairs == [r["other"] for r in ROWS]
    assert data.label_names == ["neg", "pos"]
    assert data.labels == [1, 0, 1]
    assert len(data) == 3


def test_load_table_keeps_integer_labels_and_format_overrides_extension(tmp_path):
    rows = [{"s": "a", "y": 2}, {"s": "b", "y": 0}]
    path = write_table(tmp_path / "data.txt", "jsonl", rows)
    data = load_table(path, text_column="s", label_column="y", format="jsonl")
    assert data.labels == [2, 0]
    assert data.label_names == ["0", "1", "2"]
    assert data.text_pairs is None


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
@pytest.mark.parametrize("arg", ["text_column", "label_column", "text_pair_column"])
def test_load_table_missing_column_names_it_and_lists_available(tmp_path, fmt, arg):
    path = write_table(tmp_path / f"d.{fmt}", fmt)
    kwargs = {"text_column": "text", "label_column": "label", "text_pair_column": "other", arg: "nope"}
    with pytest.raises(ValueError, match=rf"{arg}.*'nope'.*text.*other.*label"):
        load_table(path, **kwargs)


def test_load_table_rejects_empty_labels(tmp_path):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": ""}]
    with pytest.raises(ValueError, match="empty"):
        load_table(write_table(tmp_path / "d.csv", "csv", rows), text_column="text", label_column="label")


def test_load_table_rejects_unknown_extension(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match="format"):
        load_table(path, text_column="t", label_column="l")


# ---- Hugging Face datasets ----------------------------------------------------------------------
@pytest.fixture
def hf():
    return pytest.importorskip("datasets")


def hf_split(hf, rows: dict[str, list], label_names: list[str] | None = None):
    """A datasets.Dataset of `rows`; the "label" column is a ClassLabel when label_names are given."""
    features = {k: hf.Value("string") for k in rows}
    if label_names is not None:
        features["label"] = hf.ClassLabel(names=label_names)
    return hf.Dataset.from_dict(rows, features=hf.Features(features))


def saved(dataset, path: Path) -> Path:
    dataset.save_to_disk(str(path))
    return path


def test_hf_dataset_folder_without_class_label_maps_labels_like_tables(hf, tmp_path):
    rows = {"text": ["great", "awful", "fine"], "label": ["pos", "neg", "pos"]}
    train, test = load_hf_dataset(saved(hf_split(hf, rows), tmp_path / "reviews"), text_column="text",
                                  label_column="label")
    assert test is None
    assert (train.texts, train.labels, train.label_names, train.text_pairs) == (rows["text"], [1, 0, 1],
                                                                                ["neg", "pos"], None)
    assert train.name == "reviews"


def test_hf_dataset_class_label_gives_ids_and_names(hf, tmp_path):
    rows = {"text": ["great", "awful", "meh"], "label": [0, 1, 2]}
    train, _ = load_hf_dataset(saved(hf_split(hf, rows, ["pos", "neg", "mixed"]), tmp_path / "d"),
                               text_column="text", label_column="label")
    assert (train.labels, train.label_names) == ([0, 1, 2], ["pos", "neg", "mixed"])


@pytest.mark.parametrize("class_label", [True, False], ids=["class-label", "string-labels"])
def test_hf_dataset_dict_gives_train_and_test_with_the_same_label_ids(hf, tmp_path, class_label):
    names = ["neg", "pos"]
    train_labels, test_labels = ["pos", "neg", "pos"], ["pos"]  # test alone would map "pos" to 0

    def split(texts, labels):
        label_values = [names.index(y) for y in labels] if class_label else labels
        return hf_split(hf, {"text": texts, "label": label_values}, names if class_label else None)

    folder = saved(hf.DatasetDict(train=split(["a", "b", "c"], train_labels), test=split(["d"], test_labels),
                                  validation=split(["e"], ["neg"])), tmp_path / "dd")
    train, test = load_hf_dataset(folder, text_column="text", label_column="label")
    assert (train.texts, train.labels, train.label_names) == (["a", "b", "c"], [1, 0, 1], names)
    assert (test.texts, test.labels, test.label_names) == (["d"], [1], names)


def test_hf_sentence_pairs_and_a_named_split(hf, tmp_path):
    rows = {"premise": ["a cat sleeps", "it rains"], "hypothesis": ["an animal rests", "it is dry"],
            "label": [0, 1]}
    pairs = hf_split(hf, rows, ["entailment", "contradiction"])
    folder = saved(hf.DatasetDict(validation=pairs), tmp_path / "nli")
    train, test = load_hf_dataset(folder, text_column="premise", text_pair_column="hypothesis",
                                  label_column="label", split="validation")
    assert test is None
    assert (train.texts, train.text_pairs, train.labels) == (rows["premise"], rows["hypothesis"], [0, 1])
    assert train.label_names == ["entailment", "contradiction"]


@pytest.mark.parametrize("arg", ["text_column", "label_column", "text_pair_column"])
def test_hf_dataset_missing_column_names_the_argument_and_lists_columns(hf, tmp_path, arg):
    folder = saved(hf_split(hf, {"text": ["a"], "other": ["b"], "label": ["x"]}), tmp_path / "d")
    kwargs = {"text_column": "text", "label_column": "label", "text_pair_column": "other", arg: "nope"}
    with pytest.raises(ValueError, match=rf"{arg}: column 'nope' not in d; available columns: \['text', 'other', 'label'\]"):
        load_hf_dataset(folder, **kwargs)


@pytest.mark.parametrize(("layout", "split", "message"), [
    ("dict-without-train", None, r"split: .* no 'train' split \(splits: \['validation'\]\)"),
    ("dict-without-train", "test", r"split: .* no split 'test'; available splits: \['validation'\]"),
    ("single-dataset", "train", "split: .* single Dataset"),
])
def test_hf_dataset_split_that_is_not_there_is_named(hf, tmp_path, layout, split, message):
    data = hf_split(hf, {"text": ["a"], "label": ["x"]})
    folder = saved(hf.DatasetDict(validation=data) if layout == "dict-without-train" else data, tmp_path / "d")
    with pytest.raises(ValueError, match=message):
        load_hf_dataset(folder, text_column="text", label_column="label", split=split)


def test_hf_dataset_unlabelled_test_split_is_refused(hf, tmp_path):
    labelled = hf_split(hf, {"text": ["a", "b"], "label": [0, 1]}, ["neg", "pos"])
    hidden = hf_split(hf, {"text": ["c"], "label": [-1]}, ["neg", "pos"])
    folder = saved(hf.DatasetDict(train=labelled, test=hidden), tmp_path / "glue")
    with pytest.raises(ValueError, match="label_column: the test split of glue has unlabelled samples"):
        load_hf_dataset(folder, text_column="text", label_column="label")


def test_hf_folder_not_written_by_save_to_disk_is_refused(hf, tmp_path):
    with pytest.raises(FileNotFoundError, match="source: .* not written by Dataset.save_to_disk"):
        load_hf_dataset(tmp_path, text_column="text", label_column="label")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (else it goes online)")
def test_hf_hub_name_offline_fails_at_once_with_the_reason(hf):
    with pytest.raises(ConnectionError, match="source: 'fibec-tests/no-such-dataset' is not a folder here .* offline"):
        load_hf_dataset("fibec-tests/no-such-dataset", text_column="text", label_column="label")


def test_hf_loader_without_datasets_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"pip install fibec\[datasets\]"):
        load_hf_dataset(tmp_path, text_column="text", label_column="label")


def test_subset_keeps_order_and_all_fields():
    data = TextClassificationData(["a", "b", "c"], [0, 1, 0], ["x", "y"], ["A", "B", "C"], name="n",
                                  groups=["easy", "hard", "easy"])
    sub = data.subset([2, 0])
    assert (sub.texts, sub.labels, sub.text_pairs, sub.groups, sub.name) == (["c", "a"], [0, 0], ["C", "A"],
                                                                              ["easy", "easy"], "n")
    with pytest.raises(ValueError, match="indices"):
        data.subset([3])
    with pytest.raises(ValueError, match="indices"):
        data.subset([-1])
    with pytest.raises(ValueError, match="labels"):
        TextClassificationData(["a"], [2], ["x", "y"])


# Expected (train, test) sizes and classes, from each folder's SOURCE.txt.
SHARED_EXPECTED = {
    "sst2": (60614, 872, 2, False), "ag_news": (10001, 7600, 4, False), "trec": (5452, 500, 6, False),
    "sms_spam": (4459, 1115, 2, False), "rte": (1244, 1384, 2, True), "snli": (9842, 9824, 3, True),
    "mr": (8530, 2132, 2, False), "subj": (8000, 2000, 2, False),
    "uci_sentiment_sentences": (2400, 600, 2, False), "reuters_r8": (5485, 2189, 8, False),
    "20newsgroups": (6022, 1506, 20, False),
}


@needs_shared
@pytest.mark.parametrize("name", SHARED_DATASETS)
def test_load_shared_sizes_and_label_counts_match_source(name):
    train, test = load_shared(name, root=SHARED_ROOT)
    n_train, n_test, n_classes, pairs = SHARED_EXPECTED[name]
    assert len(train) + len(test) == n_train + n_test
    assert abs(len(train) - n_train) <= 1
    assert train.label_names == test.label_names and len(train.label_names) == n_classes
    assert all(c > 0 for c in train.label_counts())
    assert (train.text_pairs is not None) == pairs
    assert all(t.strip() for t in train.texts + test.texts)


@needs_shared
def test_load_shared_parses_known_rows():
    trec_train, trec_test = load_shared("trec", root=SHARED_ROOT)
    assert trec_train.texts[0] == "How did serfdom develop in and then leave Russia ?"
    assert trec_train.label_names[trec_train.labels[0]] == "DESC"
    assert Counter(trec_test.labels)[trec_test.label_names.index("NUM")] == 113
    ag_train, _ = load_shared("ag_news", root=SHARED_ROOT)
    assert ag_train.label_counts() == [2496, 2538, 2458, 2509]  # Business, Sci/Tech, Sports, World
    sms_train, sms_test = load_shared("sms_spam", root=SHARED_ROOT)
    assert sum(sms_train.label_counts()) + sum(sms_test.label_counts()) == 5574
    assert sms_train.label_counts()[1] + sms_test.label_counts()[1] == 747
    _, sst_test = load_shared("sst2", root=SHARED_ROOT)
    assert sst_test.texts[0] == "it 's a charming and often affecting journey ."
    assert sst_test.label_counts() == [428, 444]


def test_load_shared_unknown_name_lists_known():
    with pytest.raises(ValueError, match="sst2.*") as err:
        load_shared("imagenet")
    assert "imagenet" in str(err.value) and all(n in str(err.value) for n in SHARED_DATASETS)


def test_default_task_is_deterministic_balanced_and_has_all_groups():
    train, test = default_task(seed=3, n_train=300, n_test=90)
    again, _ = default_task(seed=3, n_train=300, n_test=90)
    other, _ = default_task(seed=4, n_train=300, n_test=90)
    assert (train.texts, train.labels) == (again.texts, again.labels)
    assert train.texts != other.texts
    assert (len(train), len(test)) == (300, 90)
    assert train.label_counts() == [150, 150] and test.label_counts() == [45, 45]
    for group in ("easy", "medium", "hard"):
        labels = [y for y, g in zip(train.labels, train.groups) if g == group]
        assert len(labels) == 100 and sum(labels) == 50
    hard = [t for t, g in zip(train.texts, train.groups) if g == "hard"]
    assert any(" not " in t for t in hard) and any(" but " in t for t in hard)
    # The easy group is short, the others are longer on average: the spread the curriculum orders.
    mean_words = {g: np.mean([len(t.split()) for t, gg in zip(train.texts, train.groups) if gg == g])
                  for g in ("easy", "medium", "hard")}
    assert mean_words["easy"] < 5 < mean_words["medium"]


def _balanced_in_every_group(data: TextClassificationData) -> bool:
    counts = Counter(zip(data.groups, data.labels))
    return (data.label_counts()[0] == data.label_counts()[1]
            and all(counts[group, 0] == counts[group, 1] > 0 for group in ("easy", "medium", "hard")))


@pytest.mark.parametrize(("n_train", "n_test"), [(360, 200), (1200, 400)])
@pytest.mark.parametrize("seed", range(10))
def test_default_task_test_sentences_are_never_training_sentences(seed, n_train, n_test):
    train, test = default_task(seed, n_train=n_train, n_test=n_test)

    def key(text: str) -> str:
        return " ".join(text.split()).lower()

    assert not {key(t) for t in test.texts} & {key(t) for t in train.texts}
    assert (len(train), len(test)) == (n_train, n_test)
    assert _balanced_in_every_group(train) and _balanced_in_every_group(test)
    again = default_task(seed, n_train=n_train, n_test=n_test)[1]
    assert (again.texts, again.labels, again.groups) == (test.texts, test.labels, test.groups)


def test_default_task_larger_than_its_templates_is_an_error():
    with pytest.raises(ValueError, match="easy .* templates .* lower n_train or n_test"):
        default_task(0, n_train=30000, n_test=400)


def test_default_task_labels_follow_the_deciding_cue():
    from fibec import data as d
    train, _ = default_task(seed=0, n_train=600, n_test=2)
    for text, label, group in zip(train.texts, train.labels, train.groups):
        if group == "easy":
            assert any(w in text for w in d._STRONG[label]) and not any(w in text for w in d._STRONG[1 - label])
        if group == "hard" and " but in the end " in text:
            tail = text.split(" but in the end ")[1]
            assert any(w in tail for w in d._WEAK[label])


def test_train_test_split_is_stratified_disjoint_and_seeded():
    data = TextClassificationData([str(i) for i in range(100)], [0] * 80 + [1] * 20, ["a", "b"])
    train, test = train_test_split(data, 0.25, seed=1)
    assert sorted(train.texts + test.texts, key=int) == data.texts
    assert test.label_counts() == [20, 5]
    assert train_test_split(data, 0.25, seed=1)[1].texts == test.texts
    assert train_test_split(data, 0.25, seed=2)[1].texts != test.texts
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(data, 1.0, seed=0)


def skew(parts, labels):
    """Mean total-variation distance between each client's label distribution and the global one."""
    labels = np.asarray(labels)
    glob = np.bincount(labels) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=len(glob)) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))


@pytest.mark.parametrize("num_clients,alpha,min_size", [(1, 1.0, 1), (7, 0.3, 5), (10, 0.05, 10), (3, 100.0, 1)])
def test_dirichlet_partition_covers_every_index_once_and_respects_min_size(num_clients, alpha, min_size):
    labels = np.random.default_rng(0).integers(0, 4, 503)
    parts = dirichlet_partition(labels, num_clients, alpha, min_size=min_size, seed=5)
    assert len(parts) == num_clients
    assert sorted(i for p in parts for i in p) == list(range(503))
    assert min(len(p) for p in parts) >= min_size
    assert parts == dirichlet_partition(labels.tolist(), num_clients, alpha, min_size=min_size, seed=5)


def test_dirichlet_partition_rebalances_when_draws_keep_failing():
    labels = [0] * 30
    parts = dirichlet_partition(labels, 6, 0.01, min_size=5, seed=0, max_tries=1)
    assert sorted(len(p) for p in parts) == [5] * 6
    assert sorted(i for p in parts for i in p) == list(range(30))


def test_dirichlet_partition_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(5), 200)
    skews = [np.mean([skew(dirichlet_partition(labels, 10, a, seed=s), labels) for s in range(3)])
             for a in (100.0, 1.0, 0.05)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


@pytest.mark.parametrize("kwargs,arg", [({"num_clients": 0}, "num_clients"), ({"alpha": 0.0}, "alpha"),
                                        ({"min_size": 30}, "min_size"), ({"alpha": float("nan")}, "alpha")])
def test_dirichlet_partition_rejects_bad_arguments(kwargs, arg):
    args = {"num_clients": 4, "alpha": 0.5, "min_size": 1} | kwargs
    with pytest.raises(ValueError, match=arg):
        dirichlet_partition([0, 1] * 50, args.pop("num_clients"), args.pop("alpha"), **args)


def test_make_batches_pads_dynamically_and_carries_index(tokenizer):
    data = TextClassificationData(["short", "a much longer sentence with many more words in it", "mid size one"],
                                  [0, 1, 1], ["a", "b"])
    batches = list(make_batches(data, tokenizer, [2, 0, 1], 2, max_length=8))
    assert [b["index"].tolist() for b in batches] == [[2, 0], [1]]
    first, second = batches
    assert first["input_ids"].dtype == torch.long and first["labels"].tolist() == [1, 0]
    assert first["input_ids"].shape[1] == first["attention_mask"].sum(1).max() == 5  # [CLS] mid size one [SEP]
    assert first["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert (first["input_ids"][1, 3:] == tokenizer.pad_token_id).all()
    assert second["input_ids"].shape == (1, 8)  # truncated to max_length
    assert "index" not in model_inputs(first) and "labels" in model_inputs(first)


def test_make_batches_tokenises_pairs_and_caches(tokenizer):
    data = TextClassificationData(["the premise", "another premise"], [0, 1], ["a", "b"], ["a hypothesis", "h"])
    (batch,) = make_batches(data, tokenizer, None, 4, max_length=32)
    assert batch["token_type_ids"][0].max() == 1  # the second segment is marked
    decoded = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert decoded == "the premise a hypothesis"
    assert len(data._token_cache) == 1
    list(make_batches(data, tokenizer, [1], 1, max_length=32, shuffle=True, seed=1))
    assert len(data._token_cache) == 1


def test_make_batches_shuffle_is_seeded(tokenizer):
    data, _ = default_task(seed=0, n_train=40, n_test=2)
    order = lambda s: [i for b in make_batches(data, tokenizer, None, 7, max_length=16, shuffle=True, seed=s)  # noqa: E731
                       for i in b["index"].tolist()]
    assert order(1) == order(1) != order(2)
    assert sorted(order(1)) == list(range(40))


def test_token_lengths_count_tokens_after_truncation_and_shortest_first_keeps_ties_in_data_order(tokenizer):
    texts = ["a much longer sentence with many more words in it", "mid size one", "short", "one two three",
             "tiny", "again a very long sentence that goes past the limit"]
    data = TextClassificationData(texts, [0, 1, 0, 1, 0, 1], ["a", "b"])
    lengths = token_lengths(data, tokenizer, max_length=8)
    one_by_one = [int(b["attention_mask"].sum()) for b in make_batches(data, tokenizer, None, 1, max_length=8)]
    assert lengths.tolist() == one_by_one == [8, 5, 3, 5, 3, 8]
    assert shortest_first(data, tokenizer, max_length=8).tolist() == [2, 4, 1, 3, 0, 5]
