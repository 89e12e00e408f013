"""The exported model's README.md: what was trained, on what, for how long, with which result.

Facts come from the checkpoint (manifest, trainer_state.json, config.yaml), the data summary the
preprocessing wrote (token counts per language, when its cache is still there) and the run's
metrics.jsonl (run_dir/metrics.jsonl, beside run_dir/checkpoints/) and its lm-evaluation-harness
reports (run_dir/harness/iter_N*.json, written by trainer.eval_tasks and bloom-eval --tasks, or a
report passed to bloom-export --harness-results): their scores become the card's `model-index`
(the Hub's format for evaluation results) and a table. Whatever is missing is left out rather than
guessed.
"""
import json
import math
import re
from pathlib import Path
from typing import Optional

from data.smoothing import smoothed_shares

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")  # ISO 639-1/3; "c", "python" are code, not languages


def read_trainer_state(directory: Path) -> dict:
    path = directory / "trainer_state.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def find_metrics(directory: Path) -> Optional[Path]:
    """run_dir/metrics.jsonl for a checkpoint at run_dir/checkpoints/iter_X."""
    path = directory.resolve().parent.parent / "metrics.jsonl"
    return path if path.is_file() else None


def final_losses(metrics: Path, iteration: int) -> dict:
    """The last logged lm_loss and validation losses at or before `iteration` (a torn or
    unparsable line is skipped: the log of a crashed run may end in one)."""
    last = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step")
        if not isinstance(step, int) or step > iteration:
            continue
        for key, value in record.items():
            if key == "lm_loss" or (key.startswith("valid") and key.endswith("_loss")):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    last[key] = (step, value)
    return last


