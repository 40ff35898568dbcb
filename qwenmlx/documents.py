"""Reading text input: a file to summarise (text of any kind, HTML with its text extracted, PDF via pypdf),
and the bytes of a prompt given on stdin.

Bytes are decoded the same way everywhere (decode_text): UTF-8, with the few bad bytes of damaged or
truncated UTF-8 replaced; other text with charset-normalizer's best guess. Either way a note says so,
for the command to tell the user. HTML headings become Markdown headings, so the splitter sees the structure.
"""

import io
import re
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from .errors import QwenMLXError

HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
SNIFF_BYTES = 8192
# Share of control characters (other than tab, newline, carriage return, form feed) that marks a file as binary.
MAX_CONTROL_SHARE = 0.02
PREFERRED_LEGACY_ENCODING = "cp1252"  # Windows-1252, which HTML5 also reads "latin-1" as
NON_ASCII_BYTES = bytes(range(128, 256))


@dataclass
class DecodedText:
    """Text decoded from bytes, its encoding, and a line for the user when it is not exactly the bytes' UTF-8."""

    text: str
    encoding: str
    fallback: bool = False  # True when the bytes were decoded as a legacy encoding, not UTF-8
    note: str | None = None


@dataclass
class Document:
    """A file's text and how it was obtained."""

    name: str  # the path as given, or "stdin"
    text: str
    kind: str  # "text", "html" or "pdf"
    encoding: str | None = None  # the text's encoding; None for PDF
    decoded_with_fallback: bool = False  # True when the bytes were not UTF-8
    note: str | None = None  # a line for the user: how the bytes were decoded, when not plainly


def read_document(path: str | Path) -> Document:
    """Read FILE (or "-" for stdin) and extract its text; every unusable input raises a one-line QwenMLXError."""
    if str(path) == "-":
        return document_from_bytes("stdin", sys.stdin.buffer.read(), suffix="")
    path = Path(path)
    if path.is_dir():
        raise QwenMLXError(f"{path}: is a directory (summarize takes one file)")
    if not path.exists():
        raise QwenMLXError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot read ({e.strerror})") from None
    return document_from_bytes(str(path), data, suffix=path.suffix.lower())


def document_from_bytes(name: str, data: bytes, suffix: str) -> Document:
    """Pick the reader by content first (a PDF is a PDF whatever its name), then by suffix."""
    if not data.strip():
        raise QwenMLXError(f"{name}: empty file (nothing to summarize)")
    if data.startswith(b"%PDF-"):
        document = Document(name, pdf_text(name, data), "pdf")
    else:
        decoded = decode_text(name, data)
        if suffix in HTML_SUFFIXES or looks_like_html(decoded.text):
            text, kind = html_text(decoded.text), "html"
        else:
            text, kind = decoded.text, "text"
        document = Document(name, text, kind, decoded.encoding, decoded.fallback, decoded.note)
    if not document.text.strip():
        raise QwenMLXError(f"{name}: no text in this {document.kind.upper()} file (nothing to summarize)")
    return document


def decode_text(name: str, data: bytes) -> DecodedText:
    """Bytes of text in any common encoding as str; raises a one-line QwenMLXError for binary data."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return DecodedText(check_not_binary(name, data.decode("utf-16")), "utf-16")
        except UnicodeDecodeError:
            raise QwenMLXError(f"{name}: binary data (starts like UTF-16 but is not), not text") from None
    if b"\x00" in data[:SNIFF_BYTES]:
        raise QwenMLXError(f"{name}: binary data (contains NUL bytes), not text")
    try:
        return DecodedText(check_not_binary(name, data.decode("utf-8-sig")), "utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8-sig", errors="replace")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())  # one U+FFFD per invalid sequence
    well_formed = len(text) - len(data.translate(None, NON_ASCII_BYTES)) - bad  # non-ASCII characters
    if well_formed > bad:
        # UTF-8 with a few bad bytes (damaged, or cut mid-character): other encodings rarely form UTF-8 sequences.
        note = f"{name}: not valid UTF-8; {bad:,} invalid byte sequence(s) replaced with U+FFFD"
        return DecodedText(check_not_binary(name, text), "utf-8", note=note)
    from charset_normalizer import from_bytes

    matches = from_bytes(data)
    best = matches.best()
    if best is None:
        raise QwenMLXError(f"{name}: binary data (no text encoding fits), not text")
    # Mostly-ASCII text with a few accents fits several code pages equally well: take the most common one.
    tied = [m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
    best = next((m for m in tied if m.encoding == PREFERRED_LEGACY_ENCODING), best)
    note = f"{name}: not UTF-8; decoded as {best.encoding}"
    return DecodedText(check_not_binary(name, str(best)), best.encoding, fallback=True, note=note)


def check_not_binary(name: str, text: str) -> str:
    sample = text[:SNIFF_BYTES]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f")
    if controls > MAX_CONTROL_SHARE * len(sample):
        raise QwenMLXError(f"{name}: binary data (control characters), not text")
    return text


def looks_like_html(text: str) -> bool:
    head = text.lstrip()[:512].lower()
    return head.startswith(("<!doctype html", "<html"))


def pdf_text(name: str, data: bytes) -> str:
    """The text of every page in order, pages separated by blank lines."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise QwenMLXError(f"{name}: encrypted PDF (needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except QwenMLXError:
        raise
    except Exception as e:  # a malformed file can make pypdf raise nearly anything
        raise QwenMLXError(f"{name}: not a readable PDF ({type(e).__name__}: {e})") from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise QwenMLXError(f"{name}: PDF has no extractable text (scanned pages? run OCR first)")
    return text


def html_text(html: str) -> str:
    parser = HTMLTextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


class HTMLTextExtractor(HTMLParser):
    """The readable text of a page: headings as Markdown '#', list items as '-', blocks as paragraphs.

    Scripts, styles and other non-content elements are dropped; whitespace is collapsed as a browser does.
    """

    SKIPPED = {"script", "style", "noscript", "template", "svg", "head", "nav", "footer"}
    BLOCKS = {"p", "div", "section", "article", "main", "header", "aside", "blockquote", "pre", "table",
              "tr", "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "form", "hr", "address"}
    HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
    VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED and tag not in self.VOID:
            self.skip_depth += 1
        elif tag in self.HEADINGS:
            self.end_block()
            self.current.append("#" * self.HEADINGS[tag] + " ")
        elif tag == "li":
            self.end_block()
            self.current.append("- ")
        elif tag in self.BLOCKS:
            self.end_block()
            self.pre_depth += tag == "pre"
        elif tag == "br":
            self.current.append("\n")
        elif tag in ("td", "th"):
            self.current.append(" ")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self.skip_depth = max(self.skip_depth - 1, 0)
        elif tag in self.HEADINGS or tag == "li" or tag in self.BLOCKS:
            self.end_block()
            if tag == "pre":
                self.pre_depth = max(self.pre_depth - 1, 0)

    def handle_data(self, data):
        if self.skip_depth:
            return
        self.current.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

    def end_block(self):
        text = "".join(self.current)
        if not self.pre_depth:
            text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
        text = text.strip("\n ")
        if text and text not in ("-", *("#" * n for n in range(1, 7))):
            self.blocks.append(text)
        self.current = []

    def text(self) -> str:
        self.end_block()
        return "\n\n".join(self.blocks)

