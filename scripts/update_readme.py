"""Regenerate the README's generated sections (the batch-key reference and the result fields).

    python scripts/update_readme.py      # tests/test_readme.py checks that nothing is left to do
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from db.tables import result_fields_markdown  # noqa: E402
from jobs.spec import batch_reference_markdown  # noqa: E402

SECTIONS = {"batch-reference": batch_reference_markdown, "result-fields": result_fields_markdown}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    for marker, generate in SECTIONS.items():
        start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + generate() + end + tail
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
