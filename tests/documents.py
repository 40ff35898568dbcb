"""The bundled articles, and PDF / HTML files built from them at test time."""

import html
import io
from pathlib import Path

DOCUMENTS = Path(__file__).parent / "fixtures" / "documents"
ENGLISH_MOE = DOCUMENTS / "qwen3-moe-architecture.md"
ENGLISH_LONG_CONTEXT = DOCUMENTS / "long-context-inference.md"
CHINESE = DOCUMENTS / "qwen3-long-context.zh.md"
ALL_DOCUMENTS = [ENGLISH_MOE, ENGLISH_LONG_CONTEXT, CHINESE]


def paragraphs(path: Path) -> list[str]:
    """The article's blocks (headings and paragraphs), each on one line."""
    return [" ".join(block.split()) for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]


def pdf_bytes(pages: list[list[str]]) -> bytes:
    """A PDF whose pages show these lines in Helvetica (Latin-1 text only), written by pypdf."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        shown = []
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            shown.append(f"({escaped}) Tj 0 -14 Td")
        content = DecodedStreamObject()
        content.set_data(f"BT /F1 11 Tf 72 740 Td {' '.join(shown)} ET".encode("latin-1"))
        page.replace_contents(content)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def html_page(path: Path) -> str:
    """The article as a web page: headings, paragraphs, a list, plus a script, a style and a nav bar to drop."""
    body = []
    for block in paragraphs(path):
        if block.startswith("#"):
            marks, _, title = block.partition(" ")
            body.append(f"<h{len(marks)}>{html.escape(title)}</h{len(marks)}>")
        else:
            words = html.escape(block).split(" ")
            words[1] = f"<em>{words[1]}</em>"  # inline markup must not cost the spaces around it
            body.append(f"<p>\n  {' '.join(words)}\n</p>")
    return (
        "<!DOCTYPE html>\n<html><head><title>Article</title><style>p { color: red; }</style>"
        "<script>var hidden = 'do not extract';</script></head>\n<body>\n"
        "<nav><a href='/'>Home</a></nav>\n" + "\n".join(body)
        + "\n<ul><li>first &amp; one</li><li>second</li></ul>\n</body></html>\n"
    )
