"""docs/benchmarks.md's tables are the results files, row for row; the README is a front door to docs/.

Every ``<!-- table: PATH -->`` ... ``<!-- end table -->`` block in README.md and docs/*.md must equal
what ``python benchmarks/report_tables.py PATH`` prints for that results JSON. docs/benchmarks.md
holds a block for every results JSON in benchmarks/results/, each with one row per measured job;
the README's headline table is one of them, checked the same way. The README stays short (at most
300 lines) and links every page of docs/, and every relative link in the README and docs/ lands
on a file and heading that exist (RELIABILITY.md's too), as does every repository file they name in
backticks. docs/architecture.md's tree lists exactly the modules of loratune/. Offline, no torch.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BENCHMARKS = DOCS / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"^<!-- table: (?P<path>\S+) -->\n(?P<body>.*?)\n<!-- end table -->$", re.DOTALL | re.MULTILINE)
PAGES = [README, *sorted(DOCS.glob("*.md"))]
PROSE = [*PAGES, ROOT / "RELIABILITY.md"]  # whose links and named files are checked
README_MAX_LINES = 300


def _load_report_tables():
    spec = importlib.util.spec_from_file_location("report_tables", ROOT / "benchmarks" / "report_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tables = _load_report_tables()


def table_blocks(page: Path) -> dict[str, str]:
    """The generated-table blocks of one markdown page, by results path (one block per path)."""
    blocks: dict[str, str] = {}
    for m in BLOCK.finditer(page.read_text(encoding="utf-8")):
        assert m["path"] not in blocks, f"{page.name} has two table blocks for {m['path']}"
        blocks[m["path"]] = m["body"]
    return blocks


def data_rows(markdown: str) -> list[str]:
    """Table lines that are neither a header nor a |---| separator (counted here, not by the module)."""
    lines = markdown.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.startswith("|") or line.startswith("|---"):
            continue
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            continue  # a header
        rows.append(line)
    return rows


BLOCKS = table_blocks(BENCHMARKS)
EVERY_BLOCK = [(page.relative_to(ROOT).as_posix(), path, body)
               for page in PAGES for path, body in table_blocks(page).items()]


def test_benchmarks_page_has_table_blocks():
    assert BLOCKS, "no <!-- table: ... --> blocks in docs/benchmarks.md"


def test_every_results_file_has_a_block():
    files = sorted(p.relative_to(ROOT).as_posix() for p in RESULTS.glob("*.json"))
    assert files, "no results JSON in benchmarks/results"
    missing = [f for f in files if f not in BLOCKS]
    assert not missing, f"docs/benchmarks.md has no generated table for {missing}"


@pytest.mark.parametrize("page,path,body", EVERY_BLOCK, ids=[f"{pg}:{p}" for pg, p, _ in EVERY_BLOCK])
def test_block_equals_the_generated_tables(page, path, body):
    assert (ROOT / path).is_file(), f"{page} names {path}, which does not exist"
    expected = report_tables.render_file(ROOT / path)
    assert body == expected, (
        f"{page}'s table for {path} is not what the results file gives; regenerate it with "
        f"`python benchmarks/report_tables.py --markers {path}`")


@pytest.mark.parametrize("path", sorted(BLOCKS))
def test_one_row_per_measured_job(path):
    result = json.loads((ROOT / path).read_text())
    jobs = len(result.get("train") or []) + len(result.get("generate") or []) + len(result.get("rows") or [])
    assert jobs > 0
    assert len(data_rows(BLOCKS[path])) == jobs == report_tables.count_jobs(result)
    assert len(data_rows(report_tables.render(result))) == jobs


def test_readme_is_a_front_door():
    """Short, with one generated headline table (also on the benchmarks page), linking every page of docs/."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md is {len(text.splitlines())} lines"
    headline = table_blocks(README)
    assert len(headline) == 1, f"README.md should hold one headline table, has {sorted(headline)}"
    assert set(headline) <= set(BLOCKS), "the README's headline table is not on docs/benchmarks.md"
    pages = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))
    unlinked = [p for p in pages if f"]({p})" not in text and f"]({p}#" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


# --------------------------------------------------------------------------- links
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lowercase, punctuation dropped, spaces -> '-')."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links() -> list[tuple[str, str]]:
    out = []
    for page in PROSE:
        for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
            if not re.match(r"[a-z]+:", target):  # http(s):, mailto: ...
                out.append((page.relative_to(ROOT).as_posix(), target))
    return out


@pytest.mark.parametrize("page,target", _links())
def test_relative_links_resolve(page, target):
    file, _, anchor = target.partition("#")
    dest = (ROOT / page).parent / file if file else ROOT / page
    assert dest.exists(), f"{page} links {target}: {file} does not exist"
    if anchor:
        assert anchor in anchors(dest), f"{page} links {target}: no heading with that anchor in {file or page}"


