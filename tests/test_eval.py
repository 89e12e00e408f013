"""bloom-eval gives HF's loss on the same text, at TP1 (in this process) and at TP2 x PP2 and
PP2 x DP2 (4 processes under torchrun), overall and per language.

The reference is computed here without any of bloom-eval's code: transformers' AutoTokenizer,
a packing loop of its own (the rule of training/evaluation/eval_data.py, written independently) and
BloomForCausalLM's logits with torch's cross entropy.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch import eval_cli
from tests.test_hf_export_import import CORPUS, make_hf_dir, run_cli

SEQ, BATCH = 32, 3
REL_TOL = 1e-5


def write_eval_jsonl(path: Path) -> Path:
    """A few documents per language, two without a `lang`, and an empty one (skipped)."""
    records = []
    for corpus, count in zip(CORPUS, (8, 8, 2)):
        lines = corpus.read_text(encoding="utf-8").splitlines()[:count]
        for line in lines:
            record = json.loads(line)
            records.append({"text": record["text"][:800], "lang": record["lang"]})
    records += [{"text": "No language field here."}, {"text": "Nor here, 42."}, {"text": "   ", "lang": "en"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


@torch.no_grad()
def hf_reference(hf_dir: Path, jsonl: Path, seq_length: int) -> dict:
    """{set: (loss, predicted tokens)}: documents + EOS packed per set, windows of seq_length + 1
    tokens starting every seq_length tokens, HF's mean token cross entropy."""
    from transformers import AutoTokenizer, BloomForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = BloomForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    streams = {"overall": []}
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if not record["text"].strip():
            continue
        ids = tokenizer(record["text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        streams["overall"] += ids
        streams.setdefault(record.get("lang", "unknown"), []).extend(ids)
    result = {}
    for name, stream in streams.items():
        windows, start = [], 0
        while start + 1 < len(stream):
            windows.append(stream[start:start + seq_length + 1])
            start += seq_length
        total, count = 0.0, 0
        for length in {len(w) for w in windows}:  # the full windows in one batch, the short last one alone
            batch = torch.tensor([w for w in windows if len(w) == length])
            logits = model(batch[:, :-1]).logits
            total += F.cross_entropy(logits.double().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
        result[name] = (total / count, count)
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    hf_dir = make_hf_dir(root / "tiny-bloom", seed=11)
    jsonl = write_eval_jsonl(root / "text.jsonl")
    return hf_dir, jsonl, hf_reference(hf_dir, jsonl, SEQ)


def check_against_hf(report: dict, reference: dict) -> None:
    assert set(report["languages"]) == {"en", "fr", "python", "unknown"} == set(reference) - {"overall"}
    sets = {"overall": report["overall"], **report["languages"]}
    for name, (loss, tokens) in reference.items():
        got = sets[name]
        assert got["tokens"] == tokens, name
        assert got["loss"] == pytest.approx(loss, rel=REL_TOL), name
        assert got["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=2 * REL_TOL), name
    assert report["overall"]["documents"] == 20 and report["languages"]["unknown"]["documents"] == 2


def test_tp1_equals_hf_per_language(setup, capsys):
    hf_dir, jsonl, reference = setup
    status, out, err = run_cli(eval_cli.main, [hf_dir, "--data", jsonl, "--seq-length", SEQ,
                                               "--batch-size", BATCH, "model.kernels=eager"], capsys)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    report = json.loads(lines[0])
    assert report["layout"] == {"tp": 1, "pp": 1, "dp": 1} and report["imported_from_hf"]
    check_against_hf(report, reference)


def _clean_env() -> dict:
    # An earlier in-process group leaves RANK/WORLD_SIZE behind; a user's shell has none.
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


# The first runs the default kernels (auto: torch's SDPA on CPU), the second the eager reference.
@pytest.mark.parametrize("layout", ["parallel.tp=2 parallel.pp=2", "parallel.tp=1 parallel.pp=2 model.kernels=eager"],
                         ids=["tp2xpp2", "pp2xdp2"])
def test_four_processes_equal_hf(setup, layout):
    hf_dir, jsonl, reference = setup
    command = [sys.executable, "-m", "launch.eval_cli", str(hf_dir), "--data", str(jsonl), "--seq-length",
               str(SEQ), "--batch-size", str(BATCH), *layout.split(), "launcher.nproc_per_node=4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    tp, pp = (int(part.split("=")[1]) for part in layout.split()[:2])
    assert report["layout"] == {"tp": tp, "pp": pp, "dp": 4 // (tp * pp)}
    check_against_hf(report, reference)


def test_bad_input_is_refused_in_one_line(setup, tmp_path, capsys):
    hf_dir, jsonl, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "lang": "en"}\nnot json\n')
    cases = [
        ([hf_dir, "--data", bad], "bad.jsonl:2: line is not a JSON object"),
        ([hf_dir, "--data", bad, "parallel.tp=2", "launcher.nproc_per_node=2"], "bad.jsonl:2:"),  # before relaunching
        ([hf_dir, "--data", jsonl, "parallel.tp=3", "launcher.nproc_per_node=3"], "parallel.tp=3 does not divide"),
        ([hf_dir, "--data", jsonl, "model.hidden_size=8"], "only parallel.*"),
        ([tmp_path / "nothing", "--data", jsonl], "no such file"),
    ]
    for args, expected in cases:
        status, out, err = run_cli(eval_cli.main, args, capsys)
        assert status == 2 and len(err) == 1 and expected in err[0] and not out.strip(), (args, err)
        assert err[0].startswith("bloom-eval: error:")
