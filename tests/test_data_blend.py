"""Blending on megatron-core: weights, realised shares, determinism, splits, per-language valid."""
import json
import logging

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data.config import DatasetSpec
from data.data_report import write_data_report
from data.datasets import build_datasets
from data.errors import DataError
from data.index_file import document_lengths
from data.prepare import PreparedData
from data.summary import read_summary
from tests.test_data_helpers import demo_config, process_group, processed_dir, tokenizer_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("process_group")


def prepared(tokenizer_dir, processed_dir) -> PreparedData:
    return PreparedData(tokenizer_dir, processed_dir, read_summary(processed_dir))


def realised_shares(splits, n: int) -> np.ndarray:
    return np.bincount(splits.train.dataset_index[:n], minlength=len(splits.blend)) / n


def within_2_percent_of_each_weight(shares: np.ndarray, weights) -> bool:
    """Relative to each weight, so a small language is held as tightly as a large one."""
    weights = np.asarray(weights)
    return bool(np.all(np.abs(shares - weights) <= 0.02 * weights))


def test_token_count_weights_are_alpha_smoothed_and_realised_within_2_percent(tokenizer_dir, processed_dir, tmp_path):
    """Weights = (tokens_i/T)^alpha normalised, from the .idx files; in 10,000 blended samples
    each language's share is within 2% of its own weight (the smallest is ~1.5%: megatron's
    greedy blending is off by about one sample, 1/150 of its ~150)."""
    cfg = demo_config(tokenizer_dir, tmp_path, alpha=0.3)
    splits = build_datasets(cfg, 10_000, 0, 0, prepared(tokenizer_dir, processed_dir))
    tokens = np.array([document_lengths(e.prefix).sum() for e in splits.blend], dtype=float)
    expected = (tokens / tokens.sum()) ** 0.3
    assert np.allclose([e.weight for e in splits.blend], expected / expected.sum())
    assert len(splits.blend) == 40
    assert within_2_percent_of_each_weight(realised_shares(splits, 10_000), [e.weight for e in splits.blend])


def test_explicit_weights_are_realised_within_2_percent(tokenizer_dir, processed_dir, tmp_path):
    """Explicit weights (normalised) are what the 10,000 samples realise."""
    blend = [DatasetSpec("en", weight=3), DatasetSpec("zh", weight=1), DatasetSpec("python", weight=6)]
    cfg = demo_config(tokenizer_dir, tmp_path, blend=blend)
    splits = build_datasets(cfg, 10_000, 0, 0, prepared(tokenizer_dir, processed_dir))
    assert [e.weight for e in splits.blend] == [0.3, 0.1, 0.6]
    assert within_2_percent_of_each_weight(realised_shares(splits, 10_000), [0.3, 0.1, 0.6])


def test_same_seed_same_order_built_independently(tokenizer_dir, processed_dir, tmp_path):
    """Two builds with one seed, each into its own empty cache (so nothing is just re-read),
    give identical sample orders and tokens; another seed gives another order."""
    p = prepared(tokenizer_dir, processed_dir)
    a = build_datasets(demo_config(tokenizer_dir, tmp_path / "a"), 2000, 50, 50, p)
    b = build_datasets(demo_config(tokenizer_dir, tmp_path / "b"), 2000, 50, 50, p)
    c = build_datasets(demo_config(tokenizer_dir, tmp_path / "c", seed=7), 2000, 50, 50, p)
    assert np.array_equal(a.train.dataset_index, b.train.dataset_index)
    assert np.array_equal(a.train.dataset_sample_index, b.train.dataset_sample_index)
    for i in range(0, 2000, 97):
        assert np.array_equal(a.train[i]["tokens"].numpy(), b.train[i]["tokens"].numpy())
    assert not all(np.array_equal(a.train[i]["tokens"].numpy(), c.train[i]["tokens"].numpy()) for i in range(20))
    assert (tmp_path / "a" / "indices").is_dir() and not list((tmp_path / "a" / "indices").glob(".*tmp*"))


def test_splits_and_per_language_validation_sets_use_disjoint_documents(tokenizer_dir, processed_dir, tmp_path):
    """Each language has its own one-epoch validation set; its documents are that language's
    valid documents (80-90% of the file by the 80,10,10 split), none of them in training."""
    cfg = demo_config(tokenizer_dir, tmp_path)
    splits = build_datasets(cfg, 2000, 100, 100, prepared(tokenizer_dir, processed_dir))
    assert set(splits.valid_per_dataset) == {e.name for e in splits.blend}
    for entry, train_part in zip(splits.blend, splits.train.datasets):
        n = len(document_lengths(entry.prefix))
        valid = splits.valid_per_dataset[entry.name]
        assert len(valid) > 0
        assert set(valid.document_index) <= set(range(round(0.8 * n), round(0.9 * n)))
        assert set(train_part.document_index) <= set(range(0, round(0.8 * n)))
        assert valid[0]["tokens"].shape == (cfg.seq_length,)


def split_parts(prefix, split: str) -> list[int]:
    """Tokens in each split's documents: megatron-core's IndexedDataset lengths cut where megatron
    rounds the split fractions (round(fraction * documents)), computed here on their own."""
    dataset = IndexedDataset(prefix)  # held: its lengths are a view of its memory map
    lengths = np.array(dataset.sequence_lengths)
    bounds = np.cumsum([0.0] + [float(x) for x in split.split(",")])
    bounds /= bounds[-1]
    n = len(lengths)
    return [int(lengths[round(bounds[i] * n):round(bounds[i + 1] * n)].sum()) for i in range(3)]


