"""bloom-preprocess: tokens on disk, bad input, atomic outputs, input formats."""
import bz2
import gzip
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data.paths import SHIPPED_CORPUS
from data.preprocess import main as cli_main
from data.preprocess_run import PreprocessOptions, preprocess
from data.records import EMPTY_TEXT, NO_TEXT, NOT_JSON, NOT_UTF8, NULL_TEXT
from data.tokenizer import TokenizerInfo
from tests.test_data_helpers import processed_dir, shipped_documents, tokenizer_dir  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def read_documents(prefix) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def expected_tokens(tokenizer_dir, texts) -> list[list[int]]:
    """The reference: the tokenizer's own encode of each text, plus EOD (</s> = 2)."""
    tok = TokenizerInfo(tokenizer_dir).tokenizer
    return [tok.encode(t, add_special_tokens=False).ids + [2] for t in texts]


def test_bin_tokens_equal_tokenizer_output_for_every_language(tokenizer_dir, processed_dir):
    """megatron-core's IndexedDataset reads back, per language, exactly encode(doc) + EOD for
    every source document, in order; the summary counts documents and tokens."""
    summary = json.loads((processed_dir / "summary.json").read_text())
    for lang, texts in shipped_documents().items():
        expected = expected_tokens(tokenizer_dir, texts)
        assert read_documents(processed_dir / lang) == expected, lang
        out = summary["outputs"][lang]
        assert out["documents"] == len(texts) and out["tokens"] == sum(map(len, expected))
        assert out["skipped_total"] == 0
    assert IndexedDataset(str(processed_dir / "en")).index.dtype == np.uint16  # vocab < 65536


def test_output_does_not_depend_on_worker_count(tokenizer_dir, processed_dir, tmp_path):
    """Two worker processes (and tiny chunks) write byte-identical files to the in-process run."""
    preprocess([SHIPPED_CORPUS], tokenizer_dir, tmp_path,
               PreprocessOptions(workers=2, chunk_bytes=4096, progress=False))
    for name in ["en", "zh", "python", "c"]:
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"{name}{ext}").read_bytes() == (processed_dir / f"{name}{ext}").read_bytes()


