"""bloom-import and bloom-export against real transformers and safetensors.

A random HF BloomForCausalLM (random LayerNorms and biases too), saved by HF's own
save_pretrained, goes through bloom-import and bloom-export: every tensor comes back bit for bit,
the exported directory loads with four HF heads, its logits equal our training model's (fp32 and
bf16, checked here independently of the export's own self-check), the self-check catches a wrong
conversion, and bad inputs are refused in one line. A checkpoint saved by bloom-train at
TP2 x PP2 exports to a model whose logits equal the training model's.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import export_cli, import_cli
from tests.bloom_train import TINY_RUN, bloom_train, data_cache  # noqa: F401
from tests.hf_reference import random_hf_model
from training.config.schema import ModelConfig

CORPUS = [Path(__file__).parent.parent / "data" / "corpora" / p
          for p in ("udhr/en.jsonl", "udhr/fr.jsonl", "code/python.jsonl")]
SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4)
ROWS = 512  # the HF vocabulary: 400 tokenizer tokens + padding rows, divisible by TP 2
TOKENIZER_VOCAB = 400
LOGITS_ATOL = 1e-4


# -- shared by tests/test_eval.py ---------------------------------------------------------------

def make_hf_dir(path: Path, seed: int = 5) -> Path:
    """A random BloomForCausalLM saved by HF (safetensors) with a small BLOOM-style tokenizer."""
    from data.tokenizer_train import train_tokenizer
    from training.hf.importer import TOKENIZER_FILES

    model = random_hf_model(ModelConfig(**SHAPE, init_std=0.02), ROWS, seed=seed)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 3
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer = train_tokenizer([str(p) for p in CORPUS], path.parent / f"{path.name}-tokenizer",
                                vocab_size=TOKENIZER_VOCAB)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, path / name)
    return path


def run_cli(main, args, capsys):
    """(exit status, stdout, stderr lines) of a CLI main called in this process."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.strip()]


def hf_tensors(directory: Path) -> dict:
    """Every tensor of an HF directory, through its index when sharded."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-bloom")


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    from training.hf.importer import import_hf

    return import_hf(hf_dir, tmp_path_factory.mktemp("imported") / "checkpoints")


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):
    """fp32 and bf16 exports of the imported checkpoint (through its checkpoints dir's `latest`)."""
    from training.hf.export import export_checkpoint

    root = tmp_path_factory.mktemp("exported")
    return {dtype: export_checkpoint(imported.parent, root / dtype, dtype, max_shard_size="200KB")
            for dtype in ("fp32", "bf16")}


# -- round trip ---------------------------------------------------------------------------------

def test_import_writes_a_checkpoint_bloom_train_can_resume(imported, hf_dir):
    from omegaconf import OmegaConf

    from training.checkpoint.files import resolve_latest, verify

    manifest = verify(imported)  # every checksum
    assert resolve_latest(imported.parent) == imported
    assert manifest["saved_layout"] == {"tp": 1, "pp": 1, "dp": 1} and manifest["iteration"] == 0
    assert manifest["model"] == {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                 "vocab_size": TOKENIZER_VOCAB, "padded_vocab_size": ROWS,
                                 "ffn_hidden_size": 256, "layer_norm_epsilon": 1e-5}
    assert sorted(manifest["files"]) == ["config.yaml", "model/rank00000.safetensors",
                                         "tokenizer/special_tokens_map.json", "tokenizer/tokenizer.json",
                                         "tokenizer/tokenizer_config.json", "trainer_state.json"]
    assert json.loads((imported / "trainer_state.json").read_text()) == {
        "iteration": 0, "consumed_samples": 0, "consumed_tokens": 0}
    config = OmegaConf.load(imported / "config.yaml")
    assert (config.model.hidden_size, config.model.num_layers, config.model.num_heads,
            config.model.vocab_size, config.model.padded_vocab_size) == (64, 2, 4, TOKENIZER_VOCAB, ROWS)
    assert Path(config.data.tokenizer.path) == imported.resolve() / "tokenizer"
    assert not list(imported.parent.glob(".*partial"))


def test_import_then_export_returns_every_tensor_and_the_config(hf_dir, exported):
    original = load_file(str(hf_dir / "model.safetensors"))
    original.pop("lm_head.weight", None)  # tied: HF itself does not store it
    out = exported["fp32"].directory
    assert exported["fp32"].shards > 1  # 200KB shards: the index path is exercised
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    back = hf_tensors(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor), name
    theirs, ours = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    for key in ("hidden_size", "n_layer", "n_head", "vocab_size", "layer_norm_epsilon", "model_type",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert ours[key] == theirs[key], key
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    bf16 = hf_tensors(exported["bf16"].directory)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, original[n].to(torch.bfloat16)) for n, t in bf16.items())
    card = (out / "README.md").read_text()
    assert "| iterations | 0 |" in card and "max abs diff" in card and "tiny-bloom" in card


