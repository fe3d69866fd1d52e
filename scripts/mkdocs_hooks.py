"""MkDocs hooks: pages of the site whose text lives outside docs/.

The changelog and the benchmark records' README are kept where their readers look for them
(CHANGELOG.md at the root, benchmarks/results/README.md beside the records); the site shows
them as pages of its own."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
FROM_ROOT = {"changelog.md": ROOT / "CHANGELOG.md", "records.md": ROOT / "benchmarks" / "results" / "README.md"}


def on_files(files: Files, config) -> Files:
    for uri, source in FROM_ROOT.items():
        # Links written from the repository root (CHANGELOG.md's "docs/x.md") lead to the page itself.
        text = source.read_text().replace("](docs/", "](")
        files.append(File.generated(config, uri, content=text))
    return files
