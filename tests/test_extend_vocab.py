"""bloom-extend-vocab: a new language (Georgian, absent from data/corpora) added to the demo
tokenizer and a demo-size BLOOM, then continued pretraining from the result.

The demo tokenizer is trained here exactly as the demo run trains it (DataConfig's defaults on
data/corpora); the model is a random HF BloomForCausalLM with the demo's 8192 rows, saved by HF.
The references are independent of the code under test: the tokenizers library and transformers'
AutoTokenizer on both tokenizer files, transformers' BloomForCausalLM on both Hub directories,
the mean of the original safetensors' rows, and a brute-force search for the byte rule.
"""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from launch import export_cli, extend_vocab_cli
from tests.bloom_train import bloom_train, step_losses
from tests.hf_reference import random_hf_model
from tests.test_hf_export_import import hf_tensors, run_cli
from training.config.schema import ModelConfig

REPO = Path(__file__).resolve().parents[1]
GEORGIAN = REPO / "tests" / "fixtures" / "georgian.jsonl"  # UDHR articles and prose, 42 documents
HELD_OUT = 10  # the last documents: tokens per byte are measured on text the BPE never saw
SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4)
ROWS = 8192  # bloom-tiny's pinned rows
ATOL = 1e-5


def documents(path: Path) -> list:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def old_language_texts() -> list:
    """Every document of the shipped corpus: 38 languages, Python and C."""
    return [t for path in sorted((REPO / "data" / "corpora").rglob("*.jsonl")) for t in documents(path)]


