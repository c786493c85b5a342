"""Generated markdown: each benchmark run owns one marked section of a docs file."""
from __future__ import annotations

import pathlib


def write_section(path: pathlib.Path, *, tag: str, key: str, text: str, title: str) -> None:
    """Puts `text` between the markers `<!-- TAG: KEY -->` and `<!-- /TAG: KEY -->` in `path`,
    replacing that section only (a rerun on the same device replaces its own figures and keeps
    the others'). A new file starts with `title`; a new section goes at the end."""
    begin, end = f"<!-- {tag}: {key} -->", f"<!-- /{tag}: {key} -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.exists() else title
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
