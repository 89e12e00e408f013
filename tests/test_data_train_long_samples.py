"""bloom-train on the shipped corpus at 512 tokens a sample and at BLOOM's 2048: the languages
too small to hold a sample in some split are left out of it, and the run trains."""
import json

import pytest

from tests.bloom_train import bloom_train, data_cache  # noqa: F401


@pytest.mark.parametrize("seq", [512, 2048])
def test_bloom_train_trains_two_steps_on_the_shipped_corpus(tmp_path, data_cache, seq):
    """Most UDHR languages hold ~400 valid tokens (80,10,10) and some ~2000 training tokens: at
    512 a few valid parts, at 2048 most of them and a training part, are left out of their
    splits, said in one line each, and training and evaluation run."""
    run_dir = tmp_path / "run"
    result = bloom_train([f"data.seq_length={seq}", "model.hidden_size=32", "model.num_layers=2",
                          "model.num_heads=4", "trainer.micro_batch_size=1", "trainer.global_batch_size=2",
                          "trainer.train_iters=2", "trainer.eval_interval=1", "trainer.eval_iters=1",
                          "logging.tensorboard=false", f"trainer.run_dir={run_dir}", f"data.cache_dir={data_cache}"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "lm_loss" in r] == [1, 2]
    assert [r["step"] for r in records if "valid_loss" in r] == [1, 2]
    assert "left out of the valid split" in result.stderr
    report = json.loads((run_dir / "data.json").read_text())
    assert report["seq_length"] == seq and report["left_out"]
    assert all(x["tokens"] < x["need"] == seq + 1 for x in report["left_out"])
    for split in ("train", "valid"):  # each dataset is in the split's blend or left out of it, not both
        kept = {e["name"] for e in report["splits"][split]}
        dropped = {x["dataset"] for x in report["left_out"] if x["split"] == split}
        assert not kept & dropped and len(kept | dropped) == 40, split
