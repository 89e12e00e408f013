"""Continuing BLOOM from BigScience's checkpoints (issue 22): bloom-export --to megatron-deepspeed,
DeepSpeed's own ds_to_universal, bloom-import --from universal and --from megatron-deepspeed.

A TP2 x PP2 run of ours (BigScience's dropout 0.1, so RNG matters) is saved at step SAVE_AT and
exported at TP2 x PP2; the installed DeepSpeed's ds_to_universal converts the export (its script,
run as a module, not a copy). Each import then continues CONTINUE steps at TP1 x DP2 in one launch
next to the original checkpoint: the losses equal the original's continuation to relative 1e-6.
Why they can be equal with dropout: a checkpoint continued at a layout other than the one it was
saved at (TP2 x PP2 x DP1 and, for the imports, TP1 x PP1 x DP1, both not TP1 x DP2) restores no
RNG state, so every continuation starts from the same seeded streams of a fresh engine.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from launch import export_cli, import_cli
from parallelism.topology import Layout
from tests.multiprocess import run_processes
from tests.train_steps import make_engine, train
from training.checkpoint.checkpointer import Checkpointer
from training.checkpoint.files import read_manifest
from training.checkpoint.fragments import MASTER, FragmentReader
from training.checkpoint.safe_unpickle import load
from training.model.param_table import megatron_deepspeed_names
from training.trainer import LoopState

SAVE_AT, CONTINUE = 3, 3
RTOL = 1e-6
DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]


def _overrides(layout: Layout, run_dir) -> list:
    return DROPOUT + [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", "parallel.zero_stage=1",
                      f"trainer.run_dir={run_dir}"]


def _save(rank, layout, run_dir):
    cfg, engine = make_engine(_overrides(layout, run_dir), layout)
    train(cfg, engine, layout, 0, SAVE_AT)
    gbs = cfg.trainer.global_batch_size
    Checkpointer(cfg, layout, engine).save(LoopState(SAVE_AT, SAVE_AT * gbs, SAVE_AT * gbs * cfg.data.seq_length))


def _load_then_continue(rank, layout, checkpoints, run_dir, out):
    """Each checkpoint loaded into a fresh engine at `layout` and continued CONTINUE steps, from the
    RNG state this process started with (as if each ran in a process of its own, as bloom-train does:
    the engine seeds its TP streams, dropout outside them draws from torch's global generator)."""
    got, fresh = [], torch.random.get_rng_state()
    for checkpoint in checkpoints:
        torch.random.set_rng_state(fresh)
        cfg, engine = make_engine(_overrides(layout, run_dir), layout)
        state = Checkpointer(cfg, layout, engine).load(checkpoint)
        assert state["iteration"] == SAVE_AT and not state["same_layout"], state
        got.append({"losses": [r["loss"] for r in train(cfg, engine, layout, SAVE_AT, CONTINUE)],
                    "consumed_samples": state["consumed_samples"], "consumed_tokens": state["consumed_tokens"]})
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(got, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Our checkpoint of a TP2 x PP2 run at step SAVE_AT."""
    run_dir = tmp_path_factory.mktemp("tp2pp2")
    run_processes(_save, Layout(2, 2, 1), Layout(2, 2, 1), str(run_dir))
    return run_dir / "checkpoints" / f"iter_{SAVE_AT:08d}"


def ds_to_universal(global_step, output):
    """DeepSpeed's own converter, from the installed package."""
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(global_step), "--output_folder", str(output), "--num_extract_workers", "1",
                             "--num_merge_workers", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """The checkpoint through bloom-export --to megatron-deepspeed at TP2 x PP2, then DeepSpeed's
    ds_to_universal."""
    root = tmp_path_factory.mktemp("exported")
    assert export_cli.main([str(saved), "--to", "megatron-deepspeed", str(root / "mds"), "--tp", "2", "--pp", "2"]) == 0
    global_step = root / "mds" / f"global_step{SAVE_AT}"
    return global_step, ds_to_universal(global_step, root / "universal")


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """{source kind: our checkpoint imported from it} through bloom-import --from."""
    global_step, universal = exported
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for kind, source in (("universal", universal), ("megatron-deepspeed", global_step)):
        assert import_cli.main(["--from", kind, str(source), "--out", str(root / kind)]) == 0
        out[kind] = root / kind / f"iter_{SAVE_AT:08d}"
    return out


@pytest.fixture(scope="module")
def continued(saved, imported, tmp_path_factory):
    """One launch at TP1 x DP2: the original checkpoint, then each import, continued."""
    root = tmp_path_factory.mktemp("continued")
    checkpoints = [saved, imported["universal"], imported["megatron-deepspeed"]]
    run_processes(_load_then_continue, Layout(1, 1, 2), Layout(1, 1, 2), [str(c) for c in checkpoints], str(root),
                  str(root / "losses.json"))
    original, universal, megatron = json.loads((root / "losses.json").read_text())
    return {"original": original, "universal": universal, "megatron-deepspeed": megatron}


def _full(checkpoint, kind: str, name: str, state: str) -> torch.Tensor:
    reader = FragmentReader(checkpoint, read_manifest(checkpoint), kind)
    try:
        return reader.full(name, state)
    finally:
        reader.close()


def test_ds_to_universal_converts_the_export(saved, exported):
    """DeepSpeed's converter, merging our TP2 x PP2 files by the patterns the export declared,
    gives back every tensor of our checkpoint exactly, and Adam's step; each layer file holds its
    TP rank's chunk (split as BLOOM_FACTS.md says Megatron splits it)."""
    global_step, universal = exported
    for n in megatron_deepspeed_names(4):
        for state, kind, ours in (("fp32", "model", MASTER), ("exp_avg", "optim", "exp_avg"),
                                  ("exp_avg_sq", "optim", "exp_avg_sq")):
            got = load(universal / "zero" / n.optimizer / f"{state}.pt")["param"]
            assert torch.equal(got, _full(saved, kind, n.name, ours)), (n.optimizer, state)
        assert float(load(universal / "zero" / n.optimizer / "step.pt")) == SAVE_AT
        master = _full(saved, "model", n.name, MASTER)
        for rank in range(2):
            layer = load(global_step / f"layer_{n.layer:02d}-model_{rank:02d}-model_states.pt")[n.local]
            dim = n.spec.split.dim
            assert torch.equal(layer, master if dim is None else master.chunk(2, dim)[rank]), (n.name, rank)


@pytest.mark.parametrize("kind", ["universal", "megatron-deepspeed"])
def test_import_keeps_step_iteration_and_consumed(saved, imported, kind):
    ours, theirs = saved, imported[kind]
    assert json.loads((theirs / "optim" / "meta.json").read_text())["adam_step"] == \
        json.loads((ours / "optim" / "meta.json").read_text())["adam_step"] == SAVE_AT
    for key in ("iteration", "consumed_samples", "consumed_tokens"):
        assert json.loads((theirs / "trainer_state.json").read_text())[key] == \
            json.loads((ours / "trainer_state.json").read_text())[key], key
    assert read_manifest(theirs)["saved_layout"] == {"tp": 1, "pp": 1, "dp": 1}


@pytest.mark.parametrize("kind", ["universal", "megatron-deepspeed"])
def test_import_continues_like_the_original(continued, kind):
    """Continued at TP1 x DP2 (another layout than either was saved at), the import's losses equal
    the original checkpoint's, step for step, and so do the consumed samples and tokens."""
    expected, got = continued["original"], continued[kind]
    assert got["consumed_samples"] == expected["consumed_samples"] == SAVE_AT * 8
    assert got["consumed_tokens"] == expected["consumed_tokens"]
    assert len(got["losses"]) == CONTINUE
    for step, (a, b) in enumerate(zip(got["losses"], expected["losses"])):
        assert abs(a - b) / abs(b) < RTOL, f"step {SAVE_AT + step}: {a} vs the original's {b}"


def test_missing_moment_is_refused_in_one_line(exported, tmp_path, capsys):
    """A universal folder without one parameter's exp_avg_sq: one line naming the file, exit 2."""
    _, universal = exported
    broken = tmp_path / "universal"
    shutil.copytree(universal, broken)
    (broken / "zero" / "3.mlp.dense_h_to_4h.weight" / "exp_avg_sq.pt").unlink()
    assert import_cli.main(["--from", "universal", str(broken), "--out", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "exp_avg_sq" in err[0] and "3.mlp.dense_h_to_4h.weight" in err[0], err
    assert not (tmp_path / "out" / f"iter_{SAVE_AT:08d}").exists()


def test_bad_export_requests_are_refused_in_one_line(saved, tmp_path, capsys):
    for args in (["--to", "nemo", str(tmp_path / "a")], ["--to", "megatron-deepspeed", str(tmp_path / "b"), "--tp", "3"],
                 ["--out", str(tmp_path / "c"), "--tp", "2"]):
        assert export_cli.main([str(saved), *args]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("bloom-export: error:"), (args, err)


def split_over_dp(global_step, out, dp: int):
    """A copy of a DP1 Megatron-DeepSpeed folder as if saved over `dp` ZeRO ranks, cut the way
    DeepSpeed's BF16_Optimizer cuts a flat group: padded to a multiple of dp, consecutive equal
    partitions, each parameter's piece addressed from its partition's start (a parameter may
    straddle two partitions)."""
    from deepspeed.utils.tensor_fragment import fragment_address

    shutil.copytree(global_step, out, ignore=shutil.ignore_patterns("*_optim_states.pt"))
    for path in sorted(global_step.glob("bf16_zero_pp_rank_0_mp_rank_*_optim_states.pt")):
        whole = torch.load(path, weights_only=False)
        optim = whole["optimizer_state_dict"]
        flats = {"fp32": optim["single_partition_of_fp32_groups"][0],
                 **{k: optim["base_optimizer_state"]["state"][0][k] for k in ("exp_avg", "exp_avg_sq")}}
        numel = flats["fp32"].numel()
        size = -(-numel // dp)
        padded = {k: torch.cat([t, t.new_zeros(size * dp - numel)]) for k, t in flats.items()}
        for rank in range(dp):
            lo, hi = rank * size, (rank + 1) * size
            mapping = {name: fragment_address(numel=min(hi, a.start + a.numel) - max(lo, a.start),
                                              start=max(lo, a.start) - lo)
                       for name, a in optim["param_slice_mappings"][0].items()
                       if max(lo, a.start) < min(hi, a.start + a.numel)}
            part = {k: t[lo:hi].clone() for k, t in padded.items()}
            state = {**optim, "single_partition_of_fp32_groups": [part["fp32"]], "param_slice_mappings": [mapping],
                     "group_paddings": [size * dp - numel if rank == dp - 1 else 0], "partition_count": [dp],
                     "base_optimizer_state": {**optim["base_optimizer_state"], "state": {0: {
                         "step": optim["base_optimizer_state"]["state"][0]["step"],
                         "exp_avg": part["exp_avg"], "exp_avg_sq": part["exp_avg_sq"]}}}}
            torch.save({**whole, "optimizer_state_dict": state}, out / path.name.replace("pp_rank_0_", f"pp_rank_{rank}_"))
    return out


def test_dp_partitions_are_read_in_order(saved, exported, tmp_path):
    """The export re-cut over 3 DP ranks (pieces straddling partitions): DeepSpeed's ds_to_universal
    gives the same universal tensors as from DP 1, and --from megatron-deepspeed imports every
    tensor of the original checkpoint exactly."""
    global_step, universal = exported
    dp3 = split_over_dp(global_step, tmp_path / f"global_step{SAVE_AT}", 3)
    holders = {}
    for path in dp3.glob("*_optim_states.pt"):
        for name in torch.load(path, weights_only=False)["optimizer_state_dict"]["param_slice_mappings"][0]:
            holders[(path.name[-25:], name)] = holders.get((path.name[-25:], name), 0) + 1
    assert max(holders.values()) > 1, "no parameter straddles two partitions: the test would prove little"
    again = ds_to_universal(dp3, tmp_path / "universal")
    assert import_cli.main(["--from", "megatron-deepspeed", str(dp3), "--out", str(tmp_path / "ours")]) == 0
    imported = tmp_path / "ours" / f"iter_{SAVE_AT:08d}"
    for n in megatron_deepspeed_names(4):
        for state, kind, ours in (("fp32", "model", MASTER), ("exp_avg", "optim", "exp_avg"),
                                  ("exp_avg_sq", "optim", "exp_avg_sq")):
            assert torch.equal(load(again / "zero" / n.optimizer / f"{state}.pt")["param"],
                               load(universal / "zero" / n.optimizer / f"{state}.pt")["param"]), (n.optimizer, state)
            assert torch.equal(_full(imported, kind, n.name, ours), _full(saved, kind, n.name, ours)), (n.name, ours)


def test_incomplete_megatron_folder_is_refused_in_one_line(exported, tmp_path, capsys):
    global_step, universal = exported
    broken = tmp_path / global_step.name
    shutil.copytree(global_step, broken)
    (broken / "bf16_zero_pp_rank_0_mp_rank_03_optim_states.pt").unlink()
    for kind, source, says in (("megatron-deepspeed", broken, "mp 3 missing"),
                               ("megatron-deepspeed", universal, "--from universal"),
                               ("universal", global_step, "--from megatron-deepspeed")):
        assert import_cli.main(["--from", kind, str(source), "--out", str(tmp_path / "out")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and says in err[0], (kind, err)


def test_universal_as_older_converters_wrote_it(saved, exported, tmp_path):
    """BigScience's released universal checkpoint came from an older ds_to_universal: the word
    embedding cut to the tokenizer's rows (original_vocab_size) and no step.pt (apex FusedAdam kept
    the step in optimizer_state.pt's param_groups). The cut rows come back as zeros, as DeepSpeed's
    universal load pads them; the step is read from the param groups."""
    _, universal = exported
    old = tmp_path / "universal"
    shutil.copytree(universal, old)
    for step_file in (old / "zero").glob("*/step.pt"):
        step_file.unlink()
    common = torch.load(old / "zero" / "optimizer_state.pt", weights_only=False)
    common["param_groups"] = [{**group, "step": SAVE_AT} for group in common["param_groups"]]
    torch.save(common, old / "zero" / "optimizer_state.pt")
    embedding = old / "zero" / "tied_modules.embed.word_embeddings.weight"
    for state in ("fp32", "exp_avg", "exp_avg_sq"):
        saved_state = torch.load(embedding / f"{state}.pt", weights_only=False)
        torch.save({**saved_state, "param": saved_state["param"][:8000]}, embedding / f"{state}.pt")
    assert import_cli.main(["--from", "universal", str(old), "--out", str(tmp_path / "ours")]) == 0
    imported = tmp_path / "ours" / f"iter_{SAVE_AT:08d}"
    assert json.loads((imported / "optim" / "meta.json").read_text())["adam_step"] == SAVE_AT
    for kind, state in (("model", MASTER), ("optim", "exp_avg"), ("optim", "exp_avg_sq")):
        got, original = _full(imported, kind, "word_embeddings.weight", state), _full(saved, kind, "word_embeddings.weight", state)
        assert got.shape == original.shape == (8192, 128)
        assert torch.equal(got[:8000], original[:8000]) and not got[8000:].any()
