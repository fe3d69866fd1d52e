"""MkDocs hooks: pages of the site whose text lives outside docs/.

The changelog and the benchmark records' README are kept where their readers look for them
(CHANGELOG.md at the root, benchmarks/results/README.md beside the records); the site shows
them as pages of its own. `PENDING` names pages the navigation lists whose text is not written
yet: each gets a one-paragraph placeholder page until its file exists in docs/.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
FROM_ROOT = {"changelog.md": ROOT / "CHANGELOG.md", "records.md": ROOT / "benchmarks" / "results" / "README.md"}
PENDING: dict[str, str] = {}


def on_files(files: Files, config) -> Files:
    for uri, source in FROM_ROOT.items():
        # Links written from the repository root (CHANGELOG.md's "docs/x.md") lead to the page itself.
        text = source.read_text().replace("](docs/", "](")
        files.append(File.generated(config, uri, content=text))
    for uri, title in PENDING.items():
        if files.get_file_from_path(uri) is None:
            text = f"# {title}\n\nThis page is not written yet; see the [index](index.md).\n"
            files.append(File.generated(config, uri, content=text))
    return files
