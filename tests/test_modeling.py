"""fibec.modeling.load_classifier keeps transformers' per-load report out of the output."""
import logging
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import AutoModelForSequenceClassification  # noqa: E402

from fibec.modeling import load_classifier  # noqa: E402


@pytest.fixture
def transformers_records(caplog, monkeypatch):
    """caplog's records of the "transformers" logger, each once: propagation to the root logger
    (where caplog also listens) is off while the test runs, whatever an earlier test left it at."""
    transformers_logger = logging.getLogger("transformers")
    monkeypatch.setattr(transformers_logger, "propagate", False)
    transformers_logger.addHandler(caplog.handler)
    yield caplog
    transformers_logger.removeHandler(caplog.handler)


def test_load_classifier_shows_no_load_report(tiny_bert, transformers_records):
    # The tiny model's saved head has 2 labels: building one with 3 re-initialises it, which
    # transformers reports as a warning on every load.
    load_classifier(tiny_bert, num_labels=3)
    assert not [r.getMessage() for r in transformers_records.records if r.levelno >= logging.WARNING]


def test_transformers_errors_during_the_load_still_show(tiny_bert, transformers_records, monkeypatch):
    load = AutoModelForSequenceClassification.from_pretrained

    def load_and_log(*args, **kwargs):
        log = logging.getLogger("transformers.modeling_utils")
        log.warning("a load report")
        log.error("a real error")
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", load_and_log)
    load_classifier(tiny_bert, num_labels=2)
    assert [r.getMessage() for r in transformers_records.records] == ["a real error"]


@pytest.mark.parametrize("level", [logging.NOTSET, logging.INFO, logging.CRITICAL])
def test_transformers_log_level_is_restored_after_a_load_that_fails(tiny_bert, tmp_path, level):
    folder = shutil.copytree(tiny_bert, tmp_path / "no-weights")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    transformers_logger = logging.getLogger("transformers")
    before = transformers_logger.level
    transformers_logger.setLevel(level)
    try:
        with pytest.raises(OSError):
            load_classifier(folder, num_labels=2)
        assert transformers_logger.level == level
    finally:
        transformers_logger.setLevel(before)


def test_load_classifier_shows_no_loading_bar_and_leaves_the_bar_switch_as_it_was(tiny_bert, capfd):
    from transformers.utils import logging as transformers_logging

    load_classifier(tiny_bert, 2)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        load_classifier(tiny_bert, 2)
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
