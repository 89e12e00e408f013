"""Train a BLOOM-style tokenizer: byte-level BPE, no normalisation, <unk>=0 <s>=1 </s>=2 <pad>=3.

The training sample is re-weighted per language with alpha smoothing, as BLOOM's was: each
language's share of the sample is p_i^alpha / sum_j p_j^alpha (p = share of raw bytes), reached
by sub-sampling documents of large languages and repeating those of small ones (repeating a
document is exactly what weighting its word counts means to the BPE trainer).
"""
import json
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data.errors import DataError
from data.records import RecordKeys, parse_record
from data.smoothing import smoothed_shares
from data.sources import expand_inputs, iter_records
from data.tokenizer_files import write_hf_files

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in BLOOM
# BLOOM's own pre-tokenizer: split off runs of non-space, non-punctuation characters (with one
# leading space), then map bytes to printable characters. No regex in ByteLevel itself.
BLOOM_SPLIT_REGEX = r" ?[^(\s|[.,!?…。，、।۔،])]+"


def bloom_style_tokenizer() -> Tokenizer:
    """An untrained tokenizer with BLOOM's pipeline: no normaliser, split + byte-level."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def documents_by_language(inputs: list, keys: RecordKeys) -> dict[str, list[str]]:
    """Every good document of the corpus grouped by language (source name when no lang field)."""
    docs: dict[str, list[str]] = defaultdict(list)
    for source in expand_inputs(inputs):
        for _, raw in iter_records(source):
            parsed = parse_record(raw, keys)
            if isinstance(parsed, tuple):
                text, lang = parsed
                docs[lang or source.name].append(text)
    if not docs:
        raise DataError(f"no usable documents in {inputs} to train a tokenizer on")
    return dict(docs)


def alpha_sample(docs: dict[str, list[str]], alpha: float, sample_bytes: int | None, seed: int) -> list[str]:
    """Documents re-weighted so language i fills share q_i of a sample of `sample_bytes` bytes."""
    sizes = {lang: sum(len(t.encode("utf-8")) for t in texts) for lang, texts in docs.items()}
    budget = sample_bytes or sum(sizes.values())
    rng = random.Random(seed)
    sample: list[str] = []
    for lang, share in sorted(smoothed_shares(sizes, alpha).items()):
        sample += _fill(docs[lang], share * budget, rng)
    rng.shuffle(sample)
    return sample


def _fill(texts: list[str], target_bytes: float, rng: random.Random) -> list[str]:
    """Whole passes over the documents, then a random subset, until target_bytes is reached."""
    order = list(texts)
    picked, filled = [], 0
    while filled < target_bytes:
        rng.shuffle(order)
        for text in order:
            if filled >= target_bytes:
                break
            picked.append(text)
            filled += len(text.encode("utf-8"))
    return picked


def train_tokenizer(
    inputs: list,
    out_dir: str | Path,
    vocab_size: int = 8000,
    alpha: float = 0.3,
    sample_bytes: int | None = None,
    seed: int = 42,
    keys: RecordKeys = RecordKeys(),
    min_frequency: int = 2,
) -> Path:
    """Train on an alpha-smoothed sample of `inputs` and save an HF tokenizer dir at out_dir."""
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise DataError(f"tokenizer vocab_size must exceed 260 (specials + 256 bytes), got {vocab_size}")
    sample = alpha_sample(documents_by_language(inputs, keys), alpha, sample_bytes, seed)
    tok = bloom_style_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the alphabet, so any text (unseen scripts too) encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    return save_tokenizer_dir(tok, out_dir, meta={"vocab_size": vocab_size, "alpha": alpha, "seed": seed,
                                                 "sample_documents": len(sample)})


def save_tokenizer_dir(tok: Tokenizer, out_dir: str | Path, meta: dict) -> Path:
    """Write the directory aside and rename it into place, so a half-written one never exists."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    tok.save(str(staging / "tokenizer.json"))
    write_hf_files(staging, model_max_length=None)
    (staging / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(staging, out_dir)
    return out_dir
