"""The same tokens as a blend of few or of thousands of .bin/.idx prefixes, for bench_blend_start.py.

The shipped corpus, tokenized, is repeated until it holds `documents` documents, then cut in
document order into `prefixes` contiguous shards named `<language>_<shard>` over BLOOM's 46
natural languages (as a sharded corpus arrives: en_0000, en_0001, ..., zu_0043). Cut into 40
or into 2,000 prefixes, the documents and tokens are the same; only the files differ.
"""
import json
from pathlib import Path

import numpy as np

from data.index_file import document_lengths
from data.indexed_writer import IndexedWriter

# BLOOM's 46 natural languages (ISO 639 codes, as the ROOTS corpus names them).
LANGUAGES = ("ak ar as bm bn ca en es eu fon fr gu hi id ig ki kn lg ln ml mr ne nso ny or pa pt rn rw "
             "sn st sw ta te tn ts tum tw ur vi wo xh yo zh zu yue").split()


def source_documents(processed_dir: Path) -> list[np.ndarray]:
    """Every document of a preprocessed corpus (data/prepare's processed-<key>), in name order."""
    summary = json.loads((processed_dir / "summary.json").read_text())
    docs = []
    for name in sorted(summary["outputs"]):
        prefix = processed_dir / name
        lengths = document_lengths(prefix)
        tokens = np.fromfile(f"{prefix}.bin", dtype=summary["dtype"])
        docs += np.split(tokens, np.cumsum(lengths)[:-1])
    return docs


def shard_names(prefixes: int) -> list[str]:
    """`prefixes` names, the shards of each language numbered from 0, languages in turn."""
    per_language = [prefixes // len(LANGUAGES) + (i < prefixes % len(LANGUAGES)) for i in range(len(LANGUAGES))]
    return [f"{lang}_{k:04d}" for lang, count in zip(LANGUAGES, per_language) for k in range(count)]


def write_blend(docs: list[np.ndarray], out: Path, prefixes: int, dtype) -> list[dict]:
    """`docs` cut into `prefixes` contiguous shards under `out`; data.blend's entries for them."""
    out.mkdir(parents=True, exist_ok=True)
    names = shard_names(prefixes)
    bounds = np.linspace(0, len(docs), prefixes + 1).round().astype(int)
    blend = []
    for name, begin, end in zip(names, bounds[:-1], bounds[1:]):
        part = docs[begin:end]
        writer = IndexedWriter(out / name, dtype)
        writer.add_documents(np.concatenate(part), np.array([len(d) for d in part]))
        writer.finalize()
        blend.append({"name": name, "prefix": str(out / name)})
    return blend


def repeated(docs: list[np.ndarray], documents: int) -> list[np.ndarray]:
    """`documents` documents: `docs` over and over (a larger corpus of the same texts)."""
    return [docs[i % len(docs)] for i in range(documents)]
