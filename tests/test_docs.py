"""The README's environment table is generated from the settings table and must stay in sync."""

from __future__ import annotations

from pathlib import Path

from devtools.docs import BEGIN, END, env_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_env_table_matches_settings():
    text = README.read_text(encoding="utf-8")
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == env_table(), "README.md is stale: run python -m devtools.docs"
