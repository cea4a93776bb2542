"""The package's shape: family facts stay in models/, every module is named where its package is
described, and no file or function runs away.

After the core was reorganised by stage (issue: a core for many model families), adding a family
must touch only ``models/<family>.py`` and the registry. These tests keep it so: no GPT-2 literal
in code outside ``loratune/models/`` (docstrings and comments may mention GPT-2).

Files split by idea, not by size. Size is guidance, not a rule: ``python tests/test_layout.py``
prints the largest files and functions (a file past ~500 lines usually holds two ideas, see
shared/STYLE.md), and the test fails only on a runaway (over 1,000 lines, or a function over 150),
far above where a file should be split for its ideas.

A package's ``__init__`` docstring is its map: it names each of its modules in double backticks
(````sampling````) with one line on its idea, and a test checks that none is missing. Measured
numbers (GB/s, tokens/s, "3x faster") go stale in docstrings: they live in benchmarks/results/ and a
docstring points there (checked too).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loratune"
SOURCES = sorted(PACKAGE.rglob("*.py"))
GPT2_LITERALS = ("50256", "<|endoftext|>", "transformer.h.", "c_attn", "c_proj", "c_fc", '"gpt2"', "'gpt2'",
                 "GPT2", "n_embd", "n_positions")
RUNAWAY_FILE_LINES = 1000
"""Only a runaway file fails (guidance, ~500, is in the size report)."""
RUNAWAY_FUNCTION_LINES = 150
"""Only a runaway function fails."""
MEASURED = re.compile(r"\d[\d.,]*\s*(?:x|×)\s+(?:faster|slower|less|more)|\d[\d.,]*\s*(?:GB/s|GiB/s|MB/s|tokens/s|"
                      r"tok/s|it/s|TFLOPS)(?!\w)", re.IGNORECASE)
"""A measured figure in prose: "3.1x faster", "12 GB/s", "950 tokens/s". (Milliseconds are left out: "every
50 ms" is a setting more often than a measurement; those were read by hand.)"""


def code_without_docs(path: Path) -> str:
    """The file's code with comments and docstrings removed (string literals that are code stay)."""
    source = path.read_text(encoding="utf-8")
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings.add(body[0].lineno)
    # attribute docstrings (a string statement after a field) are docs too
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.add(node.lineno)
    kept = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.start[0] in docstrings):
            continue
        kept.append(tok.string)
    return " ".join(kept)


def test_the_scan_sees_code_and_skips_docs(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""GPT2 in a docstring."""\nX = 1  # GPT2 in a comment\nY = "c_attn"\n'
                      'def f():\n    """c_attn in a docstring"""\n    return 50256\n')
    code = code_without_docs(sample)
    assert "c_attn" in code and "50256" in code and "GPT2" not in code


@pytest.mark.parametrize("path", [p for p in SOURCES if "models" not in p.relative_to(PACKAGE).parts],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_gpt2_facts_outside_models(path):
    code = code_without_docs(path)
    found = [lit for lit in GPT2_LITERALS if lit in code]
    assert not found, f"{path.relative_to(PACKAGE)} names {found}: ask the family spec (loratune/models/spec.py)"


def sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, file) and (lines, file:function) over the package, largest first."""
    files, functions = [], []
    for path in SOURCES:
        source = path.read_text(encoding="utf-8")
        name = str(path.relative_to(PACKAGE.parent))
        files.append((source.count("\n"), name))
        functions += [(node.end_lineno - node.lineno + 1, f"{name}:{node.name}") for node in ast.walk(ast.parse(source))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return sorted(files, reverse=True), sorted(functions, reverse=True)


def size_report(top: int = 10) -> str:
    """The largest files and functions: where to look for two ideas in one place (guidance, not a rule)."""
    files, functions = sizes()
    lines = [f"largest files (guidance: past ~500 lines a file usually holds two ideas; fails past "
             f"{RUNAWAY_FILE_LINES}):"]
    lines += [f"  {n:5d}  {name}" for n, name in files[:top]]
    lines.append(f"largest functions (fails past {RUNAWAY_FUNCTION_LINES}):")
    lines += [f"  {n:5d}  {name}" for n, name in functions[:top]]
    return "\n".join(lines)


def test_no_runaway_files_or_functions():
    files, functions = sizes()
    runaway = [f"{name}: {n} lines" for n, name in files if n > RUNAWAY_FILE_LINES]
    runaway += [f"{name}: {n} lines" for n, name in functions if n > RUNAWAY_FUNCTION_LINES]
    assert not runaway, "runaway sizes (split by idea):\n" + "\n".join(runaway) + "\n" + size_report()


PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py"))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_every_module_is_named_in_its_package_docstring(package):
    """The package's docstring is its map: each module (and subpackage) named in double backticks."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))) or ""
    modules = [p.stem for p in package.glob("*.py") if p.name != "__init__.py"]
    modules += [p.name for p in package.iterdir() if (p / "__init__.py").is_file()]
    missing = sorted(m for m in modules if f"``{m}``" not in doc)
    assert not missing, f"{package.relative_to(PACKAGE.parent)}/__init__.py's docstring does not name {missing}"


def docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the module's, classes' and functions' docstrings, and attribute docstrings."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found.append((node.lineno, node.value.value))
    return found


def test_the_measured_figure_scan_sees_figures():
    for text in ("3.1x faster than fp32", "12 GB/s", "950 tokens/s", "2× slower", "19\nGB/s"):
        assert MEASURED.search(text), text
    for text in ("polled every 50 ms", "the 2x2 grid", "rms_norm_eps", "a 4x larger vocabulary"):
        assert not MEASURED.search(text), text


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_measured_figures_in_docstrings(path):
    """A speed or throughput measured once goes stale in prose: point to benchmarks/results/ instead."""
    found = [f"line {line}: {m.group(0)!r}" for line, text in docstrings(path) for m in MEASURED.finditer(text)]
    assert not found, f"{path.relative_to(PACKAGE)} states measured figures {found}: point to benchmarks/results/"


def test_the_flat_modules_are_gone():
    """Stages are subpackages; a module per idea inside them."""
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    # besides the errors, only the bounded YAML reader the recipe and the CLI's --set share
    assert flat == ["__init__.py", "__main__.py", "bounded_yaml.py", "errors.py"]
    for stage in ("hub", "models", "adapters", "data", "train", "generate", "cli", "recipe"):
        assert (PACKAGE / stage / "__init__.py").is_file()


if __name__ == "__main__":
    print(size_report(top=15))
