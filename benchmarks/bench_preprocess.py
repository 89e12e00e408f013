"""Throughput of bloom-preprocess against the tokenizer's own batch-encode speed.

    python benchmarks/bench_preprocess.py [--tokenizer DIR] [--repeat 5] [--scale 1] [--workers N]

Both sides tokenize the same texts (every document of the shipped corpus, `--scale` copies of
it): the reference is `Tokenizer.encode_batch` on the texts already in memory (no reading, no
JSON, no writing); the pipeline is `data.preprocess_run.preprocess` from the JSONL files to
.bin/.idx + summary. The overhead is pipeline time / reference time - 1 (best of --repeat
runs each). The CLI's process start-up (Python + imports) is reported on its own line.
Nothing here is asserted: it prints numbers.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.paths import SHIPPED_CORPUS  # noqa: E402
from data.preprocess_run import PreprocessOptions, preprocess  # noqa: E402
from data.sources import expand_inputs, iter_records  # noqa: E402
from data.tokenizer import TokenizerInfo  # noqa: E402
from data.tokenizer_train import train_tokenizer  # noqa: E402


def corpus_copy(root: Path, scale: int) -> Path:
    """`scale` copies of the shipped corpus side by side (same texts, more of them)."""
    target = root / "corpus"
    for i in range(scale):
        shutil.copytree(SHIPPED_CORPUS, target / f"copy{i}")
    return target


def texts_of(corpus: Path) -> list[str]:
    return [json.loads(raw)["text"] for s in expand_inputs([corpus]) for _, raw in iter_records(s)]


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer dir (default: train one, vocab 8000)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="copies of the shipped corpus")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir = args.tokenizer or train_tokenizer([SHIPPED_CORPUS], root / "tok", vocab_size=8000)
        corpus = corpus_copy(root, args.scale)
        texts = texts_of(corpus)
        tok = TokenizerInfo(tok_dir).tokenizer
        n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))  # also warms the tokenizer up
        reference = best_of(args.repeat, lambda: tok.encode_batch(texts))
        reference_fast = best_of(args.repeat, lambda: tok.encode_batch_fast(texts))
        options = PreprocessOptions(workers=args.workers, progress=False)
        pipeline = best_of(args.repeat, lambda: preprocess([corpus], tok_dir, root / "out", options))
        cli = best_of(1, lambda: subprocess.run(
            [sys.executable, "-m", "data.preprocess", "-i", str(corpus), "--tokenizer", str(tok_dir),
             "-o", str(root / "out_cli"), "--quiet"] + ([f"--workers={args.workers}"] if args.workers else []),
            check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1]))
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"corpus: {len(texts)} documents, {mb:.2f} MB, {n_tokens} tokens; cores: {os.cpu_count()}; "
              f"workers: {args.workers or 'default'}")
        print(f"{'tokenizer encode_batch (in memory)':44s} {reference:8.3f} s  {n_tokens / reference:12,.0f} tok/s")
        print(f"{'tokenizer encode_batch_fast (in memory)':44s} {reference_fast:8.3f} s  {n_tokens / reference_fast:12,.0f} tok/s")
        print(f"{'bloom-preprocess pipeline (files -> .bin)':44s} {pipeline:8.3f} s  {n_tokens / pipeline:12,.0f} tok/s")
        print(f"{'bloom-preprocess CLI incl. process start':44s} {cli:8.3f} s")
        print(f"pipeline / encode_batch = {pipeline / reference:.3f}  (overhead {100 * (pipeline / reference - 1):+.1f}%)")
        print(f"pipeline / encode_batch_fast = {pipeline / reference_fast:.3f}  "
              f"(overhead {100 * (pipeline / reference_fast - 1):+.1f}%)")


if __name__ == "__main__":
    main()
