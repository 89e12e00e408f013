"""Per-core throughput of bloom-preprocess on JSONL and Parquet against the tokenizer alone.

    python benchmarks/bench_preprocess.py [--tokenizer DIR] [--repeat 3] [--scale 10]
                                          [--row-group-rows 1000] [--copy-mb 512]

Everything runs on one core: one process, workers=1, the tokenizer's thread pool held to one
thread (RAYON_NUM_THREADS=1), so each rate is a per-core rate; the pipeline runs one such worker
per core. All sides see the same texts (every document of the shipped corpus, `--scale` copies
of it), as JSONL files and as the same rows in Parquet files:
  - the reference: `Tokenizer.encode_batch` on the texts already in memory (no reading, no
    parsing, no writing);
  - the pipeline: `data.preprocess_run.preprocess` from the files to .bin/.idx + summary;
  - the main process's share: reading the files and cutting and pickling the chunks it sends to
    the workers (`_Run._chunks`), which it does for all the workers of a node;
  - the merge's cost: copying a file of `--copy-mb` MB once (read + write + fsync), as a merge of
    shard outputs reads and writes every output byte once.
Rates are MB of text (UTF-8) and tokens per second (best of --repeat rounds, each round running
every side once, so bursts of load on a shared machine hit all sides alike). Nothing is asserted.

It ends with the hours a corpus like ROOTS would take (--text-tb of text, --tokens-b billion
tokens) on N nodes x C cores: tokenizing at the per-core Parquet rate on every core, or at the
rate a node's one main process feeds its workers if that is lower, plus the merge reading and
writing every output byte once (4 bytes a token for BLOOM's 250k vocab, 2 below 65536) on one node.
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

# One tokenizer thread: set before the tokenizer's pool starts (at its first parallel call).
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pickle  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from data.paths import SHIPPED_CORPUS  # noqa: E402
from data.preprocess_run import PreprocessOptions, _Run, preprocess  # noqa: E402
from data.sources import expand_inputs, iter_records  # noqa: E402
from data.tokenizer import TokenizerInfo  # noqa: E402
from data.tokenizer_train import train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def corpus_copy(root: Path, scale: int) -> Path:
    """`scale` copies of the shipped corpus side by side (same texts, more of them)."""
    target = root / "jsonl"
    for i in range(scale):
        shutil.copytree(SHIPPED_CORPUS, target / f"copy{i}")
    return target


def parquet_copy(jsonl: Path, root: Path, row_group_rows: int) -> tuple[Path, Path]:
    """The same rows (text, lang) as Parquet, one file per JSONL file; and all in one file (the
    reading rate of large files, as real corpora have, without a file open per 2,000 rows)."""
    target, tables = root / "parquet", []
    for path in sorted(jsonl.rglob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out = target / path.relative_to(jsonl).with_suffix(".parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        tables.append(pa.table({"text": [r["text"] for r in rows], "lang": [r["lang"] for r in rows]}))
        pq.write_table(tables[-1], out, row_group_size=row_group_rows)
    pq.write_table(pa.concat_tables(tables), root / "one.parquet", row_group_size=row_group_rows)
    return target, root / "one.parquet"


def texts_of(corpus: Path) -> list[str]:
    return [json.loads(raw)["text"] for s in expand_inputs([corpus]) for _, raw in iter_records(s)]


def best_of_rounds(repeat: int, fns: dict) -> dict:
    """Best time of each function over `repeat` rounds, each round running every function once:
    on a shared machine a burst of load then hits all sides alike, not one side's every run."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main_process_share(corpus: Path, info: TokenizerInfo, out: Path) -> None:
    """What the main process does per chunk besides writing: read, cut, pickle for a worker."""
    run = _Run(expand_inputs([corpus]), info, out, PreprocessOptions(progress=False))
    for chunk in run._chunks():
        pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)


def copy_rate(root: Path, megabytes: int) -> float:
    """MB/s of one read + write + fsync of a file, as a merge does for each output byte."""
    src, dst = root / "copy_src.bin", root / "copy_dst.bin"
    block = os.urandom(1 << 20)
    with open(src, "wb") as handle:
        for _ in range(megabytes):
            handle.write(block)
    start = time.perf_counter()
    with open(src, "rb") as reader, open(dst, "wb") as writer:
        while chunk := reader.read(8 << 20):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    seconds = time.perf_counter() - start
    src.unlink()
    dst.unlink()
    return megabytes * (1 << 20) / 1e6 / seconds


def roots_table(per_core: float, reader: float, copy: float, text_tb: float, tokens_b: float,
                nodes: list[tuple[int, int]]) -> list[str]:
    """Hours for text_tb TB on each N x C: tokenizing (per node min(C x per_core, reader) MB/s,
    `reader` being what one main process can feed)
    plus a one-node merge at `copy` MB/s of the uint32 (uint16) output."""
    text_mb = text_tb * 1e6
    merge = {width: tokens_b * 1e9 * width / 1e6 / copy / 3600 for width in (4, 2)}
    lines = [f"ROOTS-like corpus: {text_tb} TB of text, {tokens_b:g}B tokens; output {tokens_b * 4 / 1e3:.2f} TB "
             f"uint32 (BLOOM vocab 250880), {tokens_b * 2 / 1e3:.2f} TB uint16; per core {per_core:.2f} MB/s, "
             f"one main process feeds {reader:.0f} MB/s, merge copy {copy:.0f} MB/s",
             f"{'nodes x cores':>14s} {'tokenize h':>11s} {'(reader-capped)':>16s} {'merge h u32':>12s} "
             f"{'total h u32':>12s} {'total h u16':>12s}"]
    for n, c in nodes:
        ideal = text_mb / (n * c * per_core) / 3600
        capped = text_mb / (n * min(c * per_core, reader)) / 3600
        lines.append(f"{f'{n} x {c}':>14s} {ideal:11.2f} {capped:16.2f} {merge[4]:12.2f} "
                     f"{capped + merge[4]:12.2f} {capped + merge[2]:12.2f}")
    return lines


