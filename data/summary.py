"""The preprocessing summary: documents, tokens and skipped lines per output, as JSON.

It is written beside the outputs (`summary.json`) after every output file is in place, aside
then renamed, so its presence means the run completed; `prepare` uses it to skip work.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data.records import SKIP_KINDS

SUMMARY_NAME = "summary.json"
MAX_LISTED_SKIPS = 1000  # counts stay exact; only the list of locations is capped


@dataclass
class GroupStats:
    documents: int = 0
    tokens: int = 0
    skipped: dict = field(default_factory=lambda: {kind: 0 for kind in SKIP_KINDS})
    skipped_lines: list = field(default_factory=list)

    def add_skip(self, location: str, kind: str) -> None:
        self.skipped[kind] += 1
        if len(self.skipped_lines) < MAX_LISTED_SKIPS:
            self.skipped_lines.append(f"{location}: {kind}")

    def as_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens,
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "skipped_lines": list(self.skipped_lines)}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_summary(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