def test_exported_directory_loads_with_other_heads(hf_dir, exported):
    from transformers import (AutoTokenizer, BloomForQuestionAnswering, BloomForSequenceClassification,
                              BloomForTokenClassification)

    out = exported["fp32"].directory
    embedding = load_file(str(hf_dir / "model.safetensors"))["transformer.word_embeddings.weight"]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer(["Everyone has the right to life."], return_tensors="pt").input_ids
    assert tokenizer.eos_token_id == 2 and ids.max() < TOKENIZER_VOCAB
    for cls, field in ((BloomForSequenceClassification, "logits"), (BloomForTokenClassification, "logits"),
                       (BloomForQuestionAnswering, "start_logits")):
        model = cls.from_pretrained(str(out), num_labels=3).eval()
        assert torch.equal(model.transformer.word_embeddings.weight, embedding), cls.__name__
        with torch.no_grad():
            assert torch.isfinite(getattr(model(ids), field)).all()


# -- logits against the training model -----------------------------------------------------------

def test_exported_logits_equal_the_training_model(single_process, hf_dir, exported):
    """Independent of the export's self-check: our BloomModel gets the ORIGINAL HF weights
    through hf_convert.shard_from_hf (not through our checkpoint files), HF loads the export."""
    from transformers import BloomForCausalLM

    from training.hf.convert import shard_from_hf
    from training.model.bloom import build_model, gather_logits

    original = load_file(str(hf_dir / "model.safetensors"))
    cfg = ModelConfig(**SHAPE, vocab_size=TOKENIZER_VOCAB, padded_vocab_size=ROWS, hidden_dropout=0.0,
                      attention_dropout=0.0, kernels="eager")
    tokens = torch.randint(0, TOKENIZER_VOCAB, (3, 20), generator=torch.Generator().manual_seed(9))
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = build_model(cfg, seed=0).eval()
        rounded = {k: v.to(torch_dtype).float() for k, v in original.items()}
        ours.load_state_dict(shard_from_hf(rounded, SHAPE["num_layers"], 0, 1, ROWS))
        hf = BloomForCausalLM.from_pretrained(str(exported[dtype].directory), dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (gather_logits(ours(tokens)) - hf(tokens).logits).abs().max().item()
        assert diff < LOGITS_ATOL, (dtype, diff)
        assert exported[dtype].self_check is not None and exported[dtype].self_check < LOGITS_ATOL


def test_self_check_catches_a_wrong_conversion(single_process, imported, exported):
    """The classic QKV bug (reading BLOOM's per-head interleaved [heads, 3, head_dim] rows as
    Megatron-LM's [3, heads, head_dim]) in block 0: the export's self-check must refuse it."""
    from training.hf.self_check import SelfCheckFailed, self_check
    from training.checkpoint.saved_model import open_checkpoint, read_model_tensors

    _, _, shape = open_checkpoint(imported)
    tensors = read_model_tensors(imported, shape)
    heads, hidden = SHAPE["num_heads"], SHAPE["hidden_size"]
    for suffix in ("weight", "bias"):
        name = f"h.0.self_attention.query_key_value.{suffix}"
        rows = tensors[name].view(heads, 3, hidden // heads, -1)
        tensors[name] = rows.transpose(0, 1).reshape(tensors[name].shape).contiguous()
    with pytest.raises(SelfCheckFailed, match="conversion is wrong"):
        self_check(exported["fp32"].directory, tensors, shape, torch.float32)


# -- refusals ---------------------------------------------------------------------------------------

def test_pickle_only_directory_is_refused(tmp_path, capsys):
    hf = tmp_path / "pickled"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bloom", "hidden_size": 8, "n_layer": 1,
                                                "n_head": 2, "vocab_size": 16}))
    torch.save({"transformer.ln_f.weight": torch.ones(8)}, hf / "pytorch_model.bin")
    status, _, err = run_cli(import_cli.main, [hf, "--out", tmp_path / "ckpts"], capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("bloom-import: error:") and "pytorch_model.bin" in err[0] and "safetensors" in err[0]
    assert not (tmp_path / "ckpts").exists()


def _edited_copy(hf_dir: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(hf_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_missing_files_and_shape_mismatch_are_refused(hf_dir, tmp_path, capsys):
    cases = {
        "more layers than tensors": (_edited_copy(hf_dir, tmp_path / "deeper", n_layer=3), "transformer.h.2."),
        "hidden size": (_edited_copy(hf_dir, tmp_path / "wider", hidden_size=32), "implies"),
        "vocabulary": (_edited_copy(hf_dir, tmp_path / "vocab", vocab_size=640), "vocab_size 640"),
    }
    no_weights = _edited_copy(hf_dir, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    cases["no weights"] = (no_weights, "no *.safetensors")
    no_config = _edited_copy(hf_dir, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    cases["no config"] = (no_config, "no config.json")
    for case, (directory, expected) in cases.items():
        status, _, err = run_cli(import_cli.main, [directory, "--out", tmp_path / f"out-{directory.name}"], capsys)
        assert status == 2 and len(err) == 1 and expected in err[0], (case, err)


def test_corrupted_checkpoint_file_is_refused_by_export(imported, tmp_path, capsys):
    copy = tmp_path / "checkpoints" / imported.name
    shutil.copytree(imported, copy)
    shard = copy / "model" / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the file still parses
    shard.write_bytes(bytes(data))
    status, _, err = run_cli(export_cli.main, [copy, "--out", tmp_path / "out", "--dtype", "fp32"], capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("bloom-export: error:") and "model/rank00000.safetensors" in err[0]
    assert "checksum" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_export_refuses_an_existing_output_and_a_missing_checkpoint(imported, exported, tmp_path, capsys):
    status, _, err = run_cli(export_cli.main, [imported, "--out", exported["fp32"].directory], capsys)
    assert status == 2 and len(err) == 1 and "not empty" in err[0], err
    status, _, err = run_cli(export_cli.main, [tmp_path / "nowhere", "--out", tmp_path / "o"], capsys)
    assert status == 2 and len(err) == 1 and "no such file" in err[0], err


# -- a checkpoint the trainer saved at TP2 x PP2 ----------------------------------------------------

PROBE_TOKENS = (2, 24)  # the tokens both the running model and the export are asked about


def probe_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, PROBE_TOKENS, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def running_model_logits(engine, tokens: torch.Tensor, hidden_size: int):
    """Logits of the live pipeline engine, stage by stage (send/recv), gathered over TP on the
    last stage: what the TP x PP training model computes right now, not a rebuild from files."""
    from megatron.core import parallel_state as ps

    module = engine.module.eval()
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    x = tokens
    if pp_rank > 0:
        x = torch.empty(*tokens.shape, hidden_size)
        torch.distributed.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
    out = module(x)
    if pp_rank < pp - 1:
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    shards = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)  # (B, T, vocab/TP) x TP -> (B, T, vocab)


def _train_tp2_pp2_and_probe(rank, overrides, out):
    from tests.bloom_train import run_trainer

    trainer = run_trainer(overrides)
    cfg = trainer.cfg
    logits = running_model_logits(trainer.engine, probe_tokens(cfg.model.vocab_size), cfg.model.hidden_size)
    if logits is not None and trainer.engine.tp.rank == 0:
        torch.save(logits, out)


_TP2_PP2_RUN = {}  # pytest keeps one fixture instance per module that imports it: launch once


@pytest.fixture(scope="session")
def tp2_pp2_run(tmp_path_factory, data_cache):
    """bloom-train's trainer at TP2 x PP2 (4 processes, 4 heads), 2 iterations, checkpoint saved:
    (its run directory, the logits its running model computes on probe_tokens after the last
    step). One launch per session, shared with tests/test_hf_ecosystem.py."""
    if "run" not in _TP2_PP2_RUN:
        _TP2_PP2_RUN["run"] = _launch_tp2_pp2(tmp_path_factory, data_cache)
    return _TP2_PP2_RUN["run"]


def _launch_tp2_pp2(tmp_path_factory, data_cache):
    from parallelism.topology import Layout
    from tests.multiprocess import run_processes

    root = tmp_path_factory.mktemp("tp2-pp2")
    run = root / "run"
    overrides = TINY_RUN + [f"trainer.run_dir={run}", f"data.cache_dir={data_cache}", "parallel.tp=2",
                            "parallel.pp=2", "trainer.train_iters=2", "trainer.save_interval=2"]
    run_processes(_train_tp2_pp2_and_probe, Layout(2, 2, 1), overrides, str(root / "running.pt"))
    return run, torch.load(root / "running.pt")


def test_export_from_tp2_pp2_training_matches_the_training_model(tp2_pp2_run, tmp_path, capsys, monkeypatch):
    """bloom-train's trainer at TP2 x PP2 (4 processes) saves its checkpoint as four TP x PP shards
    (the embedding on both end stages); bloom-export merges them. HF's fp32 logits on the export
    equal the logits the running TP2 x PP2 model computes after its last optimizer step, gathered
    from its stages (an independent reference: a wrong merge, a swapped shard or a lost update
    would show), and the model card carries the run's facts."""
    from transformers import BloomForCausalLM

    from training.checkpoint.files import resolve_latest
    from training.checkpoint.saved_model import open_checkpoint

    run, running = tp2_pp2_run
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # left by in-process groups of earlier tests
    assert resolve_latest(run / "checkpoints") is not None
    directory, manifest, shape = open_checkpoint(run / "checkpoints")
    assert manifest["saved_layout"] == {"tp": 2, "pp": 2, "dp": 1}
    assert len([f for f in manifest["files"] if f.startswith("model/")]) == 4

    status, out, err = run_cli(export_cli.main, [run / "checkpoints", "--out", tmp_path / "hf", "--dtype", "fp32"], capsys)
    assert status == 0, err
    assert "self-check: logits max abs diff" in out
    hf = BloomForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        exported = hf(probe_tokens(shape["vocab_size"])).logits
    assert running.shape == exported.shape == (*PROBE_TOKENS, shape["padded_vocab_size"])
    assert (running - exported).abs().max().item() < LOGITS_ATOL
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| iterations | 2 |" in card and "| parallel layout (TP x PP x DP) | 2 x 2 x 1 |" in card
    assert "| lm_loss | 2 |" in card and "- en" in card  # metrics.jsonl and the data blend were found


def test_bloom_train_continues_an_import_at_tp2_pp2(hf_dir, imported, tmp_path, monkeypatch):
    """An imported HF model continued by bloom-train at TP2 x PP2 (4 processes): it resumes from
    the import, trains, and saves. Its first step's loss is HF's own loss on that batch (relative
    1e-5): the TP2 x PP2 model computes the imported function. That step runs at lr 0 (the warmup's
    first step, as in Megatron), so the weights it saves, exported back, must be the HF weights bit
    for bit: the import went through TP/PP sharding, the engine, Adam and the save."""
    from training.hf.export import export_checkpoint

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # left by in-process groups of earlier tests
    run = tmp_path / "run"
    args = [
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
        f"model.vocab_size={TOKENIZER_VOCAB}", f"model.padded_vocab_size={ROWS}", "data.seq_length=32",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "logging.log_interval=1",
        "logging.tensorboard=false", "optim.warmup_samples=8", "trainer.train_iters=1",
        "data.corpus=[data/corpora/udhr/en.jsonl,data/corpora/udhr/fr.jsonl]",
        f"data.tokenizer.path={imported / 'tokenizer'}", f"data.cache_dir={tmp_path / 'data'}",
        f"trainer.resume={imported}", f"trainer.run_dir={run}"]
    result = bloom_train(args + ["launcher.nproc_per_node=4", "parallel.tp=2", "parallel.pp=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {imported} at iteration 0" in result.stdout
    assert "new layout: weights and optimizer state reshaped" in result.stdout
    step = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert step["step"] == 1 and step["lr"] == 0.0
    expected = hf_loss_on_first_batch(hf_dir, args)
    assert abs(step["lm_loss"] - expected) / expected < 1e-5, (step["lm_loss"], expected)

    out = export_checkpoint(run / "checkpoints", tmp_path / "hf", "fp32").directory
    original = load_file(str(hf_dir / "model.safetensors"))
    original.pop("lm_head.weight", None)
    back = hf_tensors(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def hf_loss_on_first_batch(hf_dir: Path, args: list) -> float:
    """HF BloomForCausalLM's own loss (its logits, torch's cross entropy) on the micro-batches of
    the run's first global batch, as the run's data pipeline hands them out, averaged like the
    run's lm_loss (the mean of the micro-batches' masked token means)."""
    import torch.nn.functional as F
    from transformers import BloomForCausalLM

    from data.sampler import iter_global_batches
    from training.config.checks import batch_schedule
    from training.config.loader import load_config
    from training.trainer import build_run_data

    cfg = load_config(args)
    schedule = batch_schedule(cfg, 1)
    _, micro_batches = next(iter_global_batches(build_run_data(cfg, schedule).train, schedule, 0, 0))
    hf = BloomForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for batch in micro_batches:
            logits = hf(batch["tokens"]).logits
            token_losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            mask = batch["loss_mask"].flatten().float()
            losses.append(((token_losses * mask).sum() / mask.sum()).item())
    return sum(losses) / len(losses)