def row(label: str, seconds: float, mb: float, tokens: int, reference: float | None) -> str:
    versus = f"{reference / seconds:6.2f}x" if reference else "      "
    return f"{label:46s} {seconds:8.3f} s {mb / seconds:8.2f} MB/s {tokens / seconds:12,.0f} tok/s  {versus}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer dir (default: train one, vocab 8000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=int, default=10, help="copies of the shipped corpus")
    parser.add_argument("--row-group-rows", type=int, default=1000, help="rows per Parquet row group")
    parser.add_argument("--copy-mb", type=int, default=512, help="size of the file copied for the merge rate")
    parser.add_argument("--text-tb", type=float, default=1.6, help="corpus size for the hours table (ROOTS: 1.6)")
    parser.add_argument("--tokens-b", type=float, default=350,
                        help="its tokens, billions (ROOTS with BLOOM's tokenizer: 350, BLOOM's model card)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir = args.tokenizer or train_tokenizer([SHIPPED_CORPUS], root / "tok", vocab_size=8000)
        jsonl = corpus_copy(root, args.scale)
        parquet, one_file = parquet_copy(jsonl, root, args.row_group_rows)
        texts = texts_of(jsonl)
        tok = TokenizerInfo(tok_dir).tokenizer
        n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))  # also warms the tokenizer up
        mb = sum(len(t.encode()) for t in texts) / 1e6
        options = PreprocessOptions(workers=1, progress=False)
        times = best_of_rounds(args.repeat, {
            "tokenizer encode_batch (texts in memory)": lambda: tok.encode_batch(texts),
            "tokenizer encode_batch_fast (in memory)": lambda: tok.encode_batch_fast(texts),
            "bloom-preprocess JSONL -> .bin/.idx": lambda: preprocess([jsonl], tok_dir, root / "out_jsonl", options),
            "bloom-preprocess Parquet -> .bin/.idx": lambda: preprocess([parquet], tok_dir, root / "out_parquet", options),
        })
        reference = times["tokenizer encode_batch (texts in memory)"]
        outputs_equal = all((root / "out_jsonl" / p.name).read_bytes() == p.read_bytes()
                            for p in (root / "out_parquet").glob("*.bin"))
        cli = best_of(1, lambda: subprocess.run(
            [sys.executable, "-m", "data.preprocess", "-i", str(parquet), "--tokenizer", str(tok_dir),
             "-o", str(root / "out_cli"), "--quiet", "--workers=1"], check=True, capture_output=True, cwd=REPO))
        info = TokenizerInfo(tok_dir)
        read_jsonl = best_of(args.repeat, lambda: main_process_share(jsonl, info, root))
        read_parquet = best_of(args.repeat, lambda: main_process_share(parquet, info, root))
        read_one = best_of(args.repeat, lambda: main_process_share(one_file, info, root))
        output_mb = sum(p.stat().st_size for p in (root / "out_jsonl").glob("*.bin")) / 1e6
        copy = copy_rate(root, args.copy_mb)
        print(f"corpus: {len(texts)} documents, {mb:.2f} MB of text, {n_tokens} tokens "
              f"({mb * 1e6 / n_tokens:.2f} bytes/token), output .bin {output_mb:.2f} MB; Parquet row groups of "
              f"{args.row_group_rows} rows; vocab {TokenizerInfo(tok_dir).vocab_size}; one core "
              f"(workers=1, RAYON_NUM_THREADS=1) of {os.cpu_count()}")
        print(f"{'per core':46s} {'time':>10s} {'text rate':>13s} {'token rate':>18s}  encode_batch time / this")
        for label, seconds in times.items():
            print(row(label, seconds, mb, n_tokens, reference))
        print(row("bloom-preprocess CLI, Parquet, incl. start", cli, mb, n_tokens, reference))
        print(row("main process: read + chunk + pickle, JSONL", read_jsonl, mb, 0, None))
        print(row("main process: same, Parquet", read_parquet, mb, 0, None))
        print(row("main process: same, Parquet in one file", read_one, mb, 0, None))
        print(f"Parquet and JSONL outputs byte-identical: {outputs_equal}")
        print(f"merge copy rate (read + write + fsync of {args.copy_mb} MB, page cache warm): {copy:.0f} MB/s")
        parquet_rate = mb / times["bloom-preprocess Parquet -> .bin/.idx"]
        print("\n".join(roots_table(parquet_rate, mb / read_one, copy, args.text_tb, args.tokens_b,
                                     [(1, 64), (8, 64), (32, 64)])))


if __name__ == "__main__":
    main()
