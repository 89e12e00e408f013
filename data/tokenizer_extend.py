"""Extend a BLOOM-style byte-level BPE tokenizer with a new language's tokens, every old id kept.

The new entries come from a BPE trained on the new language's text (the same pipeline as
data/tokenizer_train.py: BLOOM's split regex + byte-level, no normaliser) or from another
byte-level BPE tokenizer. They are appended: new tokens take ids after the last old one, new
merges rank after every old merge, the pre-tokenizer, specials and decoder are the old ones.

Old text must tokenize exactly as before, or the extended model would see other ids for the
languages it already knows. BPE applies a merge only where its result's bytes occur in the text,
so a candidate token is kept only when its bytes cannot occur in text made of "old characters"
(those inside some old token): it holds a character no old token holds (UTF-8 is
self-synchronising, so that character would have to be in the text), or it is a byte fragment no
old character can supply. Tokens made only of old characters (Latin words, digits, punctuation the
new text shares with the old languages) are dropped, and with them every merge built on them: a
new language in a script the old tokens already cover (a Latin-script one) gains little here.
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers, trainers

from data.errors import DataError
from data.records import RecordKeys
from data.tokenizer_train import SPECIAL_TOKENS, bloom_style_tokenizer, documents_by_language

TOKENIZER_JSON = "tokenizer.json"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class BPE:
    """A byte-level BPE's vocabulary (token -> id) and merges in rank order."""
    vocab: dict
    merges: list  # [(left, right), ...]


@dataclass
class ExtendResult:
    directory: Path
    old_vocab: int
    new_vocab: int
    candidates: int  # tokens the source offered beyond the old vocabulary
    added_merges: int


# -- byte-level strings ------------------------------------------------------------------------

def _gpt2_byte_table() -> dict:
    """byte -> printable character, the table ByteLevel (pre-tokenizer and decoder) uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_OF_CHAR = {c: b for b, c in _gpt2_byte_table().items()}


def token_bytes(token: str) -> bytes:
    """The raw bytes a byte-level token stands for (ByteLevel maps each byte to a printable char)."""
    try:
        return bytes(BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        raise DataError(f"token {token!r} is not a byte-level token: only byte-level BPE tokenizers "
                        "(BLOOM's, GPT-2's) can be merged") from None


# -- reading and writing tokenizer.json -----------------------------------------------------------

def read_tokenizer_json(directory: Path) -> dict:
    path = Path(directory) / TOKENIZER_JSON
    if not path.is_file():
        raise DataError(f"{directory}: no {TOKENIZER_JSON} (not a tokenizer directory)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if (data.get("model") or {}).get("type") != "BPE":
        raise DataError(f"{path}: the model is {(data.get('model') or {}).get('type')!r}, not a BPE")
    return data


def bpe_of(data: dict) -> BPE:
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return BPE(dict(data["model"]["vocab"]), merges)


def check_contiguous(bpe: BPE, where) -> int:
    """The vocabulary size; ids must be 0..n-1, or appending after the last would leave holes."""
    ids = sorted(bpe.vocab.values())
    if ids != list(range(len(ids))):
        raise DataError(f"{where}: token ids are not 0..{len(ids) - 1}, cannot append after them")
    return len(ids)


# -- where the candidates come from ---------------------------------------------------------------

def train_new_language_bpe(inputs: list, new_tokens: int, min_frequency: int = 2,
                           keys: RecordKeys = RecordKeys()) -> BPE:
    """A BPE of len(specials) + 256 + new_tokens entries on the new language's text alone."""
    texts = read_texts(inputs, keys)
    tok = bloom_style_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL_TOKENS) + 256 + new_tokens,
                                  min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return bpe_of(json.loads(tok.to_str()))


