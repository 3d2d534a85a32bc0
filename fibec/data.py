"""Text classification data for fibec: tables, the shared corpora, the built-in task, partitions, batches.

Everything here is engine-free and deterministic for a seed. A dataset is a `TextClassificationData`
(texts, integer labels, label names, optional second text for sentence pairs); clients get index
lists from `dirichlet_partition` and turn them into tokenised, dynamically padded batches with
`make_batches`, whose dicts carry the dataset positions under "index" so that per-sample scores can be
written back where they belong.
"""
from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from ._checks import check_int, check_number

__all__ = [
    "TextClassificationData",
    "load_table",
    "load_hf_dataset",
    "load_shared",
    "SHARED_DATASETS",
    "default_task",
    "dirichlet_partition",
    "train_test_split",
    "make_batches",
    "model_inputs",
    "token_lengths",
    "shortest_first",
    "sentence_key",
    "stratified_holdout",
]


@dataclass
class TextClassificationData:
    """A labelled text classification dataset.

    texts[i] (and text_pairs[i] for sentence-pair tasks) has label id labels[i] in
    range(len(label_names)). `groups`, when known (the built-in task), names each sample's
    difficulty group ("easy", "medium", "hard"); it is metadata only and never used in training.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    text_pairs: list[str] | None = None
    name: str = ""
    groups: list[str] | None = None
    _token_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if len(self.labels) != n:
            raise ValueError(f"labels has {len(self.labels)} entries but texts has {n}")
        for other_name, other in (("text_pairs", self.text_pairs), ("groups", self.groups)):
            if other is not None and len(other) != n:
                raise ValueError(f"{other_name} has {len(other)} entries but texts has {n}")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"labels must lie in range({len(self.label_names)}) (label_names), got {bad[0]}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int]) -> TextClassificationData:
        """A new dataset holding the samples at `indices`, in that order (same label names)."""
        idx = [int(i) for i in indices]
        n = len(self)
        if any(not 0 <= i < n for i in idx):
            raise ValueError(f"indices must lie in range({n})")

        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in idx]

        return TextClassificationData(
            texts=pick(self.texts), labels=pick(self.labels), label_names=list(self.label_names),
            text_pairs=pick(self.text_pairs), name=self.name, groups=pick(self.groups),
        )

    def label_counts(self) -> list[int]:
        """Number of samples per label id."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.num_labels).tolist()


# ---- Tables: CSV / TSV / JSONL ------------------------------------------------------------------

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _labels_to_ids(raw: Sequence[object], name: str) -> tuple[list[int], list[str]]:
    """Map raw labels to ids: non-negative ints (or int strings) keep their value, others sort."""
    def as_int(v: object) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v.strip())
        return None

    ints = [as_int(v) for v in raw]
    if raw and all(i is not None and i >= 0 for i in ints):
        return ints, [str(i) for i in range(max(ints) + 1)]  # type: ignore[arg-type]
    if any(v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()) for v in raw):
        raise ValueError(f"{name}: label column has empty values")
    names = sorted({str(v).strip() for v in raw})
    lookup = {n: i for i, n in enumerate(names)}
    return [lookup[str(v).strip()] for v in raw], names