def write_jsonl(path: Path, texts: list) -> Path:
    path.write_text("".join(json.dumps({"text": t, "lang": "ka"}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    return path


def fast_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory) -> Path:
    """The tokenizer `bloom-train` trains for the demo (data/prepare.py with DataConfig's values)."""
    from data.config import DataConfig
    from data.tokenizer_train import train_tokenizer

    cfg = DataConfig()
    t = cfg.tokenizer
    return train_tokenizer([str(REPO / c) for c in cfg.corpus], tmp_path_factory.mktemp("demo") / "tokenizer",
                           vocab_size=t.vocab_size, alpha=t.alpha, sample_bytes=t.sample_bytes, seed=t.seed,
                           min_frequency=t.min_frequency)


@pytest.fixture(scope="module")
def georgian_train(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ka") / "ka.jsonl", documents(GEORGIAN)[:-HELD_OUT])


@pytest.fixture(scope="module")
def original(demo_tokenizer, tmp_path_factory) -> Path:
    """A demo-size BloomForCausalLM (random weights, LayerNorms and biases) with the demo tokenizer."""
    import shutil

    from training.hf.importer import TOKENIZER_FILES

    path = tmp_path_factory.mktemp("original") / "bloom-demo"
    model = random_hf_model(ModelConfig(**SHAPE, init_std=0.02), ROWS, seed=11)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 3
    model.save_pretrained(str(path), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_tokenizer / name, path / name)
    return path


@pytest.fixture(scope="module")
def extended(original, georgian_train, tmp_path_factory):
    """bloom-extend-vocab on the original with Georgian text, imported for bloom-train too."""
    root = tmp_path_factory.mktemp("extended")
    status = extend_vocab_cli.main([str(original), "--add-tokens", str(georgian_train), "--new-tokens", "1000",
                                    "--out", str(root / "hub"), "--checkpoint-out", str(root / "checkpoints")])
    assert status == 0
    return root / "hub", root / "checkpoints" / "iter_00000000"


# -- the tokenizer --------------------------------------------------------------------------------

def test_old_ids_and_merges_keep_their_places(original, extended):
    old, new = (json.loads((d / "tokenizer.json").read_text()) for d in (original, extended[0]))
    old_vocab, new_vocab = old["model"]["vocab"], new["model"]["vocab"]
    assert all(new_vocab[token] == i for token, i in old_vocab.items())
    added = sorted(i for token, i in new_vocab.items() if token not in old_vocab)
    assert len(added) > 100 and added == list(range(len(old_vocab), len(new_vocab)))
    assert new["model"]["merges"][:len(old["model"]["merges"])] == old["model"]["merges"]
    assert len(new["model"]["merges"]) - len(old["model"]["merges"]) == len(added)
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert new[key] == old[key], key


def test_merges_stored_as_strings_stay_strings(demo_tokenizer, georgian_train, extended, tmp_path):
    """The released BLOOM tokenizer.json writes merges as "a b" strings (tokenizers < 0.20); the
    extension keeps that style and appends the same entries as for the list style."""
    import shutil

    from data.tokenizer_extend import extend_tokenizer

    strings = tmp_path / "string-merges"
    shutil.copytree(demo_tokenizer, strings)
    data = json.loads((strings / "tokenizer.json").read_text())
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (strings / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    extend_tokenizer(strings, [str(georgian_train)], tmp_path / "out", new_tokens=1000)
    out = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]
    reference = json.loads((extended[0] / "tokenizer.json").read_text())["model"]
    assert all(isinstance(m, str) for m in out["merges"])
    assert [m.split(" ") for m in out["merges"]] == reference["merges"] and out["vocab"] == reference["vocab"]


def test_old_languages_tokenize_identically(original, extended):
    """Every document of the 40 old datasets, through the tokenizers library and through
    transformers' AutoTokenizer (what HF users and bloom-eval's harness load)."""
    from transformers import AutoTokenizer

    texts = old_language_texts()
    old, new = fast_tokenizer(original), fast_tokenizer(extended[0])
    old_ids = [e.ids for e in old.encode_batch(texts, add_special_tokens=False)]
    assert old_ids == [e.ids for e in new.encode_batch(texts, add_special_tokens=False)]
    hf_old, hf_new = (AutoTokenizer.from_pretrained(str(d)) for d in (original, extended[0]))
    assert len(hf_new) > len(hf_old) == 8000
    assert hf_new(texts[::7], add_special_tokens=False).input_ids == hf_old(texts[::7], add_special_tokens=False).input_ids


def test_georgian_tokens_per_byte_fall(original, extended):
    """On held-out Georgian: far fewer tokens per byte, ids past the old vocabulary, same text back."""
    held_out = documents(GEORGIAN)[-HELD_OUT:]
    size = sum(len(t.encode("utf-8")) for t in held_out)
    old, new = fast_tokenizer(original), fast_tokenizer(extended[0])
    before = sum(len(old.encode(t).ids) for t in held_out) / size
    new_ids = [new.encode(t).ids for t in held_out]
    after = sum(map(len, new_ids)) / size
    print(f"\nGeorgian held-out ({size} bytes): tokens per byte {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before
    assert any(i >= old.get_vocab_size() for ids in new_ids for i in ids)
    assert [new.decode(ids) for ids in new_ids] == held_out


def test_tokens_old_text_could_hold_are_left_out(demo_tokenizer, georgian_train, tmp_path):
    """New text that also holds Latin words (a .txt beside the JSONL; old characters only): their
    merges are left out, so a Latin probe outside the corpus tokenizes as before, while Georgian still gains."""
    from data.tokenizer_extend import extend_tokenizer

    latin = "Sakartvelo Kartuli Tbilisi Mtskheta Kutaisi Rustaveli Vepkhistkaosani"
    lines = tmp_path / "latin.txt"  # a plain-text source: a document per line
    lines.write_text("\n".join([latin] * 30) + "\n", encoding="utf-8")
    result = extend_tokenizer(demo_tokenizer, [str(georgian_train), str(lines)], tmp_path / "tok", new_tokens=1000)
    assert result.candidates > result.new_vocab - result.old_vocab  # some were dropped
    old, new = fast_tokenizer(demo_tokenizer), fast_tokenizer(tmp_path / "tok")
    for probe in (latin, latin.lower(), "Tbilisi and Kutaisi, 1948."):
        assert new.encode(probe).ids == old.encode(probe).ids, probe
    georgian = documents(GEORGIAN)[-1]
    assert len(new.encode(georgian).ids) < len(old.encode(georgian).ids) / 2


def test_byte_rule_against_brute_force():
    """can_occur_in_old_text against a search over every text of up to 5 old characters, for
    every byte substring of every 1-2 character text of old and new characters."""
    from data.tokenizer_extend import OldCharacters, can_occur_in_old_text

    old_chars, new_chars = ["a", " ", "é", "ж", "ა", "𝄞"], ["ვ", "ё", "€", "😀", "Ą"]
    old = OldCharacters.of(old_chars)
    old_texts = [("".join(t)).encode("utf-8") for n in range(1, 6) for t in itertools.product(old_chars, repeat=n)]
    fragments = set()
    for n in (1, 2):
        for text in itertools.product(old_chars + new_chars, repeat=n):
            data = "".join(text).encode("utf-8")
            fragments.update(data[i:j] for i in range(len(data)) for j in range(i + 1, min(len(data), i + 4) + 1))
    assert len(fragments) > 200
    for fragment in sorted(fragments):
        expected = any(fragment in text for text in old_texts)
        assert can_occur_in_old_text(fragment, old) == expected, fragment


# -- the model --------------------------------------------------------------------------------------

def test_old_logits_equal_the_original(original, extended):
    """transformers loads both Hub directories; on text of old tokens the old rows' logits are the
    original's (the tied head's old rows are the old embedding), every new row is the mean of the
    original's token rows, and config.json's vocab_size is the padded rows."""
    from transformers import BloomForCausalLM
    from safetensors.torch import load_file

    hub = extended[0]
    meta = json.loads((hub / "extend_vocab.json").read_text())
    old_vocab, new_vocab, rows = meta["old_vocab_size"], meta["new_vocab_size"], meta["new_rows"]
    assert rows == max(ROWS, math.ceil(new_vocab / 128) * 128) and rows % 128 == 0
    assert json.loads((hub / "config.json").read_text())["vocab_size"] == rows

    texts = [t for t in old_language_texts() if len(t) > 200][::25][:6]
    ids = [e.ids[:48] for e in fast_tokenizer(hub).encode_batch(texts, add_special_tokens=False)]
    tokens = torch.tensor([row for row in ids if len(row) == 48])
    assert tokens.shape[0] >= 4 and tokens.max() < old_vocab
    before = BloomForCausalLM.from_pretrained(str(original), dtype=torch.float32).eval()
    after = BloomForCausalLM.from_pretrained(str(hub), dtype=torch.float32).eval()
    with torch.no_grad():
        old_logits, new_logits = before(tokens).logits, after(tokens).logits
    assert new_logits.shape[-1] == rows
    assert torch.allclose(new_logits[..., :old_vocab], old_logits[..., :old_vocab], atol=ATOL, rtol=0)

    embedding = load_file(str(original / "model.safetensors"))["transformer.word_embeddings.weight"]
    grown = after.transformer.word_embeddings.weight.detach()
    assert torch.equal(grown[:old_vocab], embedding[:old_vocab])
    assert torch.allclose(grown[old_vocab:new_vocab], embedding[:old_vocab].mean(0).expand(new_vocab - old_vocab, -1),
                          atol=1e-7, rtol=0)
    assert torch.equal(grown[new_vocab:ROWS], embedding[new_vocab:ROWS])  # old padding rows kept
    assert not grown[max(new_vocab, ROWS):].any()  # new padding rows zero


def test_normal_init_and_our_checkpoint_as_model(original, extended, tmp_path):
    """MODEL as our checkpoint (bloom-import of the original), tokens from a tokenizer directory
    (the Georgian extension's): the same tokenizer results, and --init normal draws the new rows
    at the requested std while every old row is the original's."""
    from safetensors.torch import load_file

    from training.hf.extend_vocab import extend_model
    from training.hf.importer import import_hf

    checkpoint = import_hf(original, tmp_path / "checkpoints")
    result = extend_model(checkpoint.parent, [str(extended[0])], tmp_path / "hub", init="normal", init_std=0.05)
    assert (fast_tokenizer(result.directory).to_str() == fast_tokenizer(extended[0]).to_str())
    old_vocab, new_vocab = result.old_vocab, result.new_vocab
    embedding = load_file(str(original / "model.safetensors"))["transformer.word_embeddings.weight"]
    grown = hf_tensors(result.directory)["transformer.word_embeddings.weight"]
    assert torch.equal(grown[:old_vocab], embedding[:old_vocab])
    new_rows = grown[old_vocab:new_vocab]
    assert abs(new_rows.std().item() - 0.05) < 0.005 and abs(new_rows.mean().item()) < 0.005
    original_rest = {k: v for k, v in load_file(str(original / "model.safetensors")).items()
                     if "word_embeddings.weight" not in k and k != "lm_head.weight"}
    back = hf_tensors(result.directory)
    assert all(torch.equal(back[k], v) for k, v in original_rest.items())


def test_continued_run_trains_and_exports(extended, tmp_path, capsys, monkeypatch):
    """bloom-train continues from the extended model's import on a blend of Georgian (75%) and
    replayed English and French (25%), with trainer.resume=auto in the run directory the import
    was written to (as experiment=bloom-560m-continue starts): it resumes from the import, its
    losses are finite, and its checkpoint exports
    to a directory transformers loads with the extended vocabulary, Georgian tokenized with new ids."""
    from transformers import AutoTokenizer, BloomForCausalLM

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # left by in-process groups of earlier tests
    hub, checkpoint = extended
    meta = json.loads((hub / "extend_vocab.json").read_text())
    run = checkpoint.parent.parent  # --checkpoint-out was RUN/checkpoints
    result = bloom_train([
        *(f"model.{k}={v}" for k, v in SHAPE.items()),
        f"model.vocab_size={meta['new_vocab_size']}", f"model.padded_vocab_size={meta['new_rows']}",
        "data.seq_length=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
        "logging.log_interval=1", "logging.tensorboard=false", "optim.warmup_samples=4", "optim.lr=3e-4", "optim.min_lr=3e-5",
        "trainer.train_iters=3",
        f"data.corpus=[{REPO}/data/corpora/udhr/en.jsonl,{REPO}/data/corpora/udhr/fr.jsonl,{GEORGIAN}]",
        "data.blend=[{name: ka, weight: 0.75},{name: en, weight: 0.125},{name: fr, weight: 0.125}]",
        f"data.tokenizer.path={checkpoint / 'tokenizer'}", f"data.cache_dir={tmp_path / 'data'}",
        "trainer.resume=auto", f"trainer.run_dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint} at iteration 0" in result.stdout
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(loss) for loss, _ in losses.values())

    status, out, err = run_cli(export_cli.main, [run / "checkpoints", "--out", tmp_path / "hf", "--dtype", "fp32"], capsys)
    assert status == 0, err
    model = BloomForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert model.config.vocab_size == meta["new_rows"] == model.transformer.word_embeddings.weight.shape[0]
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(tokenizer) == meta["new_vocab_size"]
    ids = tokenizer(documents(GEORGIAN)[-1], return_tensors="pt").input_ids
    assert ids.max() >= meta["old_vocab_size"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# -- the command line and the experiment -------------------------------------------------------------

def test_bad_inputs_are_refused_in_one_line(original, extended, georgian_train, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "no model": ([tmp_path / "nowhere", "--add-tokens", georgian_train, "--out", tmp_path / "a"], "no such file"),
        "out not empty": ([original, "--add-tokens", georgian_train, "--out", extended[0]], "not empty"),
        "no text": ([original, "--add-tokens", empty, "--out", tmp_path / "b"], "no usable documents"),
        "tp": ([original, "--add-tokens", georgian_train, "--out", tmp_path / "c", "--tp", "0"], "--tp"),
    }
    for case, (args, expected) in cases.items():
        status, _, err = run_cli(extend_vocab_cli.main, args, capsys)
        assert status == 2 and len(err) == 1 and err[0].startswith("bloom-extend-vocab: error:"), (case, err)
        assert expected in err[0], (case, err)
    assert not list(tmp_path.glob(".*"))  # no staging left behind


def test_continue_experiment_plans(tmp_path):
    """experiment=bloom-560m-continue through bloom-train's dry run (config, validation, plan):
    the extended vocabulary, a tenth of bloom-560m's peak lr, a warm-up, 25% replay."""
    from training.plan.planner import load_planned_config

    cfg = load_planned_config(["experiment=bloom-560m-continue"])
    pretraining = load_planned_config(["experiment=bloom-560m"])
    assert cfg.optim.lr == pytest.approx(pretraining.optim.lr / 10) and cfg.optim.warmup_samples > 0
    weights = {spec.name: spec.weight for spec in cfg.data.blend}
    assert weights.pop("ka") == pytest.approx(0.75) and sum(weights.values()) == pytest.approx(0.25)
    assert cfg.model.vocab_size > pretraining.model.vocab_size and cfg.trainer.resume == "auto"
    result = bloom_train(["experiment=bloom-560m-continue", "trainer.dry_run=true", f"trainer.run_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"vocab padded to {cfg.model.padded_vocab_size:,}" in result.stdout
