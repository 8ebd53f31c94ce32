from __future__ import annotations

from pathlib import Path

from medtl.io import write_marked_section


def test_marked_section_is_created_replaced_and_appended(tmp_path: Path) -> None:
    doc = tmp_path / "perf.md"
    write_marked_section(
        doc,
        "<!-- a:start -->\none\n<!-- a:end -->",
        "<!-- a:start -->",
        "<!-- a:end -->",
        "Performance",
    )
    assert doc.read_text() == "# Performance\n\n<!-- a:start -->\none\n<!-- a:end -->\n"
    write_marked_section(
        doc, "<!-- b:start -->\nB\n<!-- b:end -->", "<!-- b:start -->", "<!-- b:end -->", "x"
    )
    write_marked_section(
        doc, "<!-- a:start -->\ntwo\n<!-- a:end -->", "<!-- a:start -->", "<!-- a:end -->", "x"
    )
    assert doc.read_text() == (
        "# Performance\n\n<!-- a:start -->\ntwo\n<!-- a:end -->\n\n<!-- b:start -->\nB\n<!-- b:end -->\n"
    )