def _read_rows(path: Path, fmt: str) -> tuple[list[dict], list[str]]:
    if fmt == "jsonl":
        rows, columns = [], []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {line_no} is not a JSON object")
                columns.extend(k for k in row if k not in columns)
                rows.append(row)
        return rows, columns
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def load_table(
    path: str | os.PathLike,
    *,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    format: str | None = None,
) -> TextClassificationData:
    """Read a CSV (header row, RFC quoting), TSV (header row) or JSONL (one object per line) file.

    `format` is "csv", "tsv" or "jsonl"; None infers it from the extension (.csv, .tsv/.tab,
    .jsonl/.json). Labels that are all non-negative integers keep their value as the id
    (label_names = "0".."max"); any other labels are mapped to ids in sorted string order.
    A missing column raises ValueError naming it and listing the available columns.
    """
    path = Path(path)
    if format is None:
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"format: cannot infer from extension {path.suffix!r} of {path}; "
                             f"pass format='csv', 'tsv' or 'jsonl'")
    elif format in ("csv", "tsv", "jsonl"):
        fmt = format
    else:
        raise ValueError(f"format must be 'csv', 'tsv', 'jsonl' or None, got {format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {path}")
    rows, columns = _read_rows(path, fmt)
    for arg, col in (("text_column", text_column), ("label_column", label_column),
                     ("text_pair_column", text_pair_column)):
        if col is not None and col not in columns:
            raise ValueError(f"{arg}: column {col!r} not in {path.name}; available columns: {columns}")
    if not rows:
        raise ValueError(f"{path}: no data rows")

    def text_of(row: dict, col: str, line: int) -> str:
        value = row.get(col)
        if value is None:
            raise ValueError(f"{path}: row {line} has no value in column {col!r}")
        return str(value)

    texts = [text_of(r, text_column, i + 1) for i, r in enumerate(rows)]
    pairs = None if text_pair_column is None else [text_of(r, text_pair_column, i + 1) for i, r in enumerate(rows)]
    labels, names = _labels_to_ids([r.get(label_column) for r in rows], str(path))
    return TextClassificationData(texts, labels, names, pairs, name=path.stem)


# ---- Hugging Face datasets --------------------------------------------------------------------------

def load_hf_dataset(
    source: str | os.PathLike,
    *,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    split: str | None = None,
) -> tuple[TextClassificationData, TextClassificationData | None]:
    """(train, test) from a Hugging Face dataset; test is None where the source has no test split.

    source: a folder written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`,
        else a dataset name on the Hugging Face Hub (`datasets.load_dataset`: needs network, or
        the dataset in the local HF cache; with HF_HUB_OFFLINE=1 anything else fails at once).
    split: None takes the "train" and "test" splits of a DatasetDict (test None if it has no
        "test"), or the one dataset a Dataset folder holds (test None). A split name (hub names
        may slice, e.g. "train[:1000]") takes that split alone as train, test None.
    Labels of a ClassLabel column keep their ids and names; any other labels go through the
    rules of `load_table` (non-negative integers keep their value, others sort), over train and
    test together so that both get the same ids. Callers split a train without test themselves
    (e.g. `train_test_split`). Needs the optional `datasets` package (`pip install fibec[datasets]`).
    """
    datasets = _import_datasets()
    loaded = _load_hf_source(source, split)
    name = Path(source).name if Path(source).is_dir() else str(source)
    if isinstance(loaded, datasets.Dataset):
        parts = {"train": loaded}
    elif split is None:
        if "train" not in loaded:
            raise ValueError(f"split: {name} has no 'train' split (splits: {list(loaded)}); name the one to load")
        parts = {key: loaded[key] for key in ("train", "test") if key in loaded}
    elif split in loaded:
        parts = {"train": loaded[split]}
    else:
        raise ValueError(f"split: {name} has no split {split!r}; available splits: {list(loaded)}")
    for part in parts.values():
        for arg, column in (("text_column", text_column), ("label_column", label_column),
                            ("text_pair_column", text_pair_column)):
            if column is not None and column not in part.column_names:
                raise ValueError(f"{arg}: column {column!r} not in {name}; available columns: {part.column_names}")

    label_feature = parts["train"].features[label_column]
    raw_labels = {key: list(part[label_column]) for key, part in parts.items()}
    if isinstance(label_feature, datasets.ClassLabel):
        label_names = list(label_feature.names)
        for key, labels in raw_labels.items():
            if any(y < 0 for y in labels):
                raise ValueError(f"label_column: the {key} split of {name} has unlabelled samples (label -1, as "
                                 "in hidden test sets); pass split= to load a labelled split")
        ids = raw_labels
    else:
        all_ids, label_names = _labels_to_ids(raw_labels["train"] + raw_labels.get("test", []), name)
        ids = {"train": all_ids[:len(raw_labels["train"])], "test": all_ids[len(raw_labels["train"]):]}

    def texts(part, column: str) -> list[str]:
        values = list(part[column])
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise ValueError(f"{name}: row {missing[0]} has no value in column {column!r}")
        return [str(v) for v in values]

    data = {key: TextClassificationData(texts(part, text_column), ids[key], label_names,
                                        None if text_pair_column is None else texts(part, text_pair_column),
                                        name=name)
            for key, part in parts.items()}
    return data["train"], data.get("test")