def harness_file_scores(path) -> dict:
    """{task: {metric: value}} of a harness report: bloom-eval's JSON (--out) or a
    run_dir/harness/iter_N*.json; ValueError with one line when it is neither."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"harness results {path}: {error}") from None
    report = data.get("harness", data) if isinstance(data, dict) else None
    if not isinstance(report, dict) or not isinstance(report.get("scores"), dict):
        raise ValueError(f"harness results {path}: not a harness report (bloom-eval --tasks --out writes one)")
    return report["scores"]


def find_harness(directory: Path, iteration: int) -> dict:
    """{task: {metric: value}} measured on this checkpoint: every run_dir/harness/iter_<iteration>*.json
    (training's and bloom-eval's; on a task both measured, the newer file wins). Reports of other
    iterations describe other weights and are not used."""
    from training.evaluation.harness_tasks import read_report, report_path

    run_dir = directory.resolve().parent.parent
    stem = report_path(run_dir, iteration).stem
    found = {}
    for path in sorted(run_dir.glob(f"harness/{stem}*.json"), key=lambda p: p.stat().st_mtime):
        report = read_report(path)
        if report is not None and report.get("iteration", iteration) == iteration:
            found.update(report["scores"])
    return found


def blend_weights(config: Optional[dict], tokenizer_sha: Optional[str]) -> tuple:
    """(weights by dataset name, how they were obtained) from the run's data config: explicit
    weights as given, otherwise the alpha-smoothed token shares recomputed from the data summary
    made with this tokenizer (the rule data/blend.py applies)."""
    data = (config or {}).get("data") or {}
    explicit = {b["name"]: b["weight"] for b in data.get("blend") or [] if b.get("weight") is not None}
    explicit.update(data.get("weights") or {})
    if explicit:
        total = sum(explicit.values())
        return {k: v / total for k, v in explicit.items()}, "as configured"
    summary = _data_summary(data.get("cache_dir"), tokenizer_sha)
    if summary is None:
        return {}, None
    tokens = {name: out["tokens"] for name, out in summary["outputs"].items() if out.get("tokens")}
    alpha = float(data.get("alpha", 0.3))
    return smoothed_shares(tokens, alpha), f"token shares smoothed with alpha={alpha}"


def _data_summary(cache_dir: Optional[str], tokenizer_sha: Optional[str]) -> Optional[dict]:
    if not cache_dir or not tokenizer_sha:
        return None
    from data.paths import resolve_path

    found = []
    for path in resolve_path(cache_dir).glob("processed-*/summary.json"):
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            continue
        if summary.get("tokenizer", {}).get("sha256") == tokenizer_sha:
            found.append((path.stat().st_mtime, summary))
    return max(found, key=lambda item: item[0])[1] if found else None


def parameter_count(shape: dict) -> int:
    """BLOOM_FACTS.md: V*h + L*(12h^2 + 13h) + 4h, with FFN 4h and the padded vocabulary."""
    h, layers, vocab = shape["hidden_size"], shape["num_layers"], shape["padded_vocab_size"]
    return vocab * h + layers * (12 * h * h + 13 * h) + 4 * h


def render(name: str, shape: dict, manifest: dict, state: dict, config: Optional[dict],
           weights: dict, weights_how: Optional[str], losses: dict, export: dict,
           harness: Optional[dict] = None) -> str:
    languages = sorted(k for k in weights if LANGUAGE_CODE.match(k))
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [bloom, bloom-pretrain]"]
    if languages:
        lines += ["language:"] + [f"- {code}" for code in languages]
    lines += _model_index(name, harness or {})
    lines += ["---", "", f"# {name}", "",
              "A causal language model with BLOOM's architecture (ALiBi, embedding LayerNorm, tied "
              "embeddings), trained with bloom-pretrain and exported to `BloomForCausalLM`.", ""]
    lines += _model_section(shape, export) + _training_section(manifest, state, config)
    lines += _data_section(weights, weights_how) + _results_section(losses)
    lines += _harness_section(harness or {}) + _usage_section()
    return "\n".join(lines) + "\n"


def _model_section(shape: dict, export: dict) -> list:
    rows = [("parameters", f"{parameter_count(shape):,}"), ("layers", shape["num_layers"]),
            ("hidden size", shape["hidden_size"]), ("attention heads", shape["num_heads"]),
            ("tokenizer vocabulary", shape["vocab_size"]),
            ("embedding rows (config vocab_size)", f"{shape['padded_vocab_size']} (rows past the tokenizer's "
             "are padding, kept: they take part in the softmax)"),
            ("weights dtype", export["dtype"])]
    if export.get("self_check") is not None:
        rows.append(("export check", f"logits vs the training model, max abs diff {export['self_check']:.2e} (fp32)"))
    return ["## Model", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _training_section(manifest: dict, state: dict, config: Optional[dict]) -> list:
    rows = [("iterations", state.get("iteration", manifest.get("iteration")))]
    for key, label in (("consumed_samples", "samples seen"), ("consumed_tokens", "tokens seen")):
        if state.get(key) is not None:
            rows.append((label, f"{state[key]:,}"))
    layout = manifest.get("saved_layout")
    if layout:
        rows.append(("parallel layout (TP x PP x DP)", f"{layout.get('tp')} x {layout.get('pp')} x {layout.get('dp')}"))
    trainer, data, optim = ((config or {}).get(k) or {} for k in ("trainer", "data", "optim"))
    for label, value in (("sequence length", data.get("seq_length")), ("precision", trainer.get("precision")),
                         ("global batch size", trainer.get("global_batch_size")),
                         ("learning rate (peak -> min)", f"{optim['lr']} -> {optim['min_lr']}" if "lr" in optim else None)):
        if value is not None:
            rows.append((label, value))
    if manifest.get("imported_from"):
        rows.append(("imported from", manifest["imported_from"]))
    return ["## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None] + [""]


def _data_section(weights: dict, how: Optional[str]) -> list:
    if not weights:
        return []
    lines = ["## Data", "", f"Blend weights ({how}):", "", "| dataset | weight |", "|---|---|"]
    lines += [f"| {name} | {weight:.4f} |" for name, weight in sorted(weights.items(), key=lambda kv: -kv[1])]
    return lines + [""]


def _results_section(losses: dict) -> list:
    if not losses:
        return []
    lines = ["## Results", "", "Last logged values at or before the exported iteration:", "",
             "| metric | step | value |", "|---|---|---|"]
    order = sorted(losses, key=lambda k: (k != "lm_loss", k != "valid_loss", k))
    lines += [f"| {key} | {losses[key][0]} | {losses[key][1]:.4f} |" for key in order]
    return lines + [""]


def _headline(metrics: dict) -> dict:
    """The metrics a model-index lists: values, not their standard errors."""
    return {k: v for k, v in sorted(metrics.items()) if "stderr" not in k and math.isfinite(v)}


def _model_index(name: str, harness: dict) -> list:
    """The Hub's model-index front matter: one result per harness task (lm_eval's task name as the
    dataset, its metrics unrounded), not verified by the Hub."""
    if not any(_headline(m) for m in harness.values()):
        return []
    lines = ["model-index:", f"- name: {json.dumps(name)}", "  results:"]
    for task, metrics in sorted(harness.items()):
        if not _headline(metrics):
            continue
        lines += ["  - task:", "      type: text-generation", "    dataset:",
                  f"      name: {json.dumps(task)}", f"      type: {json.dumps(task)}", "    metrics:"]
        for metric, value in _headline(metrics).items():
            lines += [f"    - type: {json.dumps(metric)}", f"      name: {json.dumps(metric)}",
                      f"      value: {value!r}", "      verified: false"]
        lines += ["    source:", "      name: lm-evaluation-harness (bloom-pretrain)",
                  "      url: https://github.com/EleutherAI/lm-evaluation-harness"]
    return lines


def _harness_section(harness: dict) -> list:
    rows = [(task, metric, value, metrics.get(f"{metric}_stderr")) for task, metrics in sorted(harness.items())
            for metric, value in _headline(metrics).items()]
    if not rows:
        return []
    lines = ["## Downstream evaluation", "", "lm-evaluation-harness on the exported weights' checkpoint "
             "(bloom-eval --tasks / trainer.eval_tasks):", "", "| task | metric | value | stderr |", "|---|---|---|---|"]
    lines += [f"| {t} | {m} | {v:.4f} | {'' if e is None else f'{e:.4f}'} |" for t, m, v, e in rows]
    return lines + [""]


def _usage_section() -> list:
    return ["## Usage", "", "```python", "from transformers import AutoTokenizer, BloomForCausalLM", "",
            'tokenizer = AutoTokenizer.from_pretrained("path/or/repo")',
            'model = BloomForCausalLM.from_pretrained("path/or/repo")',
            'ids = tokenizer("The Universal Declaration of Human Rights", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))", "```"]
