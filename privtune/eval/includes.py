"""Generated Markdown includes: a document's block between two markers is rewritten from a result file.

Published tables are never edited by hand: a benchmark writes its summary file, and :func:`replace_block` copies it
into README.md or a guide between ``<!-- NAME -->`` and ``<!-- /NAME -->``, each paragraph and table preceded by a
``<!-- result: ... -->`` citation the published-figure check (:mod:`privtune.eval.published`) follows back to the
file.

Threat model: none; documents and result files only.
"""

from __future__ import annotations

from pathlib import Path


def replace_block(doc: str | Path, name: str, body: str, sources: list[str]) -> bool:
    """Replace the ``<!-- name -->`` ... ``<!-- /name -->`` block of ``doc`` with ``body``; True if it changed.

    Args:
        doc: the Markdown file.
        name: the marker name.
        body: the generated Markdown.
        sources: repository-relative result files the body comes from (cited for the published-figure check).

    Raises:
        ValueError: if ``doc`` lacks either marker (nothing is written).
    """
    doc = Path(doc)
    text = doc.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ValueError(f"{doc} lacks the `{start}` ... `{end}` markers the generated block goes between.")
    cite = f"<!-- result: {', '.join(sources)} -->"
    note = f"Generated from `{sources[0]}` (do not edit by hand)."
    # every paragraph and table of the body carries the citation: the check reads one statement per marker
    chunks = [chunk.strip() for chunk in body.strip().split("\n\n") if chunk.strip()]
    cited = "\n\n".join(f"{cite}\n{chunk}" for chunk in chunks)
    block = f"{start}\n{note}\n\n{cited}\n{end}"
    new = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    if new != text:
        doc.write_text(new)
    return new != text