def _import_datasets() -> ModuleType:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("load_hf_dataset needs the datasets package: pip install fibec[datasets]") from err
    return datasets


def _load_hf_source(source: str | os.PathLike, split: str | None):
    """The datasets.Dataset or DatasetDict at `source`: a save_to_disk folder, else a hub dataset."""
    datasets = _import_datasets()
    folder = Path(source)
    if folder.is_dir():
        try:
            loaded = datasets.load_from_disk(str(folder))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"source: {folder} was not written by Dataset.save_to_disk or "
                                    f"DatasetDict.save_to_disk ({err})") from None
        if split is not None and isinstance(loaded, datasets.Dataset):
            raise ValueError(f"split: {folder} holds a single Dataset, not named splits; pass split=None")
        return loaded
    try:
        return datasets.load_dataset(str(source), split=split)
    except ConnectionError as err:
        raise ConnectionError(f"source: {str(source)!r} is not a folder here and the Hugging Face Hub cannot be "
                              f"reached for it ({err}); offline, only save_to_disk folders and datasets "
                              "already in the local HF cache load") from None
    except FileNotFoundError as err:
        raise FileNotFoundError(f"source: {str(source)!r} is neither a folder here nor a dataset on the "
                                f"Hugging Face Hub ({err})") from None


# ---- The shared corpora in ../shared/data --------------------------------------------------------

