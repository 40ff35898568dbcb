"""Reading files to summarise: every kind of text, HTML and PDF extraction, encodings, and every bad input."""

import io
import os
import sys
import textwrap
from pathlib import Path

import pytest

from qwenmlx.documents import read_document
from tests.documents import ALL_DOCUMENTS, CHINESE, ENGLISH_LONG_CONTEXT, ENGLISH_MOE, html_page, paragraphs, pdf_bytes
from tests.errors import one_line_error


@pytest.mark.parametrize("path", ALL_DOCUMENTS, ids=lambda p: p.name)
def test_utf8_markdown_is_read_as_is(path):
    document = read_document(path)
    assert document.text == path.read_text(encoding="utf-8")
    assert (document.kind, document.encoding, document.note) == ("text", "utf-8", None)


@pytest.mark.parametrize("suffix, content", [
    (".py", "def f(x):\n    return x + 1\n"),
    (".json", '{"model": "Qwen3-30B-A3B", "experts": 128}\n'),
    (".csv", "name,total,active\nQwen3-30B-A3B,30.5,3.3\n"),
])
def test_code_json_and_csv_are_read_as_text(tmp_path, suffix, content):
    path = tmp_path / f"file{suffix}"
    path.write_text(content)
    document = read_document(path)
    assert (document.text, document.kind) == (content, "text")


def test_gb18030_chinese_is_decoded_with_a_fallback_and_says_so(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes(CHINESE.read_text(encoding="utf-8").encode("gb18030"))
    document = read_document(path)
    assert document.text == CHINESE.read_text(encoding="utf-8")
    assert document.decoded_with_fallback
    assert document.note == f"{path}: not UTF-8; decoded as {document.encoding}"
    assert document.encoding in ("gb18030", "gbk", "gb2312")


def test_latin1_english_is_decoded_with_a_fallback(tmp_path):
    text = ENGLISH_MOE.read_text(encoding="utf-8").replace("×", "x").replace("—", "-")
    text += "\nA naïve café résumé, déjà vu: Qwen3 à la carte.\n"
    path = tmp_path / "latin1.txt"
    path.write_bytes(text.encode("latin-1"))
    document = read_document(path)
    assert document.text == text
    assert document.decoded_with_fallback


@pytest.mark.parametrize("path, damage", [
    (CHINESE, lambda data: data[:500] + b"\xff" + data[500:]),
    (ENGLISH_MOE, lambda data: data[:500] + b"\xff" + data[500:]),
    (CHINESE, lambda data: data.rstrip()[:-1]),  # cut inside the last character
], ids=["chinese-bad-byte", "english-bad-byte", "chinese-cut-mid-character"])
def test_utf8_with_a_bad_byte_is_read_with_a_replacement_character_and_a_note(tmp_path, path, damage):
    path_copy = tmp_path / "damaged.md"
    path_copy.write_bytes(damage(path.read_bytes()))
    document = read_document(path_copy)
    text = path.read_text(encoding="utf-8")
    assert document.text.count("\ufffd") == 1
    assert document.text.replace("\ufffd", "") in (text, text.rstrip()[:-1])
    assert (document.encoding, document.decoded_with_fallback) == ("utf-8", False)
    assert document.note == f"{path_copy}: not valid UTF-8; 1 invalid byte sequence(s) replaced with U+FFFD"


def test_utf16_with_bom_is_text(tmp_path):
    path = tmp_path / "utf16.txt"
    path.write_bytes(CHINESE.read_text(encoding="utf-8").encode("utf-16"))
    document = read_document(path)
    assert document.text == CHINESE.read_text(encoding="utf-8")
    assert not document.decoded_with_fallback


def test_html_text_keeps_headings_paragraphs_and_lists_and_drops_scripts(tmp_path):
    path = tmp_path / "article.html"
    path.write_text(html_page(ENGLISH_LONG_CONTEXT))
    document = read_document(path)
    assert document.kind == "html"
    expected = paragraphs(ENGLISH_LONG_CONTEXT) + ["- first & one", "- second"]
    assert document.text.split("\n\n") == expected
    for dropped in ("do not extract", "color: red", "Home", "Article"):
        assert dropped not in document.text


def test_html_is_recognised_by_content_without_a_suffix(tmp_path):
    path = tmp_path / "page"
    path.write_text(html_page(ENGLISH_MOE))
    assert read_document(path).kind == "html"


def test_pdf_text_is_extracted_page_by_page(tmp_path):
    blocks = [b for b in paragraphs(ENGLISH_LONG_CONTEXT) if b.isascii()][:6]
    pages = [textwrap.wrap(block, 90) for block in blocks]
    path = tmp_path / "article.pdf"
    path.write_bytes(pdf_bytes(pages))
    document = read_document(path)
    assert document.kind == "pdf"
    extracted = document.text.split("\n\n")
    assert len(extracted) == len(blocks)
    for page_text, lines in zip(extracted, pages):
        assert page_text.split("\n") == lines


def test_stdin_is_read_with_dash(monkeypatch):
    data = CHINESE.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    document = read_document("-")
    assert (document.name, document.text) == ("stdin", data.decode("utf-8"))


def error_for(path) -> str:
    return one_line_error(read_document, path)


def test_missing_file_is_a_one_line_error(tmp_path):
    assert error_for(tmp_path / "nope.txt") == f"{tmp_path / 'nope.txt'}: no such file"


def test_directory_is_a_one_line_error(tmp_path):
    assert error_for(tmp_path) == f"{tmp_path}: is a directory (summarize takes one file)"


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"], ids=["empty", "whitespace"])
def test_empty_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "empty.md"
    path.write_bytes(content)
    assert error_for(path) == f"{path}: empty file (nothing to summarize)"


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
    bytes(range(1, 32)) * 40,
    b"\xff\xfe\x00\xd8",  # a UTF-16 byte-order mark, then a lone surrogate
], ids=["nul-bytes", "control-characters", "false-utf16"])
def test_binary_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "image.png"
    path.write_bytes(content)
    assert error_for(path).startswith(f"{path}: binary data")


def test_unreadable_file_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("text")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod 000 does not stop root, who runs the tests here
    assert error_for(path) == f"{path}: cannot read (Permission denied)"


def test_corrupt_pdf_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n" + os.urandom(2000))
    assert error_for(path).startswith(f"{path}: not a readable PDF")


def test_pdf_without_text_is_a_one_line_error(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(pdf_bytes([[]]))
    assert error_for(path) == f"{path}: PDF has no extractable text (scanned pages? run OCR first)"


def test_encrypted_pdf_is_a_one_line_error(tmp_path):
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes([["A secret page."]]))))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    path = tmp_path / "locked.pdf"
    with open(path, "wb") as f:
        writer.write(f)
    assert error_for(path) == f"{path}: encrypted PDF (needs a password)"


def test_html_without_text_is_a_one_line_error(tmp_path):
    path = tmp_path / "blank.html"
    path.write_text("<html><head><script>x = 1</script></head><body> </body></html>")
    assert error_for(path) == f"{path}: no text in this HTML file (nothing to summarize)"


def test_generate_reads_stdin_as_summarize_does(moe_dir):
    from typer.testing import CliRunner

    from qwenmlx.cli import app

    latin1 = "Un café crème, s'il vous plaît.".encode("latin-1")
    result = CliRunner().invoke(app, ["generate", "-m", str(moe_dir), "-p", "-", "--max-tokens", "2"], input=latin1)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "note: stdin: not UTF-8; decoded as cp1252"
