"""The BLOOM-style tokenizer trained on the shipped corpus."""
import json

from transformers import AutoTokenizer

from data.paths import SHIPPED_CORPUS
from data.smoothing import smoothed_shares
from data.tokenizer import TokenizerInfo
from data.tokenizer_train import alpha_sample, documents_by_language
from tests.test_data_helpers import VOCAB, shipped_documents, tokenizer_dir  # noqa: F401


def test_round_trips_every_document_and_matches_autotokenizer(tokenizer_dir):
    """decode(encode(x)) == x for every document of every language and both code files, and
    transformers' AutoTokenizer on the saved directory gives the same ids and the same text."""
    tok = TokenizerInfo(tokenizer_dir).tokenizer
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = shipped_documents()
    assert len(docs) == 40 and {"python", "c", "zh", "ar", "hi"} <= set(docs)
    for lang, texts in docs.items():
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == text, lang
            assert hf(text)["input_ids"] == ids, lang
            assert hf.decode(ids) == text, lang


def test_bloom_special_tokens_and_vocab_size(tokenizer_dir):
    """<unk>=0 <s>=1 </s>=2 <pad>=3 as in BLOOM, the configured vocab size, no normaliser,
    and a tokenizer_config naming BloomTokenizerFast (loads in transformers 4 and 5)."""
    info = TokenizerInfo(tokenizer_dir)
    assert [info.tokenizer.token_to_id(t) for t in ["<unk>", "<s>", "</s>", "<pad>"]] == [0, 1, 2, 3]
    assert info.vocab_size == VOCAB and (info.eod, info.pad) == (2, 3)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert spec["normalizer"] is None and spec["model"]["type"] == "BPE"
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BloomTokenizerFast"
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)


def test_training_sample_is_alpha_smoothed_per_language():
    """Each language's byte share of the training sample is p_i^alpha / sum_j p_j^alpha."""
    docs = documents_by_language([SHIPPED_CORPUS], keys=__import__("data.records").records.RecordKeys())
    raw = {lang: sum(len(t.encode()) for t in texts) for lang, texts in docs.items()}
    sample = alpha_sample(docs, alpha=0.3, sample_bytes=None, seed=0)
    lang_of = {t: lang for lang, texts in docs.items() for t in texts}
    got: dict[str, int] = {}
    for text in sample:
        got[lang_of[text]] = got.get(lang_of[text], 0) + len(text.encode())
    total = sum(got.values())
    expected = smoothed_shares(raw, 0.3)
    for lang, share in expected.items():
        # Whole documents overshoot the target by at most one document per language.
        largest = max(len(t.encode()) for t in docs[lang])
        assert abs(got[lang] / total - share) <= (largest + 1) / total + 1e-3, lang
    # Smoothing really changed the mix: Python is ~half the raw bytes, far less of the sample.
    assert got["python"] / total < 0.5 * raw["python"] / sum(raw.values())
