"""Preprocess a corpus into megatron-core indexed datasets, one per language (or per source).

Records are read in order, cut into chunks, tokenized by a pool of worker processes (one per
core) and written in the original order, so the output does not depend on the worker count.
Each document gets EOD (</s>) appended. Bad records are skipped and counted with file:line (or
file:row), or with strict=True the first one stops the run with a DataError naming it. A file
that cannot be read as its format (a `.parquet` that is not Parquet, a truncated one) is named
on stderr, listed in the summary's `bad_files` and passed over (its rows read before the damage
are kept), or with strict=True stops the run. Outputs are written aside and renamed when
complete; on any failure or interrupt the partial files are removed.
"""
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.encode_worker import Chunk, ChunkResult, encode_chunk, init_worker
from data.errors import DataError
from data.indexed_writer import IndexedWriter, remove_stale_temporaries
from data.records import RecordKeys, describe_skip
from data.sources import BadFile, Source, expand_inputs, iter_records
from data.summary import SUMMARY_NAME, GroupStats, write_json_atomic
from data.tokenizer import TokenizerInfo

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# The chunk size a table row counts for beyond its text (its dict, its numbers).
_ROW_OVERHEAD = 64


@dataclass
class PreprocessOptions:
    keys: RecordKeys = RecordKeys()
    group_by: str = "lang"  # "lang": the record's lang field (else the path's, else the file name); "source": the file
    workers: int | None = None  # None: one per core
    strict: bool = False
    chunk_bytes: int = 1 << 18
    progress: bool = True
    lang_from_path: bool = False  # each file's default language from its path (data.input_paths)


def output_name(group: str) -> str:
    """A file-name-safe dataset name for a language or source."""
    return _SAFE_NAME.sub("_", group) or "unnamed"


def preprocess(inputs: list, tokenizer_dir: str | Path, output_dir: str | Path,
               options: PreprocessOptions = PreprocessOptions()) -> dict:
    """Write <output_dir>/<name>.bin/.idx for each group and return the summary dict."""
    return preprocess_sources(expand_inputs(inputs, lang_from_path=options.lang_from_path),
                              tokenizer_dir, output_dir, options)