def test_anchors_follow_github():
    """The slug rule the link check uses, on headings this repository has."""
    page = DOCS / "serving.md"
    assert "serving-many-adapters-loratune-serve-openai-compatible" in anchors(page)
    assert "dora-pissa-olora-gaussian-lora" in anchors(DOCS / "adapters.md")


# --------------------------------------------------------------------------- the architecture page
PATH_IN_TICKS = re.compile(r"`((?:loratune|tests|benchmarks|recipes|docs)/[\w./-]*\.(?:py|yaml|json|md))`")


def test_named_files_exist():
    """Every `loratune/...py`, `tests/...`, `benchmarks/...`, `recipes/...` a page names in backticks exists."""
    missing = [(page.relative_to(ROOT).as_posix(), name) for page in PROSE
               for name in PATH_IN_TICKS.findall(page.read_text(encoding="utf-8")) if not (ROOT / name).exists()]
    assert not missing, f"pages name files that do not exist: {missing}"


def architecture_modules() -> set[str]:
    """The modules docs/architecture.md's tree of loratune/ lists, as paths ("loratune/train/loop.py").

    The tree is the fenced block under the heading `loratune/`: a line indented 2k spaces is at
    depth k; a line whose first word ends in "/" opens a package, and the leading words of a line
    that end in ".py" are modules of the package above it (descriptions follow them)."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    tree = text[text.index("## `loratune/`"):]
    tree = tree[tree.index("```") + 3:]
    tree = tree[tree.index("\n") + 1:tree.index("```")]
    stack: list[str] = []
    found = set()
    for line in tree.splitlines():
        words = line.split()
        if not words:
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        if words[0].endswith("/"):
            stack = stack[:depth] + [words[0].rstrip("/")]
            continue
        for word in words:
            if not word.endswith(".py"):
                break
            if word != "__init__.py":  # a package's map is its docstring (tests/test_layout.py)
                found.add("/".join(stack[:depth] + [word]))
    return found


def test_architecture_names_every_module():
    """docs/architecture.md lists each module of loratune/ (but the package __init__ files) and no other."""
    actual = {p.relative_to(ROOT).as_posix() for p in (ROOT / "loratune").rglob("*.py") if p.name != "__init__.py"}
    listed = architecture_modules()
    assert not actual - listed, f"docs/architecture.md does not describe {sorted(actual - listed)}"
    assert not listed - actual, f"docs/architecture.md describes modules that do not exist: {sorted(listed - actual)}"


def test_slower_and_failed_rows_are_shown():
    """A row where loratune is slower, a failed side and a missing side all get a row of their own."""
    side = {"tokens_per_s": 100.0, "peak_memory": 2**30, "final_loss": 2.0, "runs": 1, "errors": []}
    slow = {**side, "tokens_per_s": 50.0, "runs": 3}
    failed = {"tokens_per_s": None, "peak_memory": None, "final_loss": None, "runs": 0,
              "errors": ["RuntimeError: out of | memory"]}
    result = {
        "machine": {"cpu": "test cpu", "cores": 2},
        "args": {"cases": "lora-qv", "precisions": "fp32", "seqs": "128,256,512", "sizes": "124m", "batch": 4,
                 "gen": "1", "gen_precisions": "fp32", "repeats": 2},
        "train": [
            {"case": "lora-qv", "precision": "fp32", "group": "fp32", "seq": 128, "size": "124m",
             "loratune": slow, "peft": {**side, "runs": 3}},
            {"case": "lora-qv", "precision": "fp32", "group": "fp32", "seq": 256, "size": "124m",
             "loratune": side, "peft": failed},
            {"case": "lora-qv", "precision": "fp32", "group": "fp32", "seq": 512, "size": "124m", "loratune": side},
        ],
        "generate": [{"batch": 1, "precision": "fp32", "loratune": {"tokens_per_s": 10.0, "errors": ["boom"]},
                      "transformers": {"tokens_per_s": 5.0, "errors": []}}],
    }
    text = report_tables.render(result)
    rows = data_rows(text)
    assert len(rows) == 4
    assert "0.50x (slower)" in rows[0] and "3 (median)" in rows[0] and "batch 4" in rows[0]
    assert "| failed |" in rows[1] and "out of \\| memory" in rows[1] and "2.00 GiB" not in rows[1]
    assert "| missing |" in rows[2]
    assert "ours 1 (single run), peer 2 (median); 1 failed" in rows[3]
    assert "slower than the peer in 1 of 3 training rows (2 with a failed side)" in text
    assert report_tables.render(result) == text  # deterministic


def test_cli_prints_the_tables(capsys):
    path = min(RESULTS.glob("*.json"))
    assert report_tables.main([str(path)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == report_tables.render_file(path)
