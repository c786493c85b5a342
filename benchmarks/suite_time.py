"""Wall time of the test suite and of the quickstart on this CPU (issue 6, section 4).

    python -m benchmarks.suite_time --write docs/benchmarks.md     # ~10.5 min on 2 cores
    python -m benchmarks.suite_time --tests tests/test_losses.py --no-quickstart   # a subset

Runs, from the repository root and with the interpreter that runs this script, each command
once, timing its wall clock from start to exit:
- the test suite as the README and CI run it: `python -m pytest -n 2` (`--workers` sets `-n`;
  `--tests` runs only the given files or node ids);
- the quickstart, `python -m experiments.quickstart`, in a fresh temporary work directory (a
  finished work directory would only resume and report), so the time includes imports,
  compilation and its 600 training steps.
Prints a table (command, wall time, outcome as the command printed it) and with `--write`
puts it in the CPU section of docs/benchmarks.md, with the CPU model, the core count and the
load average before and after: on a machine shared with other jobs the times are upper bounds.
Needs nothing beyond `pip install -e '.[test]'`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import markdown, throughput

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_timed(cmd: list[str], *, env: dict | None = None) -> dict:
    """Runs `cmd` in the repository root; returns wall seconds, exit code and output tail."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return {"seconds": seconds, "returncode": proc.returncode, "tail": out[-30:]}


def pytest_outcome(lines: list[str]) -> str:
    """pytest's closing counts ("733 passed, 2 skipped in 453.2s"), or the last line."""
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error)", line):
            return line.strip("= ").strip()
    return lines[-1] if lines else "no output"


def quickstart_outcome(lines: list[str]) -> str:
    for line in reversed(lines):
        if "test accuracy" in line:
            return line.strip()
    return lines[-1] if lines else "no output"


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (-n)")
    p.add_argument("--tests", nargs="*", default=None,
                   help="test files or node ids (default: the whole suite)")
    p.add_argument("--no-tests", action="store_true", help="skip the test suite")
    p.add_argument("--no-quickstart", action="store_true", help="skip the quickstart")
    p.add_argument("--note", default="", help="a line for the header (e.g. machine load)")
    p.add_argument("--write", type=pathlib.Path, default=None, nargs="?", const=throughput.DOC,
                   help="update this markdown file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    load_before = os.getloadavg()[0]
    rows = []
    if not args.no_tests:
        cmd = [sys.executable, "-m", "pytest", "-n", str(args.workers), *(args.tests or [])]
        shown = "python -m pytest -n " + str(args.workers) + "".join(
            f" {t}" for t in args.tests or [])
        print(f"running {shown} ...", file=sys.stderr, flush=True)
        res = run_timed(cmd)
        rows.append(("test suite" if not args.tests else "tests (subset)", shown, res,
                     pytest_outcome(res["tail"])))
    if not args.no_quickstart:
        with tempfile.TemporaryDirectory(prefix="jaxvision-quickstart-") as workdir:
            cmd = [sys.executable, "-m", "experiments.quickstart", f"--config.workdir={workdir}"]
            print("running python -m experiments.quickstart ...", file=sys.stderr, flush=True)
            res = run_timed(cmd)
        rows.append(("quickstart (fresh work directory)", "python -m experiments.quickstart",
                     res, quickstart_outcome(res["tail"])))
    load_after = os.getloadavg()[0]

    device = markdown.cpu_name()
    table = ["| what | command | wall time | outcome |", "| --- | --- | --- | --- |"]
    for what, shown, res, outcome in rows:
        status = "" if res["returncode"] == 0 else f" (exit code {res['returncode']})"
        table.append(f"| {what} | `{shown}` | {_minutes(res['seconds'])} | "
                     f"{outcome.replace('|', '/')}{status} |")
    text = "\n".join([
        f"### Test suite and quickstart on {device}",
        "",
        f"`python -m benchmarks.suite_time{' --tests ...' if args.tests else ''}` on "
        f"{datetime.date.today().isoformat()}, jax {importlib.metadata.version('jax')}; load "
        f"average "
        f"{load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} cores): on a "
        "shared machine the times are upper bounds." + (f" Note: {args.note}" if args.note
                                                        else ""),
        "",
        *table,
    ]) + "\n"
    print(text)
    for what, shown, res, _ in rows:
        if res["returncode"] != 0:
            print(f"{what} failed; its last lines:\n" + "\n".join(res["tail"]), file=sys.stderr)
    if args.write:
        # One section per kind of run, so a quickstart-only or subset run never replaces the
        # whole suite's figure.
        if args.no_tests:
            setting = "quickstart only"
        else:
            setting = ("subset" if args.tests else "full") + (
                " tests only" if args.no_quickstart else "")
        throughput.write_section(
            args.write, throughput.section_key("suite_time", "cpu", device, setting), text)
        print(f"wrote {args.write}")
    if any(res["returncode"] != 0 for _, _, res, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