def preprocess_sources(sources: list[Source], tokenizer_dir: str | Path, output_dir: str | Path,
                       options: PreprocessOptions = PreprocessOptions()) -> dict:
    """`preprocess` of sources already found (whole files or row-group pieces of Parquet files):
    one summary whose per-output counts and bad-file list add up across runs on disjoint pieces."""
    if options.group_by not in ("lang", "source"):
        raise DataError(f"group_by must be 'lang' or 'source', got {options.group_by!r}")
    tokenizer = TokenizerInfo(tokenizer_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    run = _Run(sources, tokenizer, out, options)
    try:
        run.execute()
    except BaseException:
        run.abort()
        raise
    return run.finish()


class _Run:
    """One preprocessing run: the writers and statistics of every group, and the worker pool."""

    def __init__(self, sources: list[Source], tokenizer: TokenizerInfo, out: Path, options: PreprocessOptions):
        self.sources, self.tokenizer, self.out, self.options = sources, tokenizer, out, options
        self.writers: dict[str, IndexedWriter] = {}
        self.stats: dict[str, GroupStats] = {}
        self.bad_files: list[dict] = []
        self.started = time.perf_counter()
        self.bar = None

    def execute(self) -> None:
        workers = self.options.workers or os.cpu_count() or 1
        init_args = (str(self.tokenizer.directory), self.options.keys, self.options.group_by, workers > 1)
        self.bar = _progress_bar(self.options.progress)
        if workers == 1:
            # In-process: the tokenizer's own thread pool gives the parallelism.
            init_worker(*init_args)
            for chunk in self._chunks():
                self._consume(encode_chunk(chunk))
            return
        # fork: workers inherit the imported modules, so they start in milliseconds.
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
            pending: deque = deque()
            for chunk in self._chunks():
                pending.append(pool.apply_async(encode_chunk, (chunk,)))
                # A bounded window keeps memory flat on corpora larger than RAM; results are
                # consumed in submission order so the output order is the input order.
                if len(pending) >= 2 * workers:
                    self._consume(pending.popleft().get())
            while pending:
                self._consume(pending.popleft().get())

    def _chunks(self) -> Iterator[Chunk]:
        limit, text_key = self.options.chunk_bytes, self.options.keys.text
        for index, source in enumerate(self.sources):
            group = self._default_group(source)
            records, size = [], 0
            try:
                for lineno, raw in iter_records(source, self.options.keys):
                    records.append((lineno, raw))
                    size += _record_size(raw, text_key)
                    if size >= limit:
                        yield Chunk(index, group, records)
                        records, size = [], 0
            except BadFile as err:
                self._bad_file(source, err)
            if records:
                yield Chunk(index, group, records)

    def _default_group(self, source: Source) -> str:
        if self.options.group_by == "lang" and source.lang:
            return source.lang
        return source.name

    def _bad_file(self, source: Source, err: BadFile) -> None:
        if self.options.strict:
            raise DataError(f"{err} (--strict)") from err
        self.bad_files.append({"path": str(source.path), "error": str(err)})
        _warn(f"warning: {err}; its unread rows are skipped", self.bar)

    def _consume(self, result: ChunkResult) -> None:
        source = self.sources[result.source_index]
        for group, lineno, kind in result.skips:
            location = f"{source.path}:{lineno}"
            if self.options.strict:
                raise DataError(f"{location}: {describe_skip(kind, self.options.keys)} (--strict)")
            self._stats(group).add_skip(location, kind)
        docs = tokens = 0
        for group, tokens_array in result.tokens.items():
            lengths = result.lengths[group]
            self._writer(group).add_documents(tokens_array, lengths)
            stats = self._stats(group)
            stats.documents += len(lengths)
            stats.tokens += int(tokens_array.size)
            docs, tokens = docs + len(lengths), tokens + int(tokens_array.size)
        self._tick(docs, tokens)

    def _stats(self, group: str) -> GroupStats:
        return self.stats.setdefault(output_name(group), GroupStats())

    def _writer(self, group: str) -> IndexedWriter:
        name = output_name(group)
        if name not in self.writers:
            self.writers[name] = IndexedWriter(self.out / name, self.tokenizer.dtype)
        return self.writers[name]

    def _tick(self, docs: int, tokens: int) -> None:
        if self.bar is None:
            return
        self.bar.update(docs)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{tokens and self._total_tokens() / elapsed:,.0f} tokens/s", refresh=False)

    def _total_tokens(self) -> int:
        return sum(s.tokens for s in self.stats.values())

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> dict:
        for writer in self.writers.values():
            writer.finalize()
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.started
        summary = self._summary(elapsed)
        write_json_atomic(self.out / SUMMARY_NAME, summary)
        return summary

    def _summary(self, elapsed: float) -> dict:
        documents = sum(s.documents for s in self.stats.values())
        tokens = self._total_tokens()
        return {
            "tokenizer": {"directory": str(self.tokenizer.directory), "sha256": self.tokenizer.fingerprint,
                          "vocab_size": self.tokenizer.vocab_size, "eod": self.tokenizer.eod},
            "dtype": self.tokenizer.dtype.__name__,
            "group_by": self.options.group_by,
            "inputs": [_describe(s) for s in self.sources],
            "outputs": {name: {"prefix": str(self.out / name) if name in self.writers else None,
                               **self.stats[name].as_dict()} for name in sorted(self.stats)},
            "total": {"documents": documents, "tokens": tokens,
                      "skipped": sum(sum(s.skipped.values()) for s in self.stats.values()),
                      "bad_files": len(self.bad_files)},
            "bad_files": list(self.bad_files),
            "seconds": round(elapsed, 3),
            "documents_per_second": round(documents / max(elapsed, 1e-9), 1),
            "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
        }


def _record_size(raw, text_key: str) -> int:
    """Bytes a record holds, for cutting chunks: a line's length, a row's text length."""
    if isinstance(raw, bytes):
        return len(raw)
    text = raw.get(text_key) if isinstance(raw, dict) else None
    return _ROW_OVERHEAD + (len(text) if isinstance(text, str) else 0)


def _describe(source: Source) -> str:
    if source.row_groups is None:
        return str(source.path)
    return f"{source.path}#row_groups={source.row_groups[0]}-{source.row_groups[1]}"


def _warn(message: str, bar) -> None:
    # Through tqdm when a bar is drawn, so the line is not torn by the bar's redraws.
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", unit_scale=True, desc="bloom-preprocess", dynamic_ncols=True)
