"""Generated markdown: each benchmark run owns one marked section of a docs file."""
from __future__ import annotations

import os
import pathlib
import platform


def write_section(path: pathlib.Path, *, tag: str, key: str, text: str, title: str) -> None:
    """Puts `text` between the markers `<!-- TAG: KEY -->` and `<!-- /TAG: KEY -->` in `path`,
    replacing that section only (a rerun on the same device replaces its own figures and keeps
    the others'). A new file starts with `title`; a new section goes at the end."""
    begin, end = f"<!-- {tag}: {key} -->", f"<!-- /{tag}: {key} -->"
    old = path.read_text() if path.exists() else title
    new = put_section(old, begin, end, f"{begin}\n{text}{end}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def doc_title(heading: str, module: str, *, what: str = "measured") -> str:
    """The opening of a generated doc: its heading and which script writes it."""
    return (f"# {heading}\n\nMade by `python -m benchmarks.{module}` (see its docstring for what "
            f"is {what} and how). One section per device; a rerun replaces its own section.\n\n")


def put_section(doc: str, begin: str, end: str, block: str, *, before: str | None = None) -> str:
    """`doc` with the section from `begin` to `end` replaced by `block`; a new section goes at
    the end, or just before the first occurrence of `before` if given and present."""
    if begin in doc and end in doc:
        return doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end) + 1:]
    if before is not None and before in doc:
        i = doc.index(before)
        return doc[:i] + block + "\n" + doc[i:]
    return doc.rstrip("\n") + "\n\n" + block


def cpu_name() -> str:
    """This machine's processor as the docs name it: "CPU: MODEL, N cores visible"."""
    model = platform.processor() or "CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores visible"


def device_name() -> str:
    """jax's first device as the docs name it: an accelerator by its kind, a CPU by `cpu_name`."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({dev.platform}, {jax.device_count()} device(s))"
    return cpu_name()
