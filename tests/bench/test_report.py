"""The writer of ``bench/README.md``'s sections (``bench/report.py``): one section replaced, every other byte kept,
a clear error where a marker is wrong, and the file replaced whole (temporary file and rename), never in place."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bench.report import README, BenchRun, SectionError, command_line, markers, replace_section, write_section

README_TEXT = (
    "# Benchmarks\n"
    "\n"
    "Sections between `<!-- bench:NAME:begin -->` and its end marker are written by the benchmarks.\n"
    "\n"
    "## serve\n"
    "<!-- bench:serve:begin -->\n"
    "| old serve | 1 |\n"
    "<!-- bench:serve:end -->\n"
    "What the serve run says (hand-written, ü).\n"
    "\n"
    "## hub\n"
    "<!-- bench:hub:begin -->\n"
    "| old hub | 2 |\n"
    "|---|---:|\n"
    "<!-- bench:hub:end -->\n"
    "Trailing text without a newline"
)


def split_around(data: bytes, name: str) -> tuple[bytes, bytes]:
    """The bytes up to and including the begin marker line, and from the end marker line on."""
    begin, end = (m.encode() + b"\n" for m in markers(name))
    head = data[: data.index(begin) + len(begin)]
    return head, data[data.index(end):]


def test_replacing_a_section_keeps_every_other_byte(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_bytes(README_TEXT.encode())
    before = readme.read_bytes()

    write_section(readme, "hub", "| new hub | 3 |\n|---|---:|\n\n- a note")

    after = readme.read_bytes()
    assert split_around(after, "hub") == split_around(before, "hub")
    assert after == before.replace(b"| old hub | 2 |\n|---|---:|\n", b"| new hub | 3 |\n|---|---:|\n\n- a note\n")
    assert after.endswith(b"Trailing text without a newline")  # the file's own ending is kept


def test_the_marker_quoted_in_prose_is_not_a_marker():
    """Only a line that is exactly the marker counts: the README explains the markers in a sentence."""
    text = "Say `<!-- bench:x:begin -->` here.\n<!-- bench:x:begin -->\nold\n<!-- bench:x:end -->\n"
    assert replace_section(text, "x", "new") == (
        "Say `<!-- bench:x:begin -->` here.\n<!-- bench:x:begin -->\nnew\n<!-- bench:x:end -->\n")


def test_crlf_files_keep_their_line_endings():
    text = "a\r\n<!-- bench:x:begin -->\r\nold\r\n<!-- bench:x:end -->\r\nb\r\n"
    assert replace_section(text, "x", "one\ntwo\n") == (
        "a\r\n<!-- bench:x:begin -->\r\none\r\ntwo\r\n<!-- bench:x:end -->\r\nb\r\n")


@pytest.mark.parametrize(("text", "says"), [
    ("# no markers at all\n", "no line '<!-- bench:serve:begin -->'"),
    ("<!-- bench:serve:begin -->\nrows\n", "no line '<!-- bench:serve:end -->'"),
    ("<!-- bench:serve:begin -->\n<!-- bench:serve:begin -->\n<!-- bench:serve:end -->\n",
     "2 lines (at lines 1, 2) '<!-- bench:serve:begin -->'"),
    ("<!-- bench:serve:end -->\nrows\n<!-- bench:serve:begin -->\n", "comes before"),
])
def test_a_wrong_marker_is_a_clear_error_and_nothing_is_written(tmp_path: Path, text: str, says: str):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(SectionError) as caught:
        write_section(readme, "serve", "| new |\n")
    assert says in str(caught.value)
    assert str(readme) in str(caught.value)
    assert readme.read_text() == text


def test_a_body_holding_a_marker_is_refused():
    """A table that carried another section's marker would split or nest sections on the next write."""
    text = "<!-- bench:a:begin -->\n<!-- bench:a:end -->\n<!-- bench:b:begin -->\n<!-- bench:b:end -->\n"
    with pytest.raises(SectionError) as caught:
        replace_section(text, "a", "rows\n<!-- bench:b:end -->\n")
    assert "holds a marker line" in str(caught.value)


def test_the_write_replaces_the_file_whole_never_in_place(tmp_path: Path):
    """A reader that opened the README before the write reads the whole old file after it (a new inode was renamed
    over the name; writing in place would have changed what it reads), no temporary file is left, the mode stays."""
    readme = tmp_path / "README.md"
    readme.write_bytes(README_TEXT.encode())
    os.chmod(readme, 0o644)
    before = readme.read_bytes()
    inode = readme.stat().st_ino
    with open(readme, "rb") as reader:
        write_section(readme, "serve", "| new serve | 9 |\n")
        assert reader.read() == before
    assert readme.stat().st_ino != inode
    assert stat.S_IMODE(readme.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    assert b"| new serve | 9 |\n" in readme.read_bytes()


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    """The body cannot be encoded (a lone surrogate): the failure comes while the temporary file is being written,
    and the README is untouched, byte for byte."""
    readme = tmp_path / "README.md"
    readme.write_bytes(README_TEXT.encode())
    before = readme.read_bytes()
    with pytest.raises(UnicodeEncodeError):
        write_section(readme, "serve", "| broken \ud800 |\n")
    assert readme.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_the_recorded_readme_has_one_section_per_benchmark():
    """bench/README.md carries the markers every benchmark writes between (a missing one would fail at the end of
    an hour's run; BenchRun checks at the start, and so does this)."""
    text = README.read_text(encoding="utf-8")
    for name in ("serve", "hub", "variants"):
        assert replace_section(text, name, "x\n").count("\nx\n") == 1
        assert (README.parent / f"{name}.py").exists()


def test_a_quick_run_writes_a_copy_never_the_recorded_readme(tmp_path: Path):
    import argparse

    parser = argparse.ArgumentParser()
    BenchRun.add_options(parser, "serve")
    recorded = README.read_bytes()

    run = BenchRun.from_args("serve", parser.parse_args(["--quick"]), parser)
    assert run.readme != README and run.readme.read_bytes() == recorded
    with pytest.raises(SystemExit):
        BenchRun.from_args("serve", parser.parse_args(["--quick", "--readme", str(README)]), parser)

    copy = tmp_path / "README.md"
    copy.write_bytes(recorded)
    run = BenchRun.from_args("serve", parser.parse_args(["--quick", "--readme", str(copy)]), parser)
    run.finish("| quick | 1 |")
    assert README.read_bytes() == recorded
    written = copy.read_text(encoding="utf-8")
    assert "Quick run (a check that the benchmark works, not a measurement): `" in written
    assert "| quick | 1 |" in written
    assert split_around(copy.read_bytes(), "serve") == split_around(recorded, "serve")


def test_the_command_line_is_relative_to_the_repository():
    root = README.parents[1]
    line = command_line([str(root / "bench" / "serve.py"), "--servers", "edgeloop,kserve", "--note", "a b"],
                        python=str(root / ".venv" / "bin" / "python"))
    assert line == ".venv/bin/python bench/serve.py --servers edgeloop,kserve --note 'a b'"
