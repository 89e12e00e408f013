"""Evaluation text -> token sequences, by one stated rule.

Documents are read from JSONL files (or folders of them; data/sources.py: sorted by path, lines in
file order), tokenized with the checkpoint's tokenizer without special tokens, and each followed
by EOD (</s>). The token stream T (length n) of one evaluation set is cut as Megatron's GPTDataset
cuts samples: sequence k is T[k*s : k*s + s + 1] for s = seq_length, for every k with k*s < n - 1,
so consecutive sequences share one boundary token and the last one may be shorter. Within a
sequence, position i predicts token i + 1; every token but the stream's first is predicted exactly
once (n - 1 predictions), none is dropped.

Sets: "overall" packs every document in reading order; each language (the record's `lang` field,
"unknown" when absent) packs its own documents separately, so its sequences never mix languages.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from data.errors import DataError
from data.records import EMPTY_TEXT, RecordKeys, describe_skip, parse_record
from data.sources import expand_inputs, iter_records

OVERALL = "overall"
UNKNOWN_LANGUAGE = "unknown"


@dataclass
class EvalSet:
    name: str
    documents: int = 0
    tokens: List[int] = field(default_factory=list)  # the packed stream, EOD after each document

    def sequences(self, seq_length: int) -> List[List[int]]:
        n = len(self.tokens)
        return [self.tokens[start:start + seq_length + 1] for start in range(0, n - 1, seq_length)]

    @property
    def predicted_tokens(self) -> int:
        return max(len(self.tokens) - 1, 0)


def read_documents(paths: Sequence[str], keys: RecordKeys = RecordKeys()) -> List[tuple]:
    """(text, lang or None) of every record; a malformed record stops with its file and line
    (an evaluation set silently missing documents would report a wrong loss)."""
    documents = []
    for source in expand_inputs(list(paths)):
        for lineno, raw in iter_records(source):
            parsed = parse_record(raw, keys)
            if parsed == EMPTY_TEXT:
                continue  # nothing to predict
            if isinstance(parsed, str):
                raise DataError(f"{source.path}:{lineno}: {describe_skip(parsed, keys)}")
            documents.append(parsed)
    if not documents:
        raise DataError(f"no documents in {', '.join(map(str, paths))}")
    return documents


def build_eval_sets(documents: List[tuple], encode, eod: int, vocab_rows: Optional[int] = None) -> List[EvalSet]:
    """The overall set first, then one per language (sorted by name). `encode` maps a list of
    texts to lists of token ids."""
    ids = encode([text for text, _ in documents])
    overall = EvalSet(OVERALL)
    by_language: Dict[str, EvalSet] = {}
    for (_, lang), tokens in zip(documents, ids):
        lang = lang or UNKNOWN_LANGUAGE
        for target in (overall, by_language.setdefault(lang, EvalSet(lang))):
            target.documents += 1
            target.tokens.extend(tokens)
            target.tokens.append(eod)
    too_big = max(overall.tokens)
    if vocab_rows is not None and too_big >= vocab_rows:
        raise DataError(f"the tokenizer produced token id {too_big}, beyond the model's {vocab_rows} embedding rows")
    return [overall] + [by_language[name] for name in sorted(by_language)]


def batches(sequences: List[List[int]], batch_size: int) -> List[List[List[int]]]:
    """Consecutive sequences in batches of batch_size; the one short last sequence (if any) is a
    batch of its own, since a batch is one rectangular tensor."""
    if not sequences:
        return []
    full = [s for s in sequences if len(s) == len(sequences[0])]
    rest = sequences[len(full):]
    out = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    return out + [rest] if rest else out