def read_texts(inputs: list, keys: RecordKeys) -> list:
    """Documents from plain-text files (a line each) and JSONL/Parquet/HF datasets (a record each)."""
    plain = [Path(p) for p in inputs if str(p).endswith(TEXT_SUFFIXES)]
    for path in plain:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    texts = [line for path in plain for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [str(p) for p in inputs if not str(p).endswith(TEXT_SUFFIXES)]
    if records:
        texts += [t for docs in documents_by_language(records, keys).values() for t in docs]
    if not texts:
        raise DataError(f"no text in {', '.join(map(str, inputs))} to learn tokens from")
    return texts


def candidate_bpe(sources: list, new_tokens: int, min_frequency: int = 2) -> BPE:
    """One tokenizer directory, or text to train a BPE on."""
    if len(sources) == 1 and Path(sources[0]).is_dir() and (Path(sources[0]) / TOKENIZER_JSON).is_file():
        return bpe_of(read_tokenizer_json(sources[0]))
    return train_new_language_bpe(sources, new_tokens, min_frequency)


# -- which candidates are safe to append ----------------------------------------------------------

@dataclass(frozen=True)
class OldCharacters:
    """The characters old text is made of, and the byte pieces of their UTF-8 encodings."""
    chars: frozenset
    heads: frozenset  # a lead byte and some of its continuation bytes (a character cut short)
    tails: frozenset  # the last continuation bytes of a character
    inner: frozenset  # any run of continuation bytes inside a character

    @classmethod
    def of(cls, chars) -> "OldCharacters":
        heads, tails, inner = set(), set(), set()
        for enc in (c.encode("utf-8") for c in chars):
            heads.update(enc[:i] for i in range(1, len(enc)))
            tails.update(enc[i:] for i in range(1, len(enc)))
            inner.update(enc[i:j] for i in range(1, len(enc)) for j in range(i + 1, len(enc) + 1))
        return cls(frozenset(chars), frozenset(heads), frozenset(tails), frozenset(inner))


def old_characters(vocab: dict) -> OldCharacters:
    """Every whole character some old token holds (a partial UTF-8 sequence holds none)."""
    chars = set()
    for token in vocab:
        chars.update(token_bytes(token).decode("utf-8", errors="ignore"))
    return OldCharacters.of(chars)


def _is_lead(byte: int) -> bool:
    return byte & 0xC0 != 0x80  # ASCII or a multi-byte sequence's first byte


def _char_length(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4


def can_occur_in_old_text(data: bytes, old: OldCharacters) -> bool:
    """Whether these bytes can occur inside text made only of old characters."""
    leads = [i for i, b in enumerate(data) if _is_lead(b)]
    if not leads:  # continuation bytes only: somewhere inside one character
        return data in old.inner
    tail, i = data[:leads[0]], leads[0]
    if tail and tail not in old.tails:
        return False
    while i < len(data):
        width = _char_length(data[i])
        piece = data[i:i + width]
        if len(piece) < width:  # the last character is cut: some old character must begin so
            return piece in old.heads
        try:
            char = piece.decode("utf-8")
        except UnicodeDecodeError:
            return False  # not UTF-8: valid text never holds it
        if char not in old.chars:
            return False
        i += width
    return True


def safe_additions(old: BPE, candidate: BPE) -> BPE:
    """The candidate's merges (in its order) whose result is new and cannot occur in old text,
    each built from tokens that exist by then; the tokens they make, ids after the old ones."""
    old_chars = old_characters(old.vocab)
    old_merges = set(old.merges)
    vocab, merges, next_id = {}, [], len(old.vocab)
    for left, right in candidate.merges:
        token = left + right
        if token in old.vocab or token in vocab or (left, right) in old_merges:
            continue
        if not all(part in old.vocab or part in vocab for part in (left, right)):
            continue  # built on a dropped token: BPE could never reach it
        if can_occur_in_old_text(token_bytes(token), old_chars):
            continue
        vocab[token] = next_id
        merges.append((left, right))
        next_id += 1
    return BPE(vocab, merges)


# -- the extended directory -----------------------------------------------------------------------

def extended_json(data: dict, additions: BPE) -> dict:
    """tokenizer.json with the additions appended; merges written in the file's own style."""
    out = json.loads(json.dumps(data))
    out["model"]["vocab"] = {**data["model"]["vocab"], **additions.vocab}
    as_strings = bool(data["model"]["merges"]) and isinstance(data["model"]["merges"][0], str)
    new = [f"{a} {b}" if as_strings else [a, b] for a, b in additions.merges]
    out["model"]["merges"] = list(data["model"]["merges"]) + new
    return out


def extend_tokenizer(base_dir, sources: list, out_dir, new_tokens: int = 2000,
                     min_frequency: int = 2) -> ExtendResult:
    """Write base_dir's tokenizer plus the safe new entries of `sources` to out_dir."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    data = read_tokenizer_json(base_dir)
    old = bpe_of(data)
    old_size = check_contiguous(old, base_dir / TOKENIZER_JSON)
    for token in old.vocab:
        token_bytes(token)  # refuse a tokenizer that is not byte-level before any work
    candidate = candidate_bpe(sources, new_tokens, min_frequency)
    additions = safe_additions(old, candidate)
    offered = sum(1 for t in candidate.vocab if t not in old.vocab)
    merged = extended_json(data, additions)
    check_contiguous(bpe_of(merged), "the extended tokenizer")  # no id shared, none skipped
    write_tokenizer_dir(base_dir, out_dir, merged, {
        "extended_from": str(base_dir.resolve()), "sources": [str(s) for s in sources],
        "old_vocab_size": old_size, "new_vocab_size": old_size + len(additions.vocab),
        "candidates": offered, "added": len(additions.vocab)})
    return ExtendResult(out_dir, old_size, old_size + len(additions.vocab), offered, len(additions.merges))


def write_tokenizer_dir(base_dir: Path, out_dir: Path, data: dict, meta: dict) -> None:
    """Aside, checked to load, then renamed into place: out_dir is complete or absent."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    (staging / TOKENIZER_JSON).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    Tokenizer.from_file(str(staging / TOKENIZER_JSON))  # the library must accept what we wrote
    for name in SIDE_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, staging / name)
    (staging / "extend_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(staging, out_dir)
