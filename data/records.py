"""Turn one raw record into a document or a reason to skip it.

The kinds of bad record the pipeline counts (and `--strict` refuses) are named here once. A
record is a JSONL line (bytes) or a row of a table (a dict: `datasets`, Parquet, Arrow).
"""
import json
from dataclasses import dataclass

NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NO_TEXT = "no_text"
EMPTY_TEXT = "empty_text"
NULL_TEXT = "null_text"  # the text field or column is there but null (JSON null, a Parquet null)
SKIP_KINDS = (NOT_UTF8, NOT_JSON, NO_TEXT, EMPTY_TEXT, NULL_TEXT)

SKIP_MESSAGES = {
    NOT_UTF8: "line is not valid UTF-8",
    NOT_JSON: "line is not a JSON object",
    NO_TEXT: "record has no string field '{key}'",
    EMPTY_TEXT: "field '{key}' is empty",
    NULL_TEXT: "field '{key}' is null",
}


@dataclass(frozen=True)
class RecordKeys:
    """Which fields hold the text and the language of a record."""

    text: str = "text"
    lang: str = "lang"


def parse_record(raw: bytes | dict, keys: RecordKeys) -> tuple[str, str | None] | str:
    """(text, lang or None) for a good record, else one of SKIP_KINDS."""
    if isinstance(raw, dict):
        record = raw
    else:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return NOT_UTF8
        try:
            record = json.loads(line)
        except ValueError:
            return NOT_JSON
        if not isinstance(record, dict):
            return NOT_JSON
    text = record.get(keys.text)
    if text is None and keys.text in record:
        return NULL_TEXT
    if not isinstance(text, str):
        return NO_TEXT
    # A whitespace-only text would become a document of nothing but EOD: count it as empty.
    if not text.strip():
        return EMPTY_TEXT
    lang = record.get(keys.lang)
    return text, (lang if isinstance(lang, str) and lang else None)


def describe_skip(kind: str, keys: RecordKeys) -> str:
    return SKIP_MESSAGES[kind].format(key=keys.text)
