"""Our exports in transformers 4.x: Flax BLOOM, PyTorch BLOOM and BloomTokenizerFast.

transformers 5 (this project's environment) removed Flax and folded BloomTokenizerFast into its
fast backend, so these run in a side environment the suite builds itself (tests/hf4_env.py:
transformers 4.57, jax/flax on CPU, torch CPU), with small scripts as subprocesses; references
(our training model's logits, our tokenizer's ids) are computed here and handed over as files.

- TP2 x PP2 (4 heads): `bloom-export --flax` of a checkpoint bloom-train saved at TP2 x PP2.
  FlaxBloomForCausalLM and FlaxBloomModel load it from flax_model.msgpack alone (a copy of the
  export without the safetensors, so nothing is converted from PyTorch weights at load time) and
  their logits equal the running TP2 x PP2 model's (fp32, max abs diff < 1e-4); so do
  transformers 4's PyTorch BloomForCausalLM's on the safetensors. The msgpack is byte for byte the
  file transformers writes itself after converting the safetensors (from_pt=True, save_pretrained)
  and what flax.serialization.to_bytes writes for the tree it reads; chunked (flax's large-array
  form) and sharded (transformers' index) forms load too.
- BloomTokenizerFast.from_pretrained(export) gives our tokenizer's ids on every shipped corpus.
- 6 heads (not a power of two): transformers 4.57's Flax BLOOM cannot build its ALiBi slopes
  (`jnp.cat`, which jax.numpy does not have): loading our export fails with that AttributeError
  inside build_alibi_tensor, and exactly the same way for a 6-head model transformers saved
  itself; with jnp.cat aliased to jnp.concatenate our export's Flax logits equal our model's,
  so the weights are right and only that line of transformers fails. PyTorch 4.x works for 6 heads.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import export_cli
from tests.bloom_train import data_cache  # noqa: F401
from tests.hf4_env import ensure_hf4_python, run_side
from tests.test_hf_export_import import (LOGITS_ATOL, ROWS, hf_tensors, probe_tokens,  # noqa: F401
                                         tp2_pp2_run)
from training.hf.flax_export import FLAX_INDEX, FLAX_WEIGHTS, write_flax_weights

CORPORA = Path(__file__).parent.parent / "data" / "corpora"


@pytest.fixture(scope="session")
def hf4_python():
    return ensure_hf4_python()


def _clear_dist_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # left by in-process groups of earlier tests


def _flax_only(export: Path, target: Path, weights=(FLAX_WEIGHTS,)) -> Path:
    """config.json + the given Flax weight files: no safetensors, so transformers cannot convert."""
    target.mkdir(parents=True)
    for name in ("config.json", *weights):
        shutil.copy(export / name, target / name)
    return target


@pytest.fixture(scope="module")
def tp2_pp2_export(tp2_pp2_run, tmp_path_factory):
    """`bloom-export --flax --dtype fp32` of the TP2 x PP2 checkpoint, the references, the
    msgpack rewritten chunked (tiny chunks) and sharded, and `bloom-export --flax` at bf16 with
    40KB shards, each in a flax-only directory."""
    from transformers import BloomForCausalLM, BloomModel

    run, running = tp2_pp2_run
    root = tmp_path_factory.mktemp("ecosystem")
    out = root / "export"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clear_dist_env(monkeypatch)
        status = export_cli.main([str(run / "checkpoints"), "--out", str(out), "--dtype", "fp32", "--flax"])
    assert status == 0
    assert (out / FLAX_WEIGHTS).is_file() and (out / "model.safetensors").is_file()
    tokens = probe_tokens_for(run)
    with torch.no_grad():
        hidden = BloomModel.from_pretrained(str(out), dtype=torch.float32).eval()(tokens).last_hidden_state
        hf5_logits = BloomForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(tokens).logits
    # bf16 (bloom-export's default dtype): the reference is transformers 5 on the bf16 safetensors
    # (the same bf16-rounded weights), computing in fp32 as Flax does with bf16 params.
    bf16 = root / "export-bf16"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clear_dist_env(monkeypatch)
        assert export_cli.main([str(run / "checkpoints"), "--out", str(bf16), "--flax",
                                "--max-shard-size", "40KB"]) == 0
    bf16_files = sorted(set(json.loads((bf16 / FLAX_INDEX).read_text())["weight_map"].values()))
    assert len(bf16_files) > 2 and not (bf16 / FLAX_WEIGHTS).exists()  # sharded by bloom-export itself
    with torch.no_grad():
        bf16_logits = BloomForCausalLM.from_pretrained(str(bf16), dtype=torch.float32).eval()(tokens).logits
    np.savez(root / "reference.npz", tokens=tokens.numpy(), running=running.numpy(), hidden=hidden.numpy(),
             bf16_logits=bf16_logits.numpy(), hf5_logits=hf5_logits.numpy())

    state = hf_tensors(out)
    chunked = _flax_only(out, root / "chunked", weights=())
    write_flax_weights(chunked, state, max_shard_size=1 << 40, max_chunk_size=4096)
    sharded = _flax_only(out, root / "sharded", weights=())
    assert write_flax_weights(sharded, state, max_shard_size=40_000) > 2
    return {"export": out, "flax_only": _flax_only(out, root / "flax-only"), "chunked": chunked,
            "bf16_flax_only": _flax_only(bf16, root / "bf16-flax-only", weights=(FLAX_INDEX, *bf16_files)),
            "sharded": sharded, "reference": root / "reference.npz", "work": root}


def probe_tokens_for(run: Path) -> torch.Tensor:
    """The tokens the running model was probed with (tests/test_hf_export_import.py)."""
    from training.checkpoint.saved_model import open_checkpoint

    _, _, shape = open_checkpoint(run / "checkpoints")
    return probe_tokens(shape["vocab_size"])


TP2_PP2_SCRIPT = r'''
import json, sys, numpy as np
from pathlib import Path
import flax, jax, torch, transformers
from flax import serialization
from flax.traverse_util import flatten_dict
from transformers import BloomForCausalLM, FlaxBloomForCausalLM, FlaxBloomModel

export, flax_only, chunked, sharded, bf16_flax_only, reference, work = map(Path, sys.argv[1:8])
ref = np.load(reference)
tokens, running = ref["tokens"], ref["running"]
diff = lambda a, b: float(np.abs(np.asarray(a, dtype=np.float64) - b).max())
out = {"versions": {"transformers": transformers.__version__, "jax": jax.__version__,
                    "flax": flax.__version__, "torch": torch.__version__}}

# Flax, from flax_model.msgpack alone (flax_only has no safetensors: nothing to convert from).
lm = FlaxBloomForCausalLM.from_pretrained(flax_only)
out["flax_lm_logits_diff"] = diff(lm(tokens).logits, running)
base = FlaxBloomModel.from_pretrained(flax_only)
hidden = np.asarray(base(tokens).last_hidden_state)
out["flax_base_hidden_diff"] = diff(hidden, ref["hidden"])
embedding = np.asarray(base.params["word_embeddings"]["embedding"])
out["flax_base_tied_logits_diff"] = diff(hidden @ embedding.T, running)

raw = (flax_only / "flax_model.msgpack").read_bytes()
stored = flatten_dict(serialization.msgpack_restore(raw))
loaded = flatten_dict(lm.params)
out["param_names"] = sorted("/".join(k) for k in stored)
out["loaded_is_the_file"] = (set(stored) == set(loaded)
                             and all(np.array_equal(np.asarray(loaded[k]), stored[k]) for k in stored))
out["flax_to_bytes_identical"] = serialization.to_bytes(serialization.msgpack_restore(raw)) == raw

# transformers' own PyTorch -> Flax conversion of our safetensors, saved by transformers (a copy
# without our msgpack: transformers 4.57 takes flax_model.msgpack first even with from_pt=True).
(work / "pt-only").mkdir()
for name in ("config.json", "model.safetensors"):
    (work / "pt-only" / name).write_bytes((export / name).read_bytes())
converted = FlaxBloomForCausalLM.from_pretrained(work / "pt-only", from_pt=True)
converted.save_pretrained(work / "hf-converted")
out["hf_conversion_identical"] = (work / "hf-converted" / "flax_model.msgpack").read_bytes() == raw

# The chunked form: what flax writes with MAX_CHUNK_SIZE = 4096, and it loads.
serialization.MAX_CHUNK_SIZE = 4096
chunked_raw = (chunked / "flax_model.msgpack").read_bytes()
out["chunked_has_chunks"] = b"__msgpack_chunked_array__" in chunked_raw
out["chunked_identical_to_flax"] = serialization.to_bytes(serialization.msgpack_restore(raw)) == chunked_raw
serialization.MAX_CHUNK_SIZE = 2 ** 30
out["chunked_logits_diff"] = diff(FlaxBloomForCausalLM.from_pretrained(chunked)(tokens).logits, running)
out["sharded_logits_diff"] = diff(FlaxBloomForCausalLM.from_pretrained(sharded)(tokens).logits, running)

# bf16 (bloom-export's default), sharded by bloom-export: stored and loaded as bfloat16, each shard
# what flax writes, the bf16 weights' logits.
bf16_lm = FlaxBloomForCausalLM.from_pretrained(bf16_flax_only)
out["bf16_dtypes"] = sorted({str(v.dtype) for v in jax.tree_util.tree_leaves(bf16_lm.params)})
shards = [p.read_bytes() for p in sorted(bf16_flax_only.glob("flax_model-*.msgpack"))]
out["bf16_shards"] = len(shards)
out["bf16_flax_to_bytes_identical"] = all(serialization.to_bytes(serialization.msgpack_restore(raw)) == raw
                                          for raw in shards)
out["bf16_logits_diff"] = diff(bf16_lm(tokens).logits, ref["bf16_logits"])

# transformers 4's PyTorch BloomForCausalLM on the safetensors.
pt = BloomForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
with torch.no_grad():
    pt4 = pt(torch.from_numpy(tokens)).logits.numpy()
out["pt4_logits_diff"] = diff(pt4, running)
out["pt4_vs_transformers5_diff"] = diff(pt4, ref["hf5_logits"])
print(json.dumps(out))
'''


def test_flax_and_transformers4_logits_equal_the_tp2_pp2_training_model(hf4_python, tp2_pp2_export):
    e = tp2_pp2_export
    r = run_side(hf4_python, TP2_PP2_SCRIPT, e["export"], e["flax_only"], e["chunked"], e["sharded"],
                 e["bf16_flax_only"], e["reference"], e["work"])
    assert r["versions"]["transformers"].startswith("4."), r["versions"]
    print(json.dumps({k: v for k, v in r.items() if k != "param_names"}))
    # The logits of the running TP2 x PP2 model, from the Flax classes and transformers 4 PyTorch.
    for key in ("flax_lm_logits_diff", "flax_base_tied_logits_diff", "flax_base_hidden_diff",
                "chunked_logits_diff", "sharded_logits_diff", "pt4_logits_diff", "pt4_vs_transformers5_diff",
                "bf16_logits_diff"):
        assert r[key] < LOGITS_ATOL, (key, r[key])
    # Exactly the file format and tree transformers and flax write themselves.
    assert r["loaded_is_the_file"] and r["flax_to_bytes_identical"] and r["hf_conversion_identical"], r
    assert r["chunked_has_chunks"] and r["chunked_identical_to_flax"], r
    assert r["bf16_dtypes"] == ["bfloat16"] and r["bf16_flax_to_bytes_identical"] and r["bf16_shards"] > 2, r
    assert "transformer/h/1/self_attention/query_key_value/kernel" in r["param_names"]
    assert not any(name.startswith("lm_head") for name in r["param_names"])  # tied
    index = json.loads((e["sharded"] / FLAX_INDEX).read_text())
    assert set(index["weight_map"]) == set(r["param_names"])


TOKENIZER_SCRIPT = r'''
import json, sys
from transformers import AutoTokenizer, BloomTokenizerFast
export, cases = sys.argv[1], json.load(open(sys.argv[2]))
tokenizer = BloomTokenizerFast.from_pretrained(export)
auto = AutoTokenizer.from_pretrained(export)
out = {"auto_class": type(auto).__name__, "files": {}}
for name, case in cases.items():
    ids = tokenizer(case["texts"])["input_ids"]
    out["files"][name] = {"texts": len(ids), "tokens": sum(map(len, ids)),
                          "different": [i for i, (a, b) in enumerate(zip(ids, case["ids"])) if a != b],
                          "auto_equal": auto(case["texts"])["input_ids"] == ids}
print(json.dumps(out))
'''


def test_bloom_tokenizer_fast_in_transformers4_gives_our_ids(hf4_python, tp2_pp2_export, tmp_path):
    """Every document of every shipped corpus (38 UDHR languages, Python, C): transformers 4's
    BloomTokenizerFast (and AutoTokenizer) on the export give the ids our data pipeline's
    tokenizer gives the trained run."""
    from data.tokenizer import TokenizerInfo

    ours = TokenizerInfo(tp2_pp2_export["export"])
    files = sorted(CORPORA.rglob("*.jsonl"))
    assert len(files) >= 40
    cases = {}
    for path in files:
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        cases[str(path.relative_to(CORPORA))] = {"texts": texts, "ids": ours.encode_batch(texts)}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    r = run_side(hf4_python, TOKENIZER_SCRIPT, tp2_pp2_export["export"], tmp_path / "cases.json")
    assert r["auto_class"] == "BloomTokenizerFast"
    assert set(r["files"]) == set(cases)
    for name, result in r["files"].items():
        assert result["texts"] == len(cases[name]["texts"]) and result["tokens"] > 0, name
        assert result["different"] == [] and result["auto_equal"], (name, result["different"][:5])


SIX_HEADS_SCRIPT = r'''
import json, sys, traceback, numpy as np
from pathlib import Path
import jax.numpy as jnp, torch
from transformers import BloomConfig, BloomForCausalLM, FlaxBloomForCausalLM, FlaxBloomModel

export, flax_only, reference, work = map(Path, sys.argv[1:5])
ref = np.load(reference)
tokens, ours = ref["tokens"], ref["logits"]
diff = lambda a, b: float(np.abs(np.asarray(a, dtype=np.float64) - b).max())

def failure(load):
    """How `load` fails: the exception and the transformers frame it was raised in."""
    try:
        load()
    except Exception as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "transformers" in f.filename]
        last = frames[-1]
        return {"type": type(error).__name__, "message": str(error),
                "where": f"{Path(last.filename).name}:{last.name}", "line": last.line}
    return None

out = {"has_cat": hasattr(jnp, "cat")}
config = json.loads((export / "config.json").read_text())
hf_config = BloomConfig(**{k: config[k] for k in ("vocab_size", "hidden_size", "n_layer", "n_head")})
out["ours_lm"] = failure(lambda: FlaxBloomForCausalLM.from_pretrained(flax_only))
out["ours_base"] = failure(lambda: FlaxBloomModel.from_pretrained(flax_only))
out["hf_fresh"] = failure(lambda: FlaxBloomForCausalLM(hf_config, seed=0))

# transformers cannot even make a 6-head Flax BLOOM; with jnp.cat defined it can, and saves one.
jnp.cat = jnp.concatenate
FlaxBloomForCausalLM(hf_config, seed=0).save_pretrained(work / "hf-saved-6-heads")
out["hf_saved_file"] = (work / "hf-saved-6-heads" / "flax_model.msgpack").is_file()
out["patched_ours_logits_diff"] = diff(FlaxBloomForCausalLM.from_pretrained(flax_only)(tokens).logits, ours)
del jnp.cat
out["hf_saved"] = failure(lambda: FlaxBloomForCausalLM.from_pretrained(work / "hf-saved-6-heads"))

pt = BloomForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
with torch.no_grad():
    out["pt4_logits_diff"] = diff(pt(torch.from_numpy(tokens)).logits.numpy(), ours)
print(json.dumps(out))
'''

SIX_HEADS = dict(hidden_size=48, num_layers=2, num_heads=6)


def test_six_heads_flax_fails_inside_transformers_as_for_its_own_model(hf4_python, single_process, tmp_path,
                                                                        monkeypatch):
    """A 6-head model (imported from a random HF model, exported with --flax): transformers 4.57's
    Flax BLOOM fails on `jnp.cat` in build_alibi_tensor for our export and for a model it saved
    itself, identically; transformers 4 PyTorch matches our training model."""
    from safetensors.torch import load_file

    from tests.hf_reference import random_hf_model
    from training.config.schema import ModelConfig
    from training.hf.convert import shard_from_hf
    from training.hf.export import export_checkpoint
    from training.hf.importer import import_hf
    from training.model.bloom import build_model, gather_logits

    _clear_dist_env(monkeypatch)
    hf_dir = tmp_path / "six-heads-hf"
    random_hf_model(ModelConfig(**SIX_HEADS, init_std=0.02), ROWS, seed=11).save_pretrained(
        str(hf_dir), safe_serialization=True)
    checkpoint = import_hf(hf_dir, tmp_path / "checkpoints")
    out = export_checkpoint(checkpoint, tmp_path / "export", "fp32", flax=True).directory

    original = load_file(str(hf_dir / "model.safetensors"))
    cfg = ModelConfig(**SIX_HEADS, vocab_size=ROWS, padded_vocab_size=ROWS, hidden_dropout=0.0,
                      attention_dropout=0.0, kernels="eager")
    ours = build_model(cfg, seed=0).eval()
    ours.load_state_dict(shard_from_hf(original, SIX_HEADS["num_layers"], 0, 1, ROWS))
    tokens = torch.randint(0, ROWS, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = gather_logits(ours(tokens))
    np.savez(tmp_path / "reference.npz", tokens=tokens.numpy(), logits=logits.numpy())

    r = run_side(hf4_python, SIX_HEADS_SCRIPT, out, _flax_only(out, tmp_path / "flax-only"),
                 tmp_path / "reference.npz", tmp_path)
    expected = {"type": "AttributeError", "message": "module 'jax.numpy' has no attribute 'cat'",
                "where": "modeling_flax_bloom.py:build_alibi_tensor",
                "line": "slopes = jnp.cat([slopes, jax.lax.pow(extra_base, extra_powers)], axis=0)"}
    print(json.dumps(r))
    assert r["has_cat"] is False
    assert r["ours_lm"] == r["ours_base"] == r["hf_fresh"] == r["hf_saved"] == expected, r
    assert r["hf_saved_file"]
    assert r["patched_ours_logits_diff"] < LOGITS_ATOL, r
    assert r["pt4_logits_diff"] < LOGITS_ATOL, r


def test_side_environment_fails_in_one_line_when_pip_cannot_install(tmp_path, monkeypatch):
    """PyPI out of reach (here: no index, no wheels, no pip config): the side environment's build
    fails the test with one message naming pip, never a skip; nothing counts as built."""
    from tests import hf4_env

    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("BLOOM_HF4_VENV", str(tmp_path / "venv"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(pytest.fail.Exception) as failed:
        hf4_env.ensure_hf4_python()
    message = str(failed.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("transformers-4 side environment: pip install transformers>=4.57,<5")
    assert "failed (is PyPI reachable?)" in message and "transformers" in message.split(":")[-1], message
    assert not (tmp_path / "venv" / hf4_env.MARKER).exists()


def test_side_environment_is_reused_when_complete_and_rebuilt_when_not(tmp_path, monkeypatch):
    """A complete side environment (its marker names these requirements) is used as it is, with
    no pip run (pip could not run here); one without the marker or built for other requirements
    is not trusted (ensure_hf4_python removes and rebuilds it: the pip test above shows a build)."""
    import os
    import sys

    from tests import hf4_env

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    monkeypatch.setenv("BLOOM_HF4_VENV", str(venv))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    (venv / hf4_env.MARKER).write_text(json.dumps({"requirements": hf4_env.REQUIREMENTS}))
    assert hf4_env.ensure_hf4_python() == venv / "bin" / "python"
    assert hf4_env._complete(venv)
    (venv / hf4_env.MARKER).write_text(json.dumps({"requirements": ["transformers==4.44.0"]}))
    assert not hf4_env._complete(venv)
    (venv / hf4_env.MARKER).unlink()
    assert not hf4_env._complete(venv)