def _data_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    if os.environ.get("FIBEC_DATA_ROOT"):
        return Path(os.environ["FIBEC_DATA_ROOT"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    # Split on "\n" only: str.splitlines() also splits on U+0085 etc., which occur inside sentences.
    text = path.read_text(encoding=encoding)
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _tsv(path: Path, *, skip: int = 0, encoding: str = "utf-8") -> list[list[str]]:
    # Quoting off: stray double quotes in these files would otherwise merge rows.
    return [line.split("\t") for line in _lines(path, encoding)[skip:]]


def _named(texts: list[str], label_strings: list[str], names: list[str], name: str,
           pairs: list[str] | None = None) -> TextClassificationData:
    lookup = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(label_strings) - set(lookup))
    if unknown:
        raise ValueError(f"{name}: unexpected labels {unknown[:5]} (expected {names})")
    pairs = None if pairs is None else [p.strip() for p in pairs]
    return TextClassificationData([t.strip() for t in texts], [lookup[s] for s in label_strings], names, pairs,
                                  name=name)


def _sentence_label_tsv(path: Path, names: list[str], name: str, *, skip: int = 0,
                        label_first: bool = False) -> TextClassificationData:
    rows = _tsv(path, skip=skip)
    if label_first:
        return _named(["\t".join(r[1:]) for r in rows], [r[0] for r in rows], names, name)
    return _named(["\t".join(r[:-1]) for r in rows], [r[-1].strip() for r in rows], names, name)


def _two_files(files: dict[str, Path], name: str) -> TextClassificationData:
    """One sentence per line, the file gives the label (MR, SUBJ)."""
    names = sorted(files)
    texts, labels = [], []
    for label in names:
        lines = _lines(files[label], "latin-1")
        texts += lines
        labels += [label] * len(lines)
    return _named(texts, labels, names, name)


def _orange_tab(path: Path, name: str, names: list[str] | None = None) -> TextClassificationData:
    rows = _tsv(path, skip=3)  # 4 header lines, the blank 4th one is dropped by _lines
    label_strings = [r[0] for r in rows]
    return _named([r[1] for r in rows], label_strings, names or sorted(set(label_strings)), name)


def _load_sst2(d: Path):
    names = ["negative", "positive"]

    def load(f: str) -> TextClassificationData:
        rows = _tsv(d / f, skip=1)
        return _named([r[0] for r in rows], [names[int(r[1])] for r in rows], names, "sst2")

    return load("train.tsv"), load("test.tsv")


def _load_ag_news(d: Path):
    names = ["Business", "Sci/Tech", "Sports", "World"]
    return (_sentence_label_tsv(d / "dev.tsv", names, "ag_news"),
            _sentence_label_tsv(d / "test.tsv", names, "ag_news"))


def _load_trec(d: Path):
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

    def load(f: str, encoding: str) -> TextClassificationData:
        coarse, texts = [], []
        for line in _lines(d / f, encoding):
            label, _, question = line.partition(" ")
            coarse.append(label.split(":")[0])
            texts.append(question.strip())
        return _named(texts, coarse, names, "trec")

    return load("train_5500.label", "latin-1"), load("TREC_10.label", "latin-1")


def _load_sms_spam(d: Path):
    data = _sentence_label_tsv(d / "SMSSpamCollection", ["ham", "spam"], "sms_spam", skip=1, label_first=True)
    return train_test_split(data, 0.2, seed=0)


def _load_rte(d: Path):
    names = ["entailment", "not_entailment"]

    def load(f: str) -> TextClassificationData:
        rows = _tsv(d / f, skip=1)
        return _named([r[1] for r in rows], [r[3].strip() for r in rows], names, "rte", [r[2] for r in rows])

    return load("train.tsv"), load("test.tsv")


def _load_snli(d: Path):
    names = ["contradiction", "entailment", "neutral"]

    def load(split: str) -> TextClassificationData:
        s1, s2, y = (_lines(d / f"{p}.{split}") for p in ("s1", "s2", "labels"))
        if not len(s1) == len(s2) == len(y):
            raise ValueError(f"snli: {split} files are not line-aligned ({len(s1)}, {len(s2)}, {len(y)})")
        return _named(s1, [s.strip() for s in y], names, "snli", s2)

    return load("dev"), load("test")


def _load_mr(d: Path):
    data = _two_files({"negative": d / "rt-polarity.neg", "positive": d / "rt-polarity.pos"}, "mr")
    return train_test_split(data, 0.2, seed=0)


def _load_subj(d: Path):
    data = _two_files({"objective": d / "subj.objective", "subjective": d / "subj.subjective"}, "subj")
    return train_test_split(data, 0.2, seed=0)


def _load_uci(d: Path):
    names = ["negative", "positive"]
    texts, labels = [], []
    for f in ("amazon_cells_labelled.txt", "imdb_labelled.txt", "yelp_labelled.txt"):
        for row in _tsv(d / f):
            texts.append(row[0])
            labels.append(names[int(row[-1])])
    return train_test_split(_named(texts, labels, names, "uci_sentiment_sentences"), 0.2, seed=0)


def _load_reuters_r8(d: Path):
    train = _orange_tab(d / "reuters-r8-train.tab", "reuters_r8")
    return train, _orange_tab(d / "reuters-r8-test.tab", "reuters_r8", train.label_names)


def _load_20newsgroups(d: Path):
    return train_test_split(_orange_tab(d / "20newsgroups-test.tab", "20newsgroups"), 0.2, seed=0)


_SHARED = {
    "sst2": _load_sst2,
    "ag_news": _load_ag_news,
    "trec": _load_trec,
    "sms_spam": _load_sms_spam,
    "rte": _load_rte,
    "snli": _load_snli,
    "mr": _load_mr,
    "subj": _load_subj,
    "uci_sentiment_sentences": _load_uci,
    "reuters_r8": _load_reuters_r8,
    "20newsgroups": _load_20newsgroups,
}
SHARED_DATASETS: tuple[str, ...] = tuple(sorted(_SHARED))


def load_shared(name: str, root: str | os.PathLike | None = None) -> tuple[TextClassificationData, TextClassificationData]:
    """(train, test) of one corpus folder of the shared data directory.

    root: the directory holding the folders; default $FIBEC_DATA_ROOT, else ../shared/data next
    to the current directory or to the repository. Splits used (see each folder's SOURCE.txt):
    sst2 train.tsv / test.tsv (GLUE dev); ag_news dev.tsv (10k from AG train) / test.tsv
    (descriptions); trec train_5500 / TREC_10 with the 6 coarse labels; rte train.tsv / test.tsv
    (pairs); snli dev / test (pairs); reuters_r8 train / test. sms_spam, mr, subj,
    uci_sentiment_sentences (all three domains) and 20newsgroups (its test split only) have no
    split and get a stratified 80/20 `train_test_split(..., 0.2, seed=0)`.
    """
    if name not in _SHARED:
        raise ValueError(f"name: unknown dataset {name!r}; known: {', '.join(SHARED_DATASETS)}")
    folder = _data_root(root) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"root: no folder {folder} (set FIBEC_DATA_ROOT or pass root=)")
    train, test = _SHARED[name](folder)
    train.name = test.name = name
    return train, test


