"""Benchmark results as JSON, and the one renderer of the figures in docs/.

Each benchmark calls `record(marker, doc, markdown, data)`: it writes docs/results/MARKER.json
(the figures as data, the table as the benchmark rendered it, the command, the date and the
versions) and then renders. `python scripts/results.py` renders every result into the section of
its page between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->`; `--check` exits 1 where a
page's section is not its result's (a figure edited by hand, or a result not rendered), which a
test runs. git keeps the history of both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _block(marker: str, text: str) -> str:
    return f"<!-- {marker}:begin -->\n{text.rstrip()}\n<!-- {marker}:end -->"


def render_page(page: str, results: list[dict]) -> str:
    """The page with each result's section replaced (appended where the page has no section yet)."""
    for res in results:
        begin, end = f"<!-- {res['marker']}:begin -->", f"<!-- {res['marker']}:end -->"
        block = _block(res["marker"], res["markdown"])
        if begin in page and end in page:
            page = page[:page.index(begin)] + block + page[page.index(end) + len(end):]
        else:
            page = page.rstrip() + "\n\n" + block + "\n"
    return page


def load_results() -> dict[Path, list[dict]]:
    by_doc: dict[Path, list[dict]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        res = json.loads(path.read_text())
        by_doc.setdefault(ROOT / res["doc"], []).append(res)
    return by_doc


def render(check: bool = False) -> list[str]:
    """Render every result; with `check`, change nothing and return the pages that differ."""
    stale = []
    for doc, results in load_results().items():
        old = doc.read_text() if doc.exists() else "# Performance\n"
        new = render_page(old, results)
        if new != old:
            stale.append(str(doc.relative_to(ROOT)))
            if not check:
                doc.write_text(new)
    return stale


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of a Markdown table's rows (header first, the rule left out)."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in markdown.splitlines() if ln.startswith("|")]
    return [r for r in rows if not all(set(c) <= set("-: ") for c in r)]


def record(marker: str, doc: Path | str, markdown: str, data=None, command: str | None = None) -> Path:
    """Write a benchmark's result (docs/results/MARKER.json: `data`, or its table's cells) and
    render it into `doc`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = Path(doc).resolve()
    res = {"marker": marker, "doc": str(doc.relative_to(ROOT)), "date": time.strftime("%Y-%m-%d"),
           "command": command or " ".join(["python", *sys.argv]),
           "data": data if data is not None else {"table": table_rows(markdown)}, "markdown": markdown.rstrip()}
    path = RESULTS / f"{marker}.json"
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    render()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 where a page differs")
    stale = render(check=ap.parse_args().check)
    if stale:
        print("not as rendered from docs/results/: " + ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
