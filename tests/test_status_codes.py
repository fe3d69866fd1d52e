"""docs/status-codes.md against the handlers' code: every status a handler can answer (each
RequestError's code and type, the KServe envelope's, the codes a failed batch gets) has its
row in the table, and every handler row of the table is one the code can give. The
frontend's rows are checked against a real TorchServe in test_user_server.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "status-codes.md"


def table_rows() -> list[dict]:
    """The inference table's rows: code, type (the `...` of the type cell), answered by."""
    text = DOC.read_text().split("## Inference API", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            found = re.search(r"`([^`]*)`", cells[1])
            rows.append({"code": int(cells[0]), "type": found.group(1) if found else "", "by": cells[2]})
    return rows


def calls(path: Path, name: str) -> list[ast.Call]:
    """Every call of `name` (a function or a method) in a source file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                out.append(node)
    return out


def handler_statuses() -> set[tuple[int, str]]:
    """(code, type) of every RequestError the handlers raise or return."""
    found = set()
    for path in sorted((ROOT / "handlers").glob("*.py")):
        for call in calls(path, "RequestError"):
            code, type_ = call.args[0], call.args[1]
            if not (isinstance(code, ast.Constant) and isinstance(type_, ast.Constant)):
                continue  # the class's own definition passes names, not values
            found.add((code.value, type_.value))
    return found


def test_the_handlers_raise_request_errors_with_literal_codes():
    """The scan below reads codes from literals: a computed code would escape it."""
    for path in sorted((ROOT / "handlers").glob("*.py")):
        for call in calls(path, "RequestError"):
            assert all(isinstance(a, ast.Constant) for a in call.args[:2]), (path.name, ast.unparse(call))
    assert len(handler_statuses()) >= 15


def test_every_handler_status_is_in_the_table():
    rows = {(r["code"], r["type"]) for r in table_rows() if r["by"].startswith("handler")}
    missing = sorted(handler_statuses() - rows)
    assert not missing, f"docs/status-codes.md lacks a row for {missing}"


def test_every_handler_row_of_the_table_is_in_the_code():
    statuses = handler_statuses()
    kserve = {
        c.args[0].value
        for c in calls(ROOT / "handlers" / "kserve_protocol.py", "set_response_status")
        if c.args and isinstance(c.args[0], ast.Constant)
    }
    for row in table_rows():
        if row["by"] != "handler" or row["code"] in (200, 503, 507):
            continue
        if row["type"].startswith("{"):
            assert row["code"] in kserve, row
        else:
            assert (row["code"], row["type"]) in statuses, f"{row} is in the table but no handler gives it"


def test_the_kserve_envelopes_codes_are_in_the_table():
    kserve = {
        c.args[0].value
        for c in calls(ROOT / "handlers" / "kserve_protocol.py", "set_response_status")
        if c.args and isinstance(c.args[0], ast.Constant)
    }
    assert kserve == {400}
    assert any(r["code"] == 400 and r["type"].startswith('{"error"') for r in table_rows())


def test_a_failed_batch_gets_the_codes_the_table_gives():
    """handlers/metrics.py records the code TorchServe answers a batch that raised with."""
    from types import SimpleNamespace

    from handlers.metrics import HandlerMetrics

    seen = {}
    recorder = HandlerMetrics.__new__(HandlerMetrics)
    recorder.size = 1
    recorder.end = lambda errors: seen.update(errors)
    for error in (MemoryError(), RuntimeError("CUDA out of memory"), RuntimeError("a bug")):
        recorder.failed(error)
        assert isinstance(seen[0], SimpleNamespace)
        code = seen[0].code
        assert any(
            r["code"] == code and r["by"] == "handler" and r["type"] == "InternalServerException" for r in table_rows()
        ), code
    assert seen[0].code == 503


def test_the_table_is_well_formed():
    rows = table_rows()
    assert len(rows) >= 30
    assert all(r["by"] in ("handler", "frontend", "handler (KServe)") for r in rows), rows
    codes = [r["code"] for r in rows]
    assert codes == sorted(codes)