# ---- The built-in default task -------------------------------------------------------------------

_SUBJECTS = ["this phone", "the movie", "this blender", "the hotel room", "this book", "the headphones",
             "the restaurant", "this laptop", "the service", "this jacket", "the sequel", "this game",
             "the coffee maker", "the concert", "this app", "the camera"]
_STRONG = {1: ["excellent", "wonderful", "fantastic", "amazing", "brilliant", "superb", "outstanding", "perfect"],
           0: ["terrible", "awful", "horrible", "dreadful", "useless", "pathetic", "atrocious", "abysmal"]}
_WEAK = {1: ["decent", "pleasant", "solid", "fine", "nice", "reliable", "charming", "enjoyable"],
         0: ["mediocre", "dull", "flimsy", "bland", "clumsy", "disappointing", "tedious", "weak"]}
_FILLER = ["i bought it last month", "my brother recommended it", "it arrived on a tuesday",
           "i used it every day for a week", "we tried it during the holidays", "the box was blue",
           "it came with a manual", "i read a few reviews first", "the price was average",
           "it took an hour to set up"]
_NEGATABLE = {1: ["bad", "terrible", "awful", "disappointing", "a waste of money", "boring"],
              0: ["good", "great", "worth it", "impressive", "fun", "any good"]}


def _easy(rng: random.Random, label: int) -> str:
    word, subject = rng.choice(_STRONG[label]), rng.choice(_SUBJECTS)
    return rng.choice([f"{subject} is {word}.", f"{word}!", f"{word} {subject.split()[-1]}."])


def _medium(rng: random.Random, label: int) -> str:
    word, subject = rng.choice(_WEAK[label]), rng.choice(_SUBJECTS)
    first, second = rng.sample(_FILLER, 2)
    return rng.choice([f"{first}, and {subject} is {word}, {second}.",
                       f"{subject} turned out {word}; {first} and {second}."])


def _hard(rng: random.Random, label: int) -> str:
    subject = rng.choice(_SUBJECTS)
    kind = rng.randrange(3)
    if kind == 0:  # negation flips the cue word
        return f"{subject} is not {rng.choice(_NEGATABLE[label])}, {rng.choice(_FILLER)}."
    if kind == 1:  # contrast: the clause after "but" decides
        return (f"{rng.choice(_FILLER)} and at first it seemed {rng.choice(_WEAK[1 - label])}, "
                f"but in the end {subject} is {rng.choice(_WEAK[label])}.")
    # mixed cues: a weak opposite cue, then a strong decisive one
    return (f"{subject} looks {rng.choice(_WEAK[1 - label])} and {rng.choice(_FILLER)}, "
            f"yet overall it is {rng.choice(_STRONG[label])}.")


_GROUPS = (("easy", _easy), ("medium", _medium), ("hard", _hard))


# Redraws allowed per sample before the templates are taken as exhausted by the excluded sentences.
_MAX_DRAWS = 1000


def sentence_key(text: str) -> str:
    """What makes two sentences the same: equal after collapsing whitespace and ignoring case."""
    return " ".join(text.split()).casefold()


