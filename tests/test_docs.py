"""The documentation tells the truth about the bundle.

Every `scripts/...` command README.md and docs/ show exists, and every `--flag` they show is in
that command's real `--help`; the site builds with `mkdocs build --strict` (every page in the
navigation, every relative link and anchor resolved) and README.md's own links resolve; the
generated parts (counts, option tables, benchmark tables) equal what tests/docgen.py reads from
the code, the tests and the records; every benchmark record follows its schema and every record
the docs name exists; and the docs name no path outside the repository.
"""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import jsonschema
import pytest
from markdown.extensions.toc import slugify

from tests import docgen

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCUMENTS = [*PAGES, ROOT / "CHANGELOG.md"]  # the changelog names commands as they were, so it is not run
RECORDS = ROOT / "benchmarks" / "results"

COMMAND = re.compile(r"(?<![\w/.-])(?:\./)?scripts/([a-z_]+(?:\.sh)?)(?![\w/.-])")
MODULE = re.compile(r"(?:python|torchrun)\b[^`|]*?\s-m\s+([a-z_][\w.]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SUBCOMMANDS = {
    "serve": ("start", "stop", "status", "key"),
    "models": ("status", "register", "promote", "rollback", "scale", "unregister", "compare"),
    "image": ("build", "run", "base"),
}


def fenced_lines(text: str) -> list[str]:
    """The lines of shell code blocks (continuations joined), where commands are shown."""
    lines, keep, fence = [], False, False
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            fence = not fence
            keep = fence and line.strip("`").strip() in ("", "bash", "sh", "console")
            continue
        if fence and keep:
            lines.append(line.split(" # ")[0])
    return lines


def inline_spans(text: str) -> list[str]:
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", outside)


def shown_commands(snippet: str) -> list[tuple[tuple[str, ...], str]]:
    """(command, the text after it) for each command the snippet runs."""
    found = []
    for match in COMMAND.finditer(snippet):
        tail = re.split(r"[|;)]|&&", snippet[match.end() :])[0]
        found.append((("scripts", match.group(1)), tail))
    for match in MODULE.finditer(snippet):
        tail = re.split(r"[|;)]|&&", snippet[match.end() :])[0]
        found.append((("-m", match.group(1)), tail))
    return found


def with_subcommand(command: tuple[str, ...], tail: str) -> tuple[str, ...]:
    words = tail.split()
    if command[0] == "scripts" and words and words[0] in SUBCOMMANDS.get(command[1], ()):
        return (*command, words[0])
    return command


@cache
def help_text(command: tuple[str, ...]) -> str:
    if command[0] == "scripts":
        argv = [str(ROOT / "scripts" / command[1]), *command[2:], "--help"]
    else:
        argv = [str(ROOT / ".venv" / "bin" / "python"), "-m", command[1], "--help"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(argv)} exited {out.returncode}: {out.stderr[-500:]}"
    text = out.stdout + out.stderr
    if len(command) > 2:  # a subcommand also takes its command's global options
        text += help_text(command[:2])
    return text


def uses() -> dict[Path, list[tuple[tuple[str, ...], set[str]]]]:
    """Per document: each command shown with the flags shown with it, and the flags shown
    alone (an inline `--flag`), which belong to one of the commands of the same page."""
    per_doc = {}
    for doc in PAGES:
        text = doc.read_text()
        shown: list[tuple[tuple[str, ...], set[str]]] = []
        for snippet in fenced_lines(text) + inline_spans(text):
            for command, tail in shown_commands(snippet):
                shown.append((with_subcommand(command, tail), set(FLAG.findall(tail))))
        alone = {f for span in inline_spans(text) if span.startswith("--") for f in FLAG.findall(span)}
        shown.append((("page",), alone))
        per_doc[doc] = shown
    return per_doc


def test_every_command_shown_exists():
    missing = {
        f"{doc.relative_to(ROOT)}: scripts/{command[1]}"
        for doc, shown in uses().items()
        for command, _ in shown
        if command[0] == "scripts" and not (ROOT / "scripts" / command[1]).is_file()
    }
    assert not missing, sorted(missing)


@pytest.mark.timeout(900)  # some forty --help runs, each starting Python (the bench commands also set up first)
def test_every_flag_shown_is_in_its_commands_help():
    per_doc = uses()
    needed = set()
    for shown in per_doc.values():
        alone = any(flags for c, flags in shown if c == ("page",))
        needed |= {c for c, flags in shown if c != ("page",) and (flags or alone)}
    needed = {c for c in needed if c[0] != "scripts" or (ROOT / "scripts" / c[1]).is_file()}
    with ThreadPoolExecutor(4) as pool:  # each --help starts Python; four at a time
        list(pool.map(help_text, sorted(needed)))
    wrong = []
    for doc, shown in per_doc.items():
        page_help = "".join(help_text(c) for c, _ in shown if c in needed)
        for command, flags in shown:
            text = page_help if command == ("page",) else help_text(command) if command in needed else ""
            wrong += [f"{doc.relative_to(ROOT)}: {' '.join(command)} {flag}" for flag in flags if flag not in text]
    assert not wrong, wrong


def test_the_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on a broken link or anchor and on a page left out of the navigation."""
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(re.sub(r"[`*]", "", h), "-") for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_link_of_the_readme_resolves():
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(#[^)\s]*)?\)", (ROOT / "README.md").read_text()):
        path, anchor = target
        if path.startswith(("http://", "https://")):
            continue
        if not (ROOT / path).exists():
            broken.append(path)
        elif anchor and anchor[1:] not in anchors(ROOT / path):
            broken.append(path + anchor)
    assert not broken, broken


def test_the_generated_parts_are_up_to_date():
    assert docgen.stale() == [], "run: .venv/bin/python -m tests.docgen"


def test_every_record_follows_the_schema():
    schema = json.loads((RECORDS / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    records = sorted(p for p in RECORDS.glob("*.json") if p.name != "schema.json")
    assert records
    for path in records:
        record = json.loads(path.read_text())
        jsonschema.validate(record, schema)
        assert record["name"] == path.stem, path


def test_what_the_one_writer_writes_follows_the_schema(tmp_path, monkeypatch):
    from scripts.bench import record

    monkeypatch.setattr(record, "RESULTS", tmp_path)
    path = record.write_record("a-run", {"throughput": 1.0}, command="scripts/bench_serving --duration 5")
    jsonschema.validate(json.loads(path.read_text()), json.loads((RECORDS / "schema.json").read_text()))


def test_every_record_the_docs_name_exists():
    named = {name for doc in DOCUMENTS for name in re.findall(r"[Rr]ecord `([a-z0-9._-]+)`", doc.read_text())}
    assert named
    assert not {n for n in named if not (RECORDS / f"{n}.json").is_file()}, named


def test_the_docs_name_no_path_outside_the_repository():
    outside = re.compile(r"/work/|\.\./shared|PLATFORM\.md|/home/|/tmp/")
    found = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in [
            *DOCUMENTS,
            ROOT / "pyproject.toml",
            *(ROOT / "requirements").glob("*.txt"),
            RECORDS / "README.md",
            *RECORDS.glob("*.json"),
        ]
        for m in outside.finditer(p.read_text())
    ]
    assert not found, found
