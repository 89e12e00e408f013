"""bloom-preprocess on Parquet and Arrow inputs: the same tokens as from JSONL, bad rows and bad
files counted, FineWeb-2's folder layout, row-group pieces, and one-line errors."""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from data.errors import DataError
from data.input_paths import language_from_path
from data.paths import SHIPPED_CORPUS
from data.preprocess import main as cli_main
from data.preprocess_run import PreprocessOptions, preprocess, preprocess_sources
from data.records import EMPTY_TEXT, NO_TEXT, NOT_JSON, NOT_UTF8, NULL_TEXT, SKIP_KINDS, RecordKeys
from data.sources import Source, expand_inputs, iter_records, piece_sizes
from tests.test_data_helpers import processed_dir, shipped_documents, tokenizer_dir  # noqa: F401
from tests.test_data_preprocess import expected_tokens, read_documents

QUIET = PreprocessOptions(progress=False)


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_parquet(path: Path, columns: dict, row_group_size: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def text_and_lang(rows: list[dict]) -> dict:
    return {"text": [r["text"] for r in rows], "lang": [r["lang"] for r in rows]}


def parquet_twin(root: Path) -> Path:
    """The shipped corpus as Parquet: the same files, rows in the same order, row groups of 7."""
    for path in sorted(SHIPPED_CORPUS.rglob("*.jsonl")):
        target = root / path.relative_to(SHIPPED_CORPUS).with_suffix(".parquet")
        write_parquet(target, text_and_lang(jsonl_rows(path)))
    return root


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_parquet_corpus_gives_the_same_bytes_as_its_jsonl(tokenizer_dir, processed_dir, tmp_path):
    """The shipped corpus written as Parquet (22 files, several row groups each) preprocesses to
    .bin/.idx byte-identical, per language, to the JSONL original, with the same counts."""
    twin = parquet_twin(tmp_path / "pq")
    assert all(pq.ParquetFile(p).metadata.num_row_groups > 1 for p in twin.rglob("*.parquet"))
    out = tmp_path / "out"
    summary = preprocess([twin], tokenizer_dir, out, PreprocessOptions(progress=False, workers=2, chunk_bytes=4096))
    names = sorted(p.stem for p in processed_dir.glob("*.bin"))
    assert sorted(p.stem for p in out.glob("*.bin")) == names and len(names) == len(shipped_documents())
    for name in names:
        for ext in (".bin", ".idx"):
            assert (out / f"{name}{ext}").read_bytes() == (processed_dir / f"{name}{ext}").read_bytes(), name
    reference = summary_of(processed_dir)
    for name in names:
        assert summary["outputs"][name]["documents"] == reference["outputs"][name]["documents"]
        assert summary["outputs"][name]["tokens"] == reference["outputs"][name]["tokens"]
    assert summary["total"]["bad_files"] == 0 and summary["bad_files"] == []


BAD_TEXTS = {3: None, 5: "", 8: "  \n\t ", 11: None}  # row -> bad text put there


def salted_rows() -> tuple[list, dict]:
    """English UDHR with null, empty and whitespace texts at the rows of BAD_TEXTS."""
    texts = shipped_documents()["en"][:12]
    rows = list(texts)
    for row, bad in sorted(BAD_TEXTS.items()):
        rows.insert(row, bad)
    kinds = {NULL_TEXT: [3, 11], EMPTY_TEXT: [5, 8]}
    return rows, kinds


def test_bad_rows_are_counted_by_kind_as_file_row(tokenizer_dir, tmp_path):
    """Null, empty and whitespace texts of a Parquet file, and every row of files whose text
    column is not a string type (int64, list<string>: a Parquet column has one type, so a whole
    file is bad at once), are skipped and counted exactly per kind as file:row; the good rows
    are all written. The same rows as JSONL count the same (null is null_text there too)."""
    rows, kinds = salted_rows()
    folder = tmp_path / "in"
    salted = write_parquet(folder / "en.parquet", {"text": rows, "lang": ["en"] * len(rows)}, row_group_size=4)
    ints = write_parquet(folder / "ints.parquet", {"text": [1, 2, 3]})
    lists = write_parquet(folder / "lists.parquet", {"text": [["a"], ["b", "c"]]})
    summary = preprocess([folder], tokenizer_dir, tmp_path / "out", QUIET)
    en = summary["outputs"]["en"]
    assert en["skipped"] == {kind: len(kinds.get(kind, [])) for kind in SKIP_KINDS}
    assert sorted(en["skipped_lines"]) == sorted(f"{salted}:{r}: {k}" for k, rs in kinds.items() for r in rs)
    assert summary["outputs"]["ints"]["skipped"][NO_TEXT] == 3
    assert summary["outputs"]["lists"]["skipped"][NO_TEXT] == 2
    assert summary["outputs"]["ints"]["skipped_lines"] == [f"{ints}:{r}: no_text" for r in range(3)]
    assert summary["outputs"]["lists"]["skipped_lines"] == [f"{lists}:{r}: no_text" for r in range(2)]
    assert summary["outputs"]["lists"]["prefix"] is None  # nothing written for it
    assert summary["total"]["skipped"] == 4 + 3 + 2
    good = [t for t in rows if t and t.strip()]
    assert read_documents(tmp_path / "out" / "en") == expected_tokens(tokenizer_dir, good)
    # The same rows as JSONL lines (1-based line numbers there).
    lines = [json.dumps({"text": t, "lang": "en"}) for t in rows]
    (tmp_path / "jl").mkdir()
    (tmp_path / "jl" / "en.jsonl").write_text("\n".join(lines) + "\n")
    jl = preprocess([tmp_path / "jl"], tokenizer_dir, tmp_path / "out_jl", QUIET)["outputs"]["en"]
    assert jl["skipped"] == en["skipped"] and jl["documents"] == en["documents"] == len(good)
    assert set(jl["skipped"]) >= {NOT_UTF8, NOT_JSON, NO_TEXT, EMPTY_TEXT, NULL_TEXT}  # old kinds kept


def test_strict_stops_at_the_first_bad_row_naming_file_and_row(tokenizer_dir, tmp_path, capsys):
    rows, _ = salted_rows()
    path = write_parquet(tmp_path / "en.parquet", {"text": rows})
    status = cli_main(["-i", str(path), "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "out"),
                       "--strict", "--quiet", "--workers", "1"])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {path}:3: field 'text' is null (--strict)"]
    assert list((tmp_path / "out").iterdir()) == []


FW2_LANGS = {"spa_Latn": "es", "fra_Latn": "fr", "arb_Arab": "ar"}


def fineweb2_layout(root: Path) -> dict[str, list[str]]:
    """FineWeb-2's layout: data/<language>/train/NNN.parquet; its language column is `language`
    (so under --lang-key lang rows have no language of their own). Two files for fra_Latn."""
    texts = shipped_documents()
    expected = {}
    for folder, lang in FW2_LANGS.items():
        docs = texts[lang]
        parts = [docs[:20], docs[20:]] if folder == "fra_Latn" else [docs]
        for i, part in enumerate(parts):
            write_parquet(root / "data" / folder / "train" / f"{i:03d}.parquet",
                          {"text": part, "language": [lang] * len(part)})
        expected[folder] = docs
    return expected


def test_fineweb2_layout_with_lang_from_path(tokenizer_dir, tmp_path):
    """--lang-from-path: one output per language folder, each holding that folder's documents in
    file order, whether the input is the corpus folder or a quoted glob; without it, one output
    per file name (the old default)."""
    expected = fineweb2_layout(tmp_path / "fw2")
    for name, inputs in {"folder": [tmp_path / "fw2"], "glob": [f"{tmp_path}/fw2/data/*/train/*.parquet"]}.items():
        out = tmp_path / name
        assert cli_main(["-i", *map(str, inputs), "--tokenizer", str(tokenizer_dir), "-o", str(out),
                         "--lang-from-path", "--quiet"]) == 0
        outputs = summary_of(out)["outputs"]
        assert sorted(outputs) == sorted(FW2_LANGS)
        for folder, docs in expected.items():
            assert outputs[folder]["documents"] == len(docs)
            assert read_documents(out / folder) == expected_tokens(tokenizer_dir, docs)
    plain = preprocess([tmp_path / "fw2"], tokenizer_dir, tmp_path / "plain", QUIET)
    assert sorted(plain["outputs"]) == ["000", "001"]


def test_language_from_path_rule():
    root = Path("/corpus")
    assert language_from_path(Path("/corpus/data/fra_Latn/train/000.parquet"), root) == "fra_Latn"
    assert language_from_path(Path("/corpus/fra/part/000.parquet"), root) == "fra"  # first folder below
    assert language_from_path(Path("/corpus/000.parquet"), root) is None
    assert language_from_path(Path("/x/data/eng/000.parquet"), None) == "eng"  # a file given by name
    assert language_from_path(Path("/x/y/000.parquet"), None) is None
    # Only below the root: a `data` folder above the input does not count.
    assert language_from_path(Path("/data/fw/deu/1.parquet"), Path("/data/fw")) == "deu"


def test_unreadable_files_are_named_counted_and_refused_under_strict(tokenizer_dir, tmp_path, capsys):
    """A `.parquet` that is JSON text and a truncated Parquet file are each named in one
    warning line and listed in the summary's bad_files; the good file is processed. --strict
    stops at the first one with one `error:` line naming it, and writes nothing."""
    folder = tmp_path / "in"
    docs = shipped_documents()["fr"]
    good = write_parquet(folder / "a_good.parquet", {"text": docs, "lang": ["fr"] * len(docs)})
    not_parquet = folder / "b_not.parquet"
    not_parquet.write_text('{"text": "I am JSON", "lang": "en"}\n')
    truncated = folder / "c_truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # Planning pieces does not stop at them: each is one piece, read (and counted) later.
    assert [piece_sizes(s) for s in expand_inputs([not_parquet, truncated])] == [
        [not_parquet.stat().st_size], [truncated.stat().st_size]]
    summary = preprocess([folder], tokenizer_dir, tmp_path / "out", QUIET)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert [w.split(":")[0] for w in warnings] == ["warning", "warning"]
    assert str(not_parquet) in warnings[0] and str(truncated) in warnings[1]
    assert [b["path"] for b in summary["bad_files"]] == [str(not_parquet), str(truncated)]
    assert summary["total"]["bad_files"] == 2
    assert summary_of(tmp_path / "out")["bad_files"] == summary["bad_files"]
    assert summary["outputs"]["fr"]["documents"] == len(shipped_documents()["fr"])
    status = cli_main(["-i", str(folder), "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "strict"),
                       "--strict", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"error: {not_parquet}: not a readable Parquet file") and err[0].endswith("(--strict)")
    assert list((tmp_path / "strict").iterdir()) == []


def test_damage_inside_a_row_group_keeps_the_rows_before_it(tokenizer_dir, tmp_path):
    """A file whose footer is intact but whose last row group's data is overwritten: the rows of
    the earlier row groups are written, the file is listed with the row group that failed."""
    docs = shipped_documents()["fr"]
    path = write_parquet(tmp_path / "in" / "fr.parquet", {"text": docs}, row_group_size=20)
    meta = pq.ParquetFile(path).metadata
    last = meta.row_group(meta.num_row_groups - 1).column(0)
    data = bytearray(path.read_bytes())
    start = last.dictionary_page_offset or last.data_page_offset
    data[start:start + last.total_compressed_size] = b"\xff" * last.total_compressed_size
    path.write_bytes(bytes(data))
    summary = preprocess([path], tokenizer_dir, tmp_path / "out", QUIET)
    kept = 20 * (meta.num_row_groups - 1)
    assert summary["outputs"]["fr"]["documents"] == kept
    assert read_documents(tmp_path / "out" / "fr") == expected_tokens(tokenizer_dir, docs[:kept])
    assert f"row group {meta.num_row_groups - 1} cannot be read" in summary["bad_files"][0]["error"]


def test_missing_text_column_names_the_columns(tokenizer_dir, tmp_path, capsys):
    """A file without the --text-key column: exit 2, one `error:` line naming the file and the
    columns it has, no output; the library raises the same DataError."""
    path = write_parquet(tmp_path / "c.parquet", {"content": ["int main() {}"], "lang": ["c"]})
    status = cli_main(["-i", str(path), "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "out"), "--quiet"])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path}: no column 'text' (the file has: content, lang); choose the text column with --text-key"]
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(DataError, match="the file has: content, lang"):
        list(iter_records(Source(path, "parquet"), RecordKeys()))
    # With the right key it reads.
    assert cli_main(["-i", str(path), "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "ok"),
                     "--text-key", "content", "--quiet"]) == 0


def test_arrow_ipc_files_and_streams(tokenizer_dir, tmp_path):
    """Arrow IPC in the file format (.arrow, Feather v2 .feather) and the stream format (what
    `datasets` writes) give the same documents as the JSONL they were made from."""
    rows = jsonl_rows(SHIPPED_CORPUS / "udhr" / "fr.jsonl")
    table = pa.table(text_and_lang(rows) | {"id": list(range(len(rows)))})
    folder = tmp_path / "in"
    folder.mkdir()
    with pa.ipc.new_file(folder / "a.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=9):
            writer.write_batch(batch)
    feather.write_feather(table, folder / "b.feather", chunksize=11)
    with pa.ipc.new_stream(folder / "c.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=13)
    summary = preprocess([folder], tokenizer_dir, tmp_path / "out", PreprocessOptions(progress=False,
                                                                                       group_by="source"))
    one_copy = expected_tokens(tokenizer_dir, [r["text"] for r in rows])
    for name in ("a", "b", "c"):
        assert read_documents(tmp_path / "out" / name) == one_copy, name
    assert summary["total"]["bad_files"] == 0


def test_jsonl_and_parquet_mixed_in_one_run(tokenizer_dir, tmp_path):
    """A JSONL file, a Parquet file and a gzip JSONL in one run: each language's output holds
    its documents in input-path order, whatever their format."""
    import gzip

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SHIPPED_CORPUS / "udhr" / "en.jsonl", folder / "a.jsonl")
    write_parquet(folder / "b.parquet", text_and_lang(jsonl_rows(SHIPPED_CORPUS / "udhr" / "fr.jsonl")))
    (folder / "c.jsonl.gz").write_bytes(gzip.compress((SHIPPED_CORPUS / "udhr" / "en.jsonl").read_bytes()))
    extra = write_parquet(tmp_path / "d.parquet", text_and_lang(jsonl_rows(SHIPPED_CORPUS / "udhr" / "fr.jsonl")))
    preprocess([folder, extra], tokenizer_dir, tmp_path / "out", QUIET)
    docs = shipped_documents()
    assert read_documents(tmp_path / "out" / "en") == expected_tokens(tokenizer_dir, docs["en"] * 2)
    assert read_documents(tmp_path / "out" / "fr") == expected_tokens(tokenizer_dir, docs["fr"] * 2)


def test_row_group_pieces_read_the_same_rows_as_the_whole_file(tokenizer_dir, tmp_path):
    """Pieces [0,2) [2,3) [3,n) of a Parquet file yield the whole file's records with the file's
    own row numbers; piece_sizes gives one compressed size per row group (and one size for
    other sources); preprocess_sources on the pieces gives outputs whose counts add up to the
    whole file's and whose .bin files, concatenated, are the whole file's .bin."""
    docs = shipped_documents()["fr"]
    path = write_parquet(tmp_path / "fr.parquet", {"text": docs, "lang": ["fr"] * len(docs)}, row_group_size=10)
    count = pq.ParquetFile(path).metadata.num_row_groups
    assert count >= 4
    whole = Source(path, "parquet")
    pieces = [Source(path, "parquet", row_groups=r) for r in ((0, 2), (2, 3), (3, count))]
    keys = RecordKeys()
    assert [r for p in pieces for r in iter_records(p, keys)] == list(iter_records(whole, keys))
    assert [row for row, _ in iter_records(pieces[1], keys)] == list(range(20, 30))
    sizes = piece_sizes(whole)
    assert len(sizes) == count and all(s > 0 for s in sizes) and sum(sizes) < path.stat().st_size
    jsonl = SHIPPED_CORPUS / "udhr" / "fr.jsonl"
    assert piece_sizes(expand_inputs([jsonl])[0]) == [jsonl.stat().st_size]
    with pytest.raises(DataError, match=r"row groups \[2, 99\)"):
        list(iter_records(Source(path, "parquet", row_groups=(2, 99)), keys))
    total = preprocess_sources([whole], tokenizer_dir, tmp_path / "whole", QUIET)
    parts = [preprocess_sources([p], tokenizer_dir, tmp_path / f"p{i}", QUIET) for i, p in enumerate(pieces)]
    for key in ("documents", "tokens"):
        assert sum(s["outputs"]["fr"][key] for s in parts) == total["outputs"]["fr"][key]
    joined = b"".join((tmp_path / f"p{i}" / "fr.bin").read_bytes() for i in range(len(pieces)))
    assert joined == (tmp_path / "whole" / "fr.bin").read_bytes()
    assert parts[1]["inputs"] == [f"{path}#row_groups=2-3"]


def test_folders_globs_and_hf_dirs_are_found_once(tmp_path):
    """A folder walk finds JSONL, Parquet and Arrow files and an HF dataset dir, but neither the
    dataset's own .arrow files nor its splits as datasets of their own; `**` globs reach any
    depth; a glob with no match is one clear error."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "in"
    write_parquet(folder / "x" / "a.parquet", {"text": ["a"]})
    shutil.copy(SHIPPED_CORPUS / "udhr" / "fr.jsonl", folder / "b.jsonl")
    # A DatasetDict: each split is a folder (itself a dataset dir) of .arrow files.
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "hf"}])}).save_to_disk(str(folder / "hf"))
    found = expand_inputs([folder])
    assert [(s.path.relative_to(folder).as_posix(), s.kind) for s in found] == [
        ("b.jsonl", "jsonl"), ("hf", "hf"), ("x/a.parquet", "parquet")]
    assert [s.path for s in expand_inputs([f"{folder}/**/*.parquet"])] == [folder / "x" / "a.parquet"]
    with pytest.raises(DataError, match="no file matches the pattern"):
        expand_inputs([f"{folder}/*.feather"])