def _generate(n: int, rng: random.Random, exclude: frozenset[str] = frozenset()) -> TextClassificationData:
    """n samples, none of whose sentence_key is in `exclude` (such draws are redrawn)."""
    texts, labels, groups = [], [], []
    for i in range(n):
        label = i % 2  # balanced: exactly half positive (odd n: one more negative)
        group, make = _GROUPS[(i // 2) % 3]  # each group equally often and label-balanced
        for _ in range(_MAX_DRAWS):
            text = make(rng, label)
            if sentence_key(text) not in exclude:
                break
        else:
            raise ValueError(f"the {group} {['negative', 'positive'][label]} templates gave only sentences of the "
                             f"training set in {_MAX_DRAWS} draws; lower n_train or n_test")
        texts.append(text)
        labels.append(label)
        groups.append(group)
    order = list(range(n))
    rng.shuffle(order)
    return TextClassificationData([texts[i] for i in order], [labels[i] for i in order], ["negative", "positive"],
                                  name="default", groups=[groups[i] for i in order])


def default_task(seed: int = 0, n_train: int = 1200, n_test: int = 400) -> tuple[TextClassificationData, TextClassificationData]:
    """The built-in task: binary sentiment of short synthetic product/movie reviews (no files, no network).

    Sentences come from templates and word lists, a third each of
    - easy: one strong cue word ("this phone is excellent.", "awful!"),
    - medium: a weak cue word inside neutral filler clauses
      ("i read a few reviews first, and the hotel room is bland, the box was blue."),
    - hard: negation of a cue ("the movie is not bad, ..." is positive), contrast where the clause
      after "but" decides, or a weak opposite cue followed by a strong deciding one ("yet overall").
    Labels are always correct (no label noise); both labels are equally frequent in every group
    and in total. Each sample's group is in `.groups`. Train and test are drawn from separate
    streams of random.Random(seed), and no test sentence is a training sentence (compared with
    whitespace collapsed and case ignored: a test draw that is one is drawn again), so the short
    easy templates that train uses up appear less often in test. The result is identical for
    equal arguments.
    """
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        check_int(arg, value, low=2)
    train = _generate(n_train, random.Random(f"{seed}/train"))
    seen = frozenset(map(sentence_key, train.texts))
    return train, _generate(n_test, random.Random(f"{seed}/test"), exclude=seen)


# ---- Splits and partitions ---------------------------------------------------------------------

def stratified_holdout(labels: Sequence[int], units: list[list[int]], fraction: float,
                       rng: np.random.Generator) -> list[int]:
    """The sample indices held out: for each label in turn, round(fraction * its units) of its units,
    drawn by one rng.permutation. A unit is a list of samples of one label that stay together (one
    sample, or every copy of a text); units of a label are taken in the order given."""
    labels = np.asarray(labels)
    held: list[int] = []
    for label in range(int(labels.max()) + 1 if labels.size else 0):
        of_label = [unit for unit in units if labels[unit[0]] == label]
        for j in rng.permutation(len(of_label))[: int(round(fraction * len(of_label)))]:
            held += of_label[j]
    return held


def train_test_split(data: TextClassificationData, test_fraction: float,
                     seed: int = 0) -> tuple[TextClassificationData, TextClassificationData]:
    """Stratified seeded split: each label contributes round(test_fraction * count) samples to test.

    Both parts keep the original order of their samples; neither part is empty.
    """
    frac = check_number("test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    if len(data) < 2:
        raise ValueError(f"data needs at least 2 samples to split, has {len(data)}")
    rng = np.random.default_rng(seed)
    test_idx = stratified_holdout(data.labels, [[i] for i in range(len(data))], frac, rng)
    if not test_idx:
        test_idx = [int(rng.integers(len(data)))]
    if len(test_idx) == len(data):
        test_idx.pop()
    test_set = set(test_idx)
    train_idx = [i for i in range(len(data)) if i not in test_set]
    return data.subset(train_idx), data.subset(sorted(test_set))


def dirichlet_partition(labels: Sequence[int] | torch.Tensor | np.ndarray, num_clients: int, alpha: float, *,
                        min_size: int = 1, seed: int = 0, max_tries: int = 100) -> list[list[int]]:
    """Label-skew partition: client k gets share p_k,c of class c, p_.,c ~ Dirichlet(alpha * 1_K).

    Every index appears in exactly one client list (sorted ascending). Smaller alpha = stronger
    skew. If a draw leaves a client with fewer than min_size samples it is redrawn (up to
    max_tries draws from the same seeded generator); if all draws fail, the last one is
    rebalanced deterministically: the currently largest client gives its highest index to the
    smallest until every client holds min_size.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    n = len(y)
    check_int("num_clients", num_clients, low=1)
    check_number("alpha", alpha, low=0.0, low_open=True)
    check_int("min_size", min_size, low=0)
    if num_clients * min_size > n:
        raise ValueError(f"min_size: {num_clients} clients x min_size {min_size} > {n} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    parts: list[list[int]] = []
    for _ in range(max(1, max_tries)):
        parts = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        for p in parts:
            p.sort()
        while True:
            small = min(range(num_clients), key=lambda k: (len(parts[k]), k))
            if len(parts[small]) >= min_size:
                break
            large = max(range(num_clients), key=lambda k: (len(parts[k]), -k))
            parts[small].append(parts[large].pop())
    return [sorted(p) for p in parts]


# ---- Tokenised batches -----------------------------------------------------------------------------

def _tokenized(data: TextClassificationData, tokenizer, max_length: int) -> dict[str, list[list[int]]]:
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_length)
    if key not in data._token_cache:
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos) first")
        enc = tokenizer(data.texts, data.text_pairs, truncation=True, max_length=max_length)
        data._token_cache[key] = {k: list(v) for k, v in enc.items()
                                  if k in ("input_ids", "attention_mask", "token_type_ids")}
    return data._token_cache[key]


def make_batches(data: TextClassificationData, tokenizer, indices: Sequence[int] | None, batch_size: int, *,
                 max_length: int, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches of `data` at `indices` (all samples when None), `batch_size` at a time.

    Each dict holds input_ids, attention_mask (and token_type_ids when the tokenizer makes them)
    as LongTensor [B, T] right-padded to the batch's longest sequence (T <= max_length), labels
    LongTensor [B] and index LongTensor [B] (positions in `data`). The whole dataset is
    tokenised once per (tokenizer, max_length) and cached on `data`. shuffle permutes the
    indices with numpy's generator seeded by `seed`. Pass `model_inputs(batch)` to the model.
    """
    check_int("batch_size", batch_size, low=1)
    check_int("max_length", max_length, low=1)
    idx = np.arange(len(data)) if indices is None else np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(data)):
        raise ValueError(f"indices must lie in range({len(data)})")
    if shuffle:
        idx = np.random.default_rng(seed).permutation(idx)
    enc = _tokenized(data, tokenizer, max_length)
    pad = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size].tolist()
        longest = max(len(enc["input_ids"][i]) for i in chunk)
        batch = {}
        for key, rows in enc.items():
            padded = [rows[i] + [pad[key]] * (longest - len(rows[i])) for i in chunk]
            batch[key] = torch.tensor(padded, dtype=torch.long)
        batch["labels"] = torch.tensor([data.labels[i] for i in chunk], dtype=torch.long)
        batch["index"] = torch.tensor(chunk, dtype=torch.long)
        yield batch


def token_lengths(data: TextClassificationData, tokenizer, *, max_length: int) -> np.ndarray:
    """int64 [n]: each sample's token count after truncation to max_length (from the tokenised cache)."""
    return np.array([len(ids) for ids in _tokenized(data, tokenizer, max_length)["input_ids"]], dtype=np.int64)


def shortest_first(data: TextClassificationData, tokenizer, *, max_length: int) -> np.ndarray:
    """int64 [n]: the sample indices by token count, shortest first (ties in data order): batches cut
    from it hold samples of similar length, so that little of a forward pass is padding."""
    return np.argsort(token_lengths(data, tokenizer, max_length=max_length), kind="stable")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without fibec's bookkeeping keys ("index"), ready for `model(**...)`."""
    return {k: v for k, v in batch.items() if k != "index"}
