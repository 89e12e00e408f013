"""bloom-preprocess's memory does not grow with its input: a Parquet file (and a JSONL file) of
CORPUS_MB of text goes through a process whose peak RSS stays within BOUND_MB of what it held
before the run, a quarter of the text; reading the same Parquet file whole (pq.read_table), as a
reader that ignored row groups would, goes far past that bound, so the bound is not loose.

What the peak is made of, measured here (2-core EPYC, pyarrow 26, mimalloc pool): ~45 MB that
pyarrow's Parquet reader takes for its first batch whatever the batch (allocator arenas), the
tokenizer's ~50 bytes per byte of the document being encoded (13 MB for 256 KB), one ~2 MB record
batch and its Python strings. Run on 6 and on 25 row groups of one file it grew the same.

To stay fast on two shared cores the texts are 256 KB documents of four 120-letter words, and the
tokenizer is trained on them so each word is one token (~15 MB/s on one core; the reading,
chunking and writing are as for any text), and the three measurements run side by side.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.tokenizer_train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS_MB = 400
BOUND_MB = 100  # peak RSS above the process's own before-the-run RSS
DOC_CHARS = 1 << 18
ROWS_PER_GROUP = 64  # 16 MB of text per row group: the file has 25 of them

# Runs in a fresh process, one core (RAYON_NUM_THREADS=1, workers=1): the tokenizer is loaded and
# used once, pyarrow imported, then the RSS is read; after the run, the peak (VmHWM).
MEASURE = """
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
from data.preprocess_run import PreprocessOptions, preprocess
from data.tokenizer import TokenizerInfo

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024  # kB -> MB

mode, source, tokenizer, out = sys.argv[1:]
TokenizerInfo(tokenizer).encode_batch(["warm up"])
before = status("VmRSS")
if mode == "whole":
    table = pq.read_table(source, columns=["text"])
    assert table.num_rows > 0
else:
    preprocess([source], tokenizer, out, PreprocessOptions(workers=1, progress=False))
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def words() -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(120)) for _ in range(4)]


def documents(count: int):
    rng = random.Random(1)
    vocabulary = words()
    for _ in range(count):
        yield " ".join(rng.choices(vocabulary, k=-(-DOC_CHARS // 121)))  # at least DOC_CHARS


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("big")
    sample = root / "sample"
    sample.mkdir()
    (sample / "x.jsonl").write_text("".join(json.dumps({"text": " ".join(words() * 50)}) + "\n" for _ in range(20)))
    tokenizer = train_tokenizer([sample], root / "tokenizer", vocab_size=1200)
    count = CORPUS_MB * (1 << 20) // DOC_CHARS
    schema = pa.schema([("text", pa.string()), ("lang", pa.string())])
    with pq.ParquetWriter(root / "big.parquet", schema, compression="zstd") as writer, \
            open(root / "big.jsonl", "w") as jsonl:
        group, text_bytes = [], 0
        for text in documents(count):
            text_bytes += len(text)
            jsonl.write(json.dumps({"text": text, "lang": "x"}) + "\n")
            group.append(text)
            if len(group) == ROWS_PER_GROUP:
                writer.write_table(pa.table({"text": group, "lang": ["x"] * len(group)}, schema=schema))
                group = []
        if group:
            writer.write_table(pa.table({"text": group, "lang": ["x"] * len(group)}, schema=schema))
    return {"root": root, "tokenizer": tokenizer, "parquet": root / "big.parquet", "jsonl": root / "big.jsonl",
            "text_mb": text_bytes / (1 << 20), "documents": count}


def start(mode: str, source: Path, corpus: dict) -> tuple[subprocess.Popen, Path]:
    out = corpus["root"] / f"out-{mode}-{source.suffix[1:]}"
    env = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, mode, str(source), str(corpus["tokenizer"]), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    return proc, out


def finish(proc: subprocess.Popen, out: Path) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    if (out / "summary.json").exists():
        result["documents"] = json.loads((out / "summary.json").read_text())["total"]["documents"]
    result["grown"] = result["peak"] - result["before"]
    return result


@pytest.fixture(scope="module")
def measured(big_corpus) -> dict:
    """Peak RSS of the three runs, started together (each is one process on one core)."""
    runs = {"parquet": start("stream", big_corpus["parquet"], big_corpus),
            "jsonl": start("stream", big_corpus["jsonl"], big_corpus),
            "whole": start("whole", big_corpus["parquet"], big_corpus)}
    return {name: finish(*run) for name, run in runs.items()}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_peak_memory_does_not_grow_with_the_input(big_corpus, measured, fmt):
    """CORPUS_MB of text, 4x the bound, preprocessed with a peak RSS under BOUND_MB above the
    process's RSS before the run, and every document written."""
    assert big_corpus["text_mb"] >= 4 * BOUND_MB
    result = measured[fmt]
    assert result["documents"] == big_corpus["documents"]
    print(f"{fmt}: {big_corpus['text_mb']:.0f} MB of text, peak RSS {result['peak']} MB, {result['grown']} MB "
          f"over the {result['before']} MB before the run")
    assert result["grown"] < BOUND_MB, f"{fmt}: peak RSS grew {result['grown']} MB over {result['before']} MB"


def test_reading_the_whole_file_would_exceed_the_bound(big_corpus, measured):
    """The bound is tight enough to catch a reader that loads a whole file: pq.read_table of the
    same file in the same kind of process grows by more than the corpus' size."""
    result = measured["whole"]
    print(f"pq.read_table: peak RSS {result['peak']} MB, {result['grown']} MB over the {result['before']} MB before")
    assert result["grown"] > big_corpus["text_mb"] > BOUND_MB
