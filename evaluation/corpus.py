"""Real English text for the engine tests and benches: the GNU GPL v3, shipped in evaluation/data
(the licence allows verbatim copies), so no test depends on Debian's /usr/share/common-licenses."""

from __future__ import annotations

from pathlib import Path

ENGLISH_TEXT_PATH = Path(__file__).resolve().parent / "data" / "GPL-3.txt"


def english_text() -> str:
    return ENGLISH_TEXT_PATH.read_text(encoding="utf-8")
