"""lm-evaluation-harness on our distributed model (training/evaluation/harness.py), without hub access.

Three local tasks over JSONL files this module writes (a multiple-choice task, a loglikelihood task
with an empty context and a context longer than the model's length, and a rolling-perplexity task
whose documents span several windows). One launch of each:
- bloom-train at PP2 x DP2 (4 processes) with trainer.eval_tasks every 2 of 4 iterations; it saves;
- bloom-eval --tasks on that checkpoint at TP2 x PP2 (4 processes), every request's answer logged;
- bloom-export (fp32) of the checkpoint, and lm_eval's own HF model (HFLM, its Python API) on it.
The reference for the adapter's log-likelihoods is HFLM on the export, request by request; the
reference for training's harness metrics is bloom-eval on the saved checkpoint at another layout.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bloom_train import TINY_RUN, data_cache  # noqa: F401
from tests.test_launch_slurm import in_ci

try:
    import lm_eval  # noqa: F401
except ImportError as error:  # a declared test dependency: setup.py's [test] extra
    reason = f"lm_eval cannot be imported ({error}): pip install -e .[test]"
    if in_ci():
        pytest.fail(f"CI=true, and {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

TASKS = ["bloomtest_mc", "bloomtest_ll", "bloomtest_rolling"]
SEQ = 32  # TINY_RUN's data.seq_length: the harness's max_length
REL_TOL = 1e-5
CORPUS = Path(__file__).parent.parent / "data" / "corpora" / "udhr" / "en.jsonl"


def write_tasks(root: Path) -> Path:
    """JSONL documents from the shipped English corpus and one task YAML per output type."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    sentences = [s.strip() + "." for t in texts for s in t.split(".") if len(s.strip()) > 20][:40]
    half = lambda s: len(s) // 2  # noqa: E731
    mc = [{"question": s[:half(s)], "answer": i % 3,
           "choices": [s[half(s):][:50], sentences[(i + 7) % 40][half(s):][:50] or " x", " the"]}
          for i, s in enumerate(sentences[:12])]
    ll = [{"context": s[:-40], "continuation": s[-40:]} for s in sentences[12:24]]
    ll.append({"context": " ".join(texts[:3])[:3000], "continuation": " all human beings"})  # left-truncated
    ll.append({"context": "", "continuation": sentences[30][:40]})  # the prefix token as context
    rolling = [{"text": t[:1500]} for t in texts[:4]]  # many windows of SEQ tokens
    metrics = {"mc": ["acc", "acc_norm"], "ll": ["perplexity", "acc"],
               "rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}
    fields = {"mc": ("multiple_choice", "{{question}}", "{{answer}}", "doc_to_choice: \"{{choices}}\"\n"),
              "ll": ("loglikelihood", "{{context}}", "{{continuation}}", ""),
              "rolling": ("loglikelihood_rolling", "", "{{text}}", "")}
    for name, rows in (("mc", mc), ("ll", ll), ("rolling", rolling)):
        data = root / f"{name}.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        output_type, text, target, extra = fields[name]
        (root / f"bloomtest_{name}.yaml").write_text(
            f"task: bloomtest_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\ndoc_to_text: \"{text}\"\n"
            f"doc_to_target: \"{target}\"\n{extra}metric_list:\n" + "".join(f"  - metric: {m}\n" for m in metrics[name]))
    (root / "bloomtest_generate.yaml").write_text(  # a task the adapter refuses
        f"task: bloomtest_generate\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'll.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_target: \"{{continuation}}\"\nmetric_list:\n  - metric: exact_match\n")
    return root


def clean_env() -> dict:
    """No process-group variables left by in-process tests, and no hub access."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run(command, timeout=600):
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                            timeout=timeout, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# -- the three launches ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("harness-tasks"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache, tasks_dir):  # noqa: F811
    """bloom-train at PP2 x DP2 with the tasks every 2 iterations; its run directory."""
    run_dir = tmp_path_factory.mktemp("harness-train") / "run"
    run(["launch.train_cli", *TINY_RUN, f"trainer.run_dir={run_dir}", f"data.cache_dir={data_cache}",
         "parallel.pp=2", "launcher.nproc_per_node=4", "trainer.train_iters=4", "trainer.save_interval=4",
         f"trainer.eval_tasks.tasks=[{','.join(TASKS)}]", "trainer.eval_tasks.interval=2",
         f"trainer.eval_tasks.include_path={tasks_dir}", "trainer.eval_tasks.batch_size=5",
         # BLOOM trains without dropout; with it, a harness run in training mode would show.
         "model.hidden_dropout=0.1", "model.attention_dropout=0.1"])
    return run_dir


@pytest.fixture(scope="module")
def bloom_eval(trained, tasks_dir, tmp_path_factory):
    """bloom-eval --tasks on the saved checkpoint at TP2 x PP2: (stdout's JSON, --out's JSON)."""
    out = tmp_path_factory.mktemp("harness-eval") / "scores.json"
    result = run(["launch.eval_cli", str(trained / "checkpoints"), "--tasks", ",".join(TASKS),
                  "--include-path", str(tasks_dir), "--log-samples", "--batch-size", "3", "--out", str(out),
                  "parallel.tp=2", "parallel.pp=2", "launcher.nproc_per_node=4"])
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout[-2000:]  # one JSON object on stdout, nothing else
    return json.loads(lines[0]), json.loads(out.read_text())


@pytest.fixture(scope="module")
def hf_reference(trained, tasks_dir, tmp_path_factory):
    """lm_eval's HF model (HFLM) on the fp32 export of the same checkpoint: (export dir, lm_eval's output)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    export = tmp_path_factory.mktemp("harness-export") / "tiny-bloom"
    run(["launch.export_cli", str(trained / "checkpoints"), "--out", str(export), "--dtype", "fp32"])
    out = simple_evaluate(model="hf", model_args={"pretrained": str(export), "dtype": "float32",
                                                  "max_length": SEQ, "device": "cpu"},
                          tasks=TASKS, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), batch_size=4,
                          log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    return export, out


