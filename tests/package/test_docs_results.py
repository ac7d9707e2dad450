"""The docs cite what exists: every ``benchmarks/results/...`` path named in the README, docs/*.md
and benchmarks/README.md is in the repository (and so is every other repository path they name:
``tests/...``, ``examples/...``, ``coreset_optim/...``), and every relative markdown link in them
points to a file that exists (and, with ``#anchor``, to a heading of that file)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])

RESULT_PATH = re.compile(r"benchmarks/results/[\w./{},*-]*")
REPO_PATH = re.compile(r"(?<![\w/.])(?:tests|examples|benchmarks|coreset_optim|docs)/[\w./{},*-]*[\w}*]")
RESULTS = ROOT / "benchmarks" / "results"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def expand_braces(path: str) -> list[str]:
    """``a.{json,md}`` -> ``a.json``, ``a.md`` (shell-style, any number of groups)."""
    parts = re.split(r"(\{[^{}]*\})", path)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def cited_results(text: str, pattern: re.Pattern = RESULT_PATH) -> set[str]:
    """The result paths a text names; a template (``.../<out>_noise-<model>.md``) is left out."""
    found = set()
    for m in pattern.finditer(text):
        if text[m.end() : m.end() + 1] == "<":
            continue
        found.update(expand_braces(m.group().rstrip(".,:")))
    return found


def exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return LINK.findall(text)


def test_the_scan_sees_what_it_should():
    text = (
        "see `benchmarks/results/e2e/e2e.{json,md}`, and benchmarks/results/depth/depth_run3.md. "
        "Noise runs: `benchmarks/results/finetune/<out>_noise-<model>.md`, `benchmarks/results/finetune/x_<y>.md`"
    )
    assert cited_results(text) == {
        "benchmarks/results/e2e/e2e.json",
        "benchmarks/results/e2e/e2e.md",
        "benchmarks/results/depth/depth_run3.md",
    }
    assert (
        slug("Real shapes: long sequences (`results/real_shapes/`)") == "real-shapes-long-sequences-resultsreal_shapes"
    )
    assert slug("`select(batch, loss_fn)` -> Coreset") == "selectbatch-loss_fn---coreset"
    assert cited_results("see tests/test_x.py and examples/a.{py,md}.", REPO_PATH) == {
        "tests/test_x.py",
        "examples/a.py",
        "examples/a.md",
    }
    assert not exists("benchmarks/results/no_such_script/no_such_file.md")
    assert exists("benchmarks/results/*/*.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_result_files_exist(doc: Path):
    missing = sorted(p for p in cited_results(doc.read_text()) if not exists(p))
    assert not missing, f"{doc.relative_to(ROOT)} cites result files that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_repository_paths_exist(doc: Path):
    missing = sorted(p for p in cited_results(doc.read_text(), REPO_PATH) if not exists(p))
    assert not missing, f"{doc.relative_to(ROOT)} names paths that are not in the repository: {missing}"


def test_benchmark_index_results_exist():
    """benchmarks/README.md's table names results relative to benchmarks/results/ (``e2e/e2e.md``)."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    folders = {p.name for p in RESULTS.iterdir() if p.is_dir()}
    cited = set()
    for token in re.findall(r"`([\w]+/[\w./{},*-]+)`", text):
        if token.split("/")[0] in folders:
            cited.update(expand_braces(token))
    assert cited, "the scan found none of the index's results"
    missing = sorted(p for p in cited if not exists(f"benchmarks/results/{p}"))
    assert not missing, f"benchmarks/README.md names results that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files or headings: {broken}"
