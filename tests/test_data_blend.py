"""Blending on megatron-core: weights, realised shares, determinism, splits, per-language valid."""
import numpy as np
import pytest

from data.config import DatasetSpec
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


def test_token_count_weights_are_alpha_smoothed_and_realised_within_1_percent(tokenizer_dir, processed_dir, tmp_path):
    """Weights = (tokens_i/T)^alpha normalised, from the .idx files; in 10,000 blended samples
    each language's share is within 1% (absolute) of its weight."""
    cfg = demo_config(tokenizer_dir, tmp_path, alpha=0.3)
    splits = build_datasets(cfg, 10_000, 0, 0, prepared(tokenizer_dir, processed_dir))
    tokens = np.array([document_lengths(e.prefix).sum() for e in splits.blend], dtype=float)
    expected = (tokens / tokens.sum()) ** 0.3
    assert np.allclose([e.weight for e in splits.blend], expected / expected.sum())
    assert len(splits.blend) == 40
    shares = realised_shares(splits, 10_000)
    assert np.max(np.abs(shares - [e.weight for e in splits.blend])) < 0.01


def test_explicit_weights_are_realised_within_1_percent(tokenizer_dir, processed_dir, tmp_path):
    """Explicit weights (normalised) are what the 10,000 samples realise."""
    blend = [DatasetSpec("en", weight=3), DatasetSpec("zh", weight=1), DatasetSpec("python", weight=6)]
    cfg = demo_config(tokenizer_dir, tmp_path, blend=blend)
    splits = build_datasets(cfg, 10_000, 0, 0, prepared(tokenizer_dir, processed_dir))
    assert [e.weight for e in splits.blend] == [0.3, 0.1, 0.6]
    assert np.max(np.abs(realised_shares(splits, 10_000) - [0.3, 0.1, 0.6])) < 0.01


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


def test_split_without_a_full_sample_is_a_clear_error(tokenizer_dir, processed_dir, tmp_path):
    """A split that cannot hold one sample is refused with the dataset and split named
    (megatron-core would loop forever on it)."""
    cfg = demo_config(tokenizer_dir, tmp_path, split="98,1,1", seq_length=512)
    with pytest.raises(DataError, match=r"dataset '\w+': its valid split .* fewer than seq_length\+1=513"):
        build_datasets(cfg, 100, 10, 10, prepared(tokenizer_dir, processed_dir))


def test_weights_for_some_datasets_only_is_a_clear_error(tokenizer_dir, processed_dir, tmp_path):
    cfg = demo_config(tokenizer_dir, tmp_path, blend=[DatasetSpec("en", weight=1), DatasetSpec("fr")])
    with pytest.raises(DataError, match=r"missing for \['fr'\]"):
        build_datasets(cfg, 100, 0, 0, prepared(tokenizer_dir, processed_dir))