# -- the tests ---------------------------------------------------------------------------------------

def _answer(resp) -> tuple:
    """(log-likelihood, is greedy or None) of one request's response, as lm_eval logs it: a list
    of repeats of (log-likelihood, is greedy) or, for rolling, of the log-likelihood."""
    while isinstance(resp, (list, tuple)) and resp and isinstance(resp[0], (list, tuple)):
        resp = resp[0]
    if isinstance(resp, (list, tuple)):
        return float(resp[0]), (bool(resp[1]) if len(resp) > 1 else None)
    return float(resp), None


def test_adapter_at_tp2_pp2_equals_lm_eval_hf_per_request(bloom_eval, hf_reference):
    """Every request of every task: the same arguments (our tokenizer and splitting saw the same
    strings) and log-likelihoods within 1e-5 relative of HFLM's, the same greedy flags, and so the
    same accuracies and perplexities."""
    report, _ = bloom_eval
    assert report["layout"] == {"tp": 2, "pp": 2, "dp": 1} and report["harness"]["max_length"] == SEQ
    ours, (_, theirs) = report["harness"], hf_reference
    compared = 0
    for task in TASKS:
        reference = {s["doc_id"]: s for s in theirs["samples"][task]}
        assert len(ours["samples"][task]) == len(reference) > 0, task
        for sample in ours["samples"][task]:
            expected = reference[sample["doc_id"]]
            assert sample["arguments"] == [list(a) for a in expected["arguments"]], (task, sample["doc_id"])
            assert len(sample["resps"]) == len(expected["resps"])
            for got, want in zip(map(_answer, sample["resps"]), map(_answer, expected["resps"])):
                assert got[0] == pytest.approx(want[0], rel=REL_TOL), (task, sample["doc_id"], got, want)
                assert got[1] == want[1], (task, sample["doc_id"], got, want)  # greedy flags
                compared += 1
        for key, value in theirs["results"][task].items():
            metric = key.split(",")[0]
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["scores"][task][metric] == pytest.approx(value, rel=REL_TOL), (task, metric)
    assert compared == 12 * 3 + 14 + 4
    # The requests that exercise truncation and the prefix token were there, as intended.
    contexts = [s["arguments"][0][0] for s in ours["samples"]["bloomtest_ll"]]
    assert "" in contexts and max(len(c) for c in contexts) > 500  # ~130 tokens, SEQ is 32