def test_compressed_files_folders_and_hf_datasets(tokenizer_dir, tmp_path):
    """.gz/.bz2/.xz JSONL, a folder of them and a local HF `datasets` dir give the same tokens."""
    datasets = pytest.importorskip("datasets")
    lines = (SHIPPED_CORPUS / "udhr" / "fr.jsonl").read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "b.jsonl.bz2").write_bytes(bz2.compress(lines))
    (folder / "c.jsonl.xz").write_bytes(lzma.compress(lines))
    texts = [json.loads(line)["text"] for line in lines.splitlines()]
    rows = [json.loads(line) for line in lines.splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf_fr"))
    preprocess([folder, tmp_path / "hf_fr"], tokenizer_dir, tmp_path / "out",
               PreprocessOptions(group_by="source", progress=False))
    one_copy = expected_tokens(tokenizer_dir, texts)
    for name in ["a", "b", "c", "hf_fr"]:
        assert read_documents(tmp_path / "out" / name) == one_copy, name
    # Grouped by language instead, the four copies land in one dataset, in input order.
    preprocess([folder, tmp_path / "hf_fr"], tokenizer_dir, tmp_path / "by_lang", PreprocessOptions(progress=False))
    assert read_documents(tmp_path / "by_lang" / "fr") == one_copy * 4


def salted_corpus(folder: Path) -> tuple[Path, dict]:
    """English UDHR with one bad line of each kind (and a blank line, which is not bad)."""
    good = (SHIPPED_CORPUS / "udhr" / "en.jsonl").read_bytes().splitlines(keepends=True)
    bad = [b'{"text": "broken json\n', b'{"text": "caf\xe9 latin-1"}\n', b'{"lang": "en", "id": "x"}\n',
           b'{"text": "", "lang": "en"}\n', b'{"text": 42}\n', b'["a list"]\n', b"\n", b'{"text": "   "}\n']
    lines = good[:3] + bad[:2] + good[3:10] + bad[2:5] + good[10:] + bad[5:]
    path = folder / "en.jsonl"
    path.write_bytes(b"".join(lines))
    where = {i + 1: line for i, line in enumerate(lines)}
    tail = len(lines) - 2  # line number of the list record; then the blank and the spaces
    kinds = {NOT_JSON: [4, tail], NOT_UTF8: [5], NO_TEXT: [13, 15], EMPTY_TEXT: [14, tail + 2], NULL_TEXT: []}
    assert all(where[n] in bad for ks in kinds.values() for n in ks)
    return path, kinds


def test_bad_lines_are_skipped_and_counted_with_file_and_line(tokenizer_dir, tmp_path):
    """Every kind of bad line is skipped, counted exactly and listed as file:line; the good
    documents are all written, the same as from the clean file."""
    (tmp_path / "in").mkdir()
    path, kinds = salted_corpus(tmp_path / "in")
    summary = preprocess([path], tokenizer_dir, tmp_path / "out", PreprocessOptions(progress=False))
    en = summary["outputs"]["en"]
    assert en["skipped"] == {kind: len(lines) for kind, lines in kinds.items()}
    listed = sorted(en["skipped_lines"], key=lambda s: int(s.split(":")[-2]))
    expected = sorted((f"{path}:{n}: {kind}" for kind, ns in kinds.items() for n in ns),
                      key=lambda s: int(s.split(":")[-2]))
    assert listed == expected
    assert read_documents(tmp_path / "out" / "en") == expected_tokens(tokenizer_dir, shipped_documents()["en"])
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["outputs"]["en"]["skipped"] == en["skipped"]


def test_strict_names_first_bad_line_and_writes_nothing(tokenizer_dir, tmp_path, capsys):
    """--strict: exit status 2, one `error:` line naming file:line of the first bad line, no
    traceback, and no output file (not even a partial one)."""
    (tmp_path / "in").mkdir()
    path, _ = salted_corpus(tmp_path / "in")
    out = tmp_path / "out"
    status = cli_main(["-i", str(path), "--tokenizer", str(tokenizer_dir), "-o", str(out), "--strict", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"error: {path}:4: line is not a JSON object (--strict)"]
    assert list(out.iterdir()) == []


def test_cli_subprocess_errors_have_no_traceback(tokenizer_dir, tmp_path):
    """The installed entry point's code path, in a fresh process: a missing input is one line."""
    run = subprocess.run([sys.executable, "-m", "data.preprocess", "-i", str(tmp_path / "nope.jsonl"),
                          "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: input not found: {tmp_path / 'nope.jsonl'}"


def test_failed_run_leaves_previous_output_intact_and_no_partial_file(tokenizer_dir, tmp_path):
    """A run that dies midway (a truncated .gz after good files) removes its partial files;
    the complete output of an earlier run stays valid and untouched."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SHIPPED_CORPUS / "udhr" / "en.jsonl", folder / "a.jsonl")
    out = tmp_path / "out"
    preprocess([folder], tokenizer_dir, out, PreprocessOptions(progress=False))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data = gzip.compress((SHIPPED_CORPUS / "udhr" / "fr.jsonl").read_bytes())
    (folder / "b.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as info:
        preprocess([folder], tokenizer_dir, out, PreprocessOptions(progress=False))
    assert "cannot read" in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no .tmp, no fr.bin


def test_files_of_a_killed_run_are_never_read_and_are_cleaned(tokenizer_dir, tmp_path):
    """A run killed with SIGKILL leaves only *.tmp-<pid> files: no reader opens them as a
    dataset, and the next run removes them."""
    script = (f"import os, data.indexed_writer as w\n"
              f"x = w.IndexedWriter({str(tmp_path / 'en')!r}, 'uint16')\n"
              f"import numpy as np; x.add_documents(np.arange(10), np.array([10]))\n"
              f"os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers and all(".tmp-" in name for name in leftovers)
    assert not IndexedDataset.exists(str(tmp_path / "en"))
    (tmp_path / "in").mkdir()
    shutil.copy(SHIPPED_CORPUS / "udhr" / "en.jsonl", tmp_path / "in" / "en.jsonl")
    preprocess([tmp_path / "in"], tokenizer_dir, tmp_path, PreprocessOptions(progress=False))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert IndexedDataset.exists(str(tmp_path / "en"))


def test_a_byte_order_mark_starts_a_file_and_is_not_part_of_its_first_document(tokenizer_dir, tmp_path):
    """A JSONL file written with a UTF-8 BOM (as some Windows tools do) gives, through
    bloom-preprocess, the same documents as the file without it, its first one included; a
    U+FEFF inside a text further on stays text."""
    lines = (SHIPPED_CORPUS / "udhr" / "en.jsonl").read_bytes().splitlines(keepends=True)[:4]
    lines.insert(2, json.dumps({"text": "\ufeffzero width no-break space", "lang": "en"},
                               ensure_ascii=False).encode() + b"\n")
    texts = [json.loads(line)["text"] for line in lines]
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    for folder, prefix in ((plain, b""), (marked, b"\xef\xbb\xbf")):
        folder.mkdir()
        (folder / "en.jsonl").write_bytes(prefix + b"".join(lines))
        assert cli_main(["-i", str(folder / "en.jsonl"), "--tokenizer", str(tokenizer_dir),
                         "-o", str(folder / "out"), "--workers", "1", "--quiet"]) == 0
    summaries = [json.loads((f / "out" / "summary.json").read_text())["outputs"]["en"] for f in (plain, marked)]
    assert [s["documents"] for s in summaries] == [5, 5] and summaries[1]["skipped_total"] == 0
    assert read_documents(marked / "out" / "en") == read_documents(plain / "out" / "en")
    assert read_documents(marked / "out" / "en") == expected_tokens(tokenizer_dir, texts)