def expected_left_out(prefixes: dict, split: str, seq_length: int) -> set:
    return {(name, part, tokens) for name, prefix in prefixes.items()
            for part, tokens in zip(("train", "valid", "test"), split_parts(prefix, split)) if tokens <= seq_length}


def smoothed(prefixes: dict, names: list, alpha: float = 0.3) -> list:
    """The alpha-smoothed weights of all datasets, renormalised over `names`."""
    tokens = {name: float(split_parts(p, "1,0,0")[0]) for name, p in prefixes.items()}
    total = sum(tokens.values())
    raw = {name: (t / total) ** alpha for name, t in tokens.items()}
    return [raw[name] / sum(raw[n] for n in names) for name in names]


@pytest.mark.parametrize("seq_length", [512, 2048, 4096])
def test_long_samples_leave_small_languages_out_of_a_split_and_say_so(tokenizer_dir, processed_dir, tmp_path,
                                                                      seq_length, caplog):
    """The shipped corpus at 80,10,10: a dataset whose part of a split is shorter than one sample
    is left out of that split only (the others keep their smoothed weights, renormalised), said in
    one line and recorded in the run's data report; every split yields full-length samples.
    (At 512 one language leaves valid, 21 test; at 2048 only the code stays in valid and test;
    at 4096 26 languages leave the training blend too.)"""
    cfg = demo_config(tokenizer_dir, tmp_path, seq_length=seq_length)
    prefixes = {name: str(processed_dir / name) for name in read_summary(processed_dir)["outputs"]}
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        splits = build_datasets(cfg, 200, 20, 20, prepared(tokenizer_dir, processed_dir))
    left = expected_left_out(prefixes, cfg.split, seq_length)
    assert {(x.dataset, x.split, x.tokens) for x in splits.left_out} == left and left
    assert all(x.need == seq_length + 1 for x in splits.left_out)
    said = [r.getMessage() for r in caplog.records if "left out of the" in r.getMessage()]
    assert sorted(said) == sorted(f"data: {x.line()}" for x in splits.left_out)
    for part in ("train", "valid", "test"):
        names = sorted(n for n in prefixes if (n, part) not in {(d, s) for d, s, _ in left})
        assert [e.name for e in splits.blends[part]] == names
        assert np.allclose([e.weight for e in splits.blends[part]], smoothed(prefixes, names))
        dataset = getattr(splits, part)
        assert len(dataset.datasets) == len(names)
        for i in range(0, len(dataset), 7):
            assert dataset[i]["tokens"].shape == (seq_length,)
    assert splits.blend == splits.blends["train"]
    assert sorted(splits.valid_per_dataset) == [e.name for e in splits.blends["valid"]]
    write_data_report(tmp_path / "data.json", splits)
    report = json.loads((tmp_path / "data.json").read_text())
    assert {(x["dataset"], x["split"], x["tokens"]) for x in report["left_out"]} == left
    assert report["splits"]["valid"] == [{"name": e.name, "weight": e.weight, "dataset_tokens": e.tokens,
                                          "prefix": e.prefix} for e in splits.blends["valid"]]
    assert (report["seq_length"], report["split"]) == (seq_length, "80,10,10")


def test_a_split_left_with_no_dataset_is_off_and_only_an_empty_train_split_is_an_error(tokenizer_dir, processed_dir,
                                                                                        tmp_path, caplog):
    """98,1,1 at 2048: no dataset's 1% holds a sample, so there is no valid split (not an error,
    said and recorded); the test split keeps the code. A train split that nothing fits is refused
    in one line naming seq_length and data.split (megatron-core would loop forever on it)."""
    cfg = demo_config(tokenizer_dir, tmp_path, split="98,1,1", seq_length=2048)
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        splits = build_datasets(cfg, 100, 10, 10, prepared(tokenizer_dir, processed_dir))
    assert splits.valid is None and splits.valid_per_dataset == {} and "valid" not in splits.blends
    assert [e.name for e in splits.blends["test"]] == ["c", "python"] and len(splits.test) >= 10
    assert len([x for x in splits.left_out if x.split == "valid"]) == len(splits.blend) == 40
    assert any("no valid split" in r.getMessage() for r in caplog.records)
    write_data_report(tmp_path / "data.json", splits)
    assert json.loads((tmp_path / "data.json").read_text())["splits"]["valid"] is None
    cfg = demo_config(tokenizer_dir, tmp_path, split="98,1,1", seq_length=1_000_000)
    with pytest.raises(DataError, match=r"^nothing to train on: no dataset's part of the train split "
                                        r"\(data.split=98,1,1\) holds seq_length\+1=1000001 tokens$"):
        build_datasets(cfg, 100, 10, 10, prepared(tokenizer_dir, processed_dir))


def test_weights_for_some_datasets_only_is_a_clear_error(tokenizer_dir, processed_dir, tmp_path):
    cfg = demo_config(tokenizer_dir, tmp_path, blend=[DatasetSpec("en", weight=1), DatasetSpec("fr")])
    with pytest.raises(DataError, match=r"missing for \['fr'\]"):
        build_datasets(cfg, 100, 0, 0, prepared(tokenizer_dir, processed_dir))