def test_training_metrics_equal_bloom_eval_on_the_checkpoint(trained, bloom_eval):
    """trainer.eval_tasks at PP2 x DP2 logs harness/<task>/<metric> at iterations 2 and 4; those
    of iteration 4 (the saved weights) equal bloom-eval's at TP2 x PP2, as do the reports on disk."""
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: {k: v for k, v in r.items() if k.startswith("harness/")} for r in records
              if any(k.startswith("harness/") for k in r)}
    assert sorted(logged) == [2, 4]
    report, written = bloom_eval
    assert written == report and report["iteration"] == 4
    expected = {f"harness/{task}/{metric}": value for task, row in report["harness"]["scores"].items()
                for metric, value in row.items()}
    assert set(logged[4]) == set(expected) and "harness/bloomtest_rolling/bits_per_byte" in expected
    for key, value in expected.items():
        assert logged[4][key] == pytest.approx(value, rel=REL_TOL), key
    assert logged[2]["harness/bloomtest_rolling/bits_per_byte"] != logged[4]["harness/bloomtest_rolling/bits_per_byte"]
    on_disk = json.loads((trained / "harness" / "iter_00000004.json").read_text())
    assert on_disk["scores"] == {t: {m: logged[4][f"harness/{t}/{m}"] for m in row} for t, row in on_disk["scores"].items()}
    assert on_disk["layout"] == {"tp": 1, "pp": 2, "dp": 2}
    assert (trained / "harness" / "iter_00000004-eval.json").is_file()  # bloom-eval's, beside the run


def test_export_model_card_model_index_holds_the_scores(trained, hf_reference):
    """The exported README's model-index, read back by huggingface_hub, lists each task's metrics
    (no stderrs) with the values training logged for the exported iteration."""
    from huggingface_hub import ModelCard

    export, _ = hf_reference
    card = ModelCard.load(str(export / "README.md"))
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for r in records if r["step"] == 4 for k, v in r.items()
              if k.startswith("harness/") and "stderr" not in k and math.isfinite(v)}
    assert {f"harness/{t}/{m}" for t, m in results} == set(logged)
    for (task, metric), value in results.items():
        assert value == pytest.approx(logged[f"harness/{task}/{metric}"], rel=REL_TOL)
    assert "## Downstream evaluation" in card.text


def test_bad_harness_input_is_one_line(trained, tasks_dir, tmp_path, capsys, monkeypatch):
    from launch import eval_cli, export_cli

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # left by in-process groups of earlier tests
    checkpoint = trained / "checkpoints"
    cases = [
        ([checkpoint, "--tasks", "bloomtest_mc,nosuchtask", "--include-path", tasks_dir], "unknown harness task(s) nosuchtask"),
        ([checkpoint, "--tasks", "bloomtest_mc", "--include-path", tmp_path / "none"], "is not a directory"),
        ([checkpoint], "nothing to evaluate"),
        ([checkpoint, "--tasks", "bloomtest_generate", "--include-path", tasks_dir], "bloomtest_generate generate text"),
        ([checkpoint, "--tasks", "bloomtest_mc", "--include-path", tasks_dir, "--limit", "0"], "must be positive"),
    ]
    for args, expected in cases:
        status = eval_cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and expected in lines[0] and not out.strip(), (args, err)
    (tmp_path / "bad.json").write_text("{}")
    status = export_cli.main([str(checkpoint), "--out", str(tmp_path / "x"), "--harness-results", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "not a harness report" in err[0]
