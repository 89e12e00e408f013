"""Which datasets each split draws from: those whose part of the split holds one full sample.

megatron-core never returns from building a split in which one dataset's document range holds
fewer than seq_length+1 tokens, and a small language (or a large seq_length) easily leaves one
that short. Such a dataset is left out of that split only: the others keep their relative
weights, renormalised. The document ranges stay megatron's own (`data.split` of each dataset),
so leaving a dataset out of one split moves none of its documents into another.
"""
from dataclasses import dataclass, replace

from data.blend import BlendEntry
from data.errors import DataError
from data.index_file import split_token_counts

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class LeftOut:
    """A dataset left out of one split, and why: its part of that split is shorter than a sample."""

    dataset: str
    split: str
    tokens: int  # tokens in the dataset's part of the split
    need: int  # seq_length + 1
    data_split: str

    def line(self) -> str:
        return (f"dataset {self.dataset!r} left out of the {self.split} split: its part of it "
                f"(data.split={self.data_split}) holds {self.tokens} tokens, fewer than seq_length+1={self.need}")


@dataclass
class SplitFit:
    """The blend of one split (weights renormalised; empty when nothing fits) and who was left out."""

    split: str
    blend: list
    left_out: list

    def nothing_left_line(self, seq_length: int, data_split: str) -> str:
        return (f"no dataset's part of the {self.split} split (data.split={data_split}) holds "
                f"seq_length+1={seq_length + 1} tokens")


def fit_split(blend: list[BlendEntry], matrix: list, index: int, seq_length: int, data_split: str) -> SplitFit:
    """The datasets of `blend` whose part of split `index` holds seq_length+1 tokens."""
    need = seq_length + 1
    kept, left_out = [], []
    for entry in blend:
        tokens = split_token_counts(entry.prefix, matrix)[index]
        if tokens >= need:
            kept.append(entry)
        else:
            left_out.append(LeftOut(entry.name, SPLITS[index], tokens, need, data_split))
    total = sum(e.weight for e in kept)
    # Zero total: only zero-weight datasets fit, and megatron cannot blend those.
    fitted = [replace(e, weight=e.weight / total) for e in kept] if total > 0 else []
    return SplitFit(SPLITS[index], fitted, left_out)


def fit_train(blend: list[BlendEntry], matrix: list, seq_length: int, data_split: str) -> SplitFit:
    """The train split's fit; training without a single dataset to draw from is an error."""
    if matrix[0] is None:
        raise DataError(f"data.split={data_split} gives the train split no documents")
    fit = fit_split(blend, matrix, 0, seq_length, data_split)
    if not fit.blend:
        raise DataError(f"nothing to train on: {fit.nothing_left_line(seq_length, data_split)}")
    return fit
