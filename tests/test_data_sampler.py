"""Batch schedule (rampup) and the data-parallel, resumable sampler on a real blended dataset."""
import pytest
import torch

from data.batch_schedule import BatchSchedule
from data.datasets import build_datasets
from data.errors import DataError
from data.prepare import PreparedData
from data.sampler import build_eval_loader, iter_global_batches
from data.summary import read_summary
from tests.test_data_helpers import demo_config, process_group, processed_dir, tokenizer_dir  # noqa: F401

RAMP = (4, 4, 48)  # start 4, +4 every 16 samples, up to 16


@pytest.fixture(scope="module")
def train_set(tokenizer_dir, processed_dir, tmp_path_factory, process_group):
    cfg = demo_config(tokenizer_dir, tmp_path_factory.mktemp("cache"), seq_length=32)
    return build_datasets(cfg, 400, 0, 0, PreparedData(tokenizer_dir, processed_dir, read_summary(processed_dir))).train


def test_rampup_follows_megatron_formula_for_bloom_176b():
    """BLOOM-176B: --rampup-batch-size 192 16 9_765_625, gbs 2048, micro 2, DP 8:
    gbs(c) = min(2048, 192 + floor(c / (9_765_625 / 116)) * 16)."""
    s = BatchSchedule(2048, 2, 8, (192, 16, 9_765_625))
    per_increment = 9_765_625 / 116
    for consumed in [0, 84_000, 84_187, 84_188, 5_000_000, 9_765_624, 9_765_625, 10**9]:
        assert s.global_batch(consumed) == min(2048, 192 + int(consumed // per_increment) * 16)
    assert s.num_micro_batches(0) == 192 // 16 and s.num_micro_batches(10**9) == 2048 // 16


def test_schedule_validation_names_the_bad_value():
    with pytest.raises(DataError, match="global batch 12 is not a multiple of micro_batch_size\\*dp = 4\\*2"):
        BatchSchedule(16, 4, 2, (8, 4, 100))  # the ramp passes through 12
    with pytest.raises(DataError, match="not a multiple of incr"):
        BatchSchedule(16, 1, 1, (4, 5, 100))
    with pytest.raises(DataError, match="not a global batch boundary"):
        BatchSchedule(16, 1, 1, (4, 4, 48)).check_resume_point(6)


def tokens_of(micro_batches) -> list[torch.Tensor]:
    return [mb["tokens"] for mb in micro_batches]


def read(dataset, schedule, consumed, rank, steps):
    """`steps` global steps of one rank: [(consumed before, [micro-batch tokens])]."""
    out = []
    for (c, micro), _ in zip(iter_global_batches(dataset, schedule, consumed, rank), range(steps)):
        out.append((c, tokens_of(micro)))
    return out


def test_dp2_ranks_interleaved_equal_dp1_across_rampup(train_set):
    """With rampup (4 -> 16), the micro-batches of DP ranks 0 and 1, interleaved micro-step by
    micro-step, are the DP=1 samples; global batch boundaries are identical."""
    dp1 = read(train_set, BatchSchedule(16, 2, 1, RAMP), 0, 0, 12)
    dp2 = [read(train_set, BatchSchedule(16, 2, 2, RAMP), 0, r, 12) for r in range(2)]
    assert [c for c, _ in dp1] == [c for c, _ in dp2[0]] == [c for c, _ in dp2[1]]
    assert [c for c, _ in dp1][:7] == [0, 4, 8, 12, 16, 24, 32]  # batches of 4, 4, 4, 4, 8, 8, ...
    for (_, single), (_, r0), (_, r1) in zip(dp1, *dp2):
        interleaved = [mb for pair in zip(r0, r1) for mb in pair]
        assert len(interleaved) == len(single)
        for a, b in zip(interleaved, single):
            assert torch.equal(a, b)
    # And the samples are the dataset's, in order: global batch k is a contiguous range.
    flat = torch.cat([mb for _, micro in dp1 for mb in micro])
    assert torch.equal(flat, torch.stack([train_set[i]["tokens"] for i in range(len(flat))]))


def test_resume_continues_the_exact_sequence_also_twice_and_during_rampup(train_set):
    """Resumed at consumed_samples=K (mid-rampup), then again later, a loader yields what the
    uninterrupted one yields from K on, on every DP rank."""
    schedule = BatchSchedule(16, 2, 2, RAMP)
    for rank in range(2):
        full = read(train_set, schedule, 0, rank, 14)
        k1 = full[4][0]  # mid-rampup
        first = read(train_set, schedule, k1, rank, 3)
        k2 = first[-1][0] + schedule.global_batch(first[-1][0])  # after the ramp ends
        second = read(train_set, schedule, k2, rank, 14 - 4 - 3)
        for (c, got), (c_ref, ref) in zip(first + second, full[4:]):
            assert c == c_ref and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_eval_loader_reads_every_sample_once_with_padding_masked(train_set):
    """Validation reads all samples once across DP ranks; the padding of the last step has a
    zero loss mask, so every rank runs the same number of steps."""
    language = train_set.datasets[0]  # a GPTDataset: index None is its masked padding sample

    class FirstSeven(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return language[i]

    batches = [list(build_eval_loader(FirstSeven(), 2, r, 2)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 2
    real = [mb["tokens"][i] for step in zip(*batches) for mb in step for i in range(2) if mb["loss_mask"][i].any()]
    assert len(real) == 7
    for i, tokens in enumerate(real):
        assert torch.equal(tokens, language[i]["tokens"])
