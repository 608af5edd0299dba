"""``docs/protocol.md`` is the normative wire spec: keep its tables in step with the code.

Checked here: every ``ErrorCode`` and ``CloseCode`` with its number, name and retry/reconnect
meaning; every frame type of ``frames.FRAME_TYPES`` (and every nested record) with its own
section whose table lists exactly the class's fields, with their type, presence and bounds;
every signature label and BLAKE2b personalisation used in the protocol package.
"""

from __future__ import annotations

import ast
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medrelay_protocol
import pytest
from medrelay_protocol.codes import CloseCode, ErrorCode, Reconnect
from medrelay_protocol.crypto import DOMAIN
from medrelay_protocol.frames import FRAME_TYPES
from medrelay_protocol.schema import INT_MAX, Record, Spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
PACKAGE = Path(medrelay_protocol.__file__).resolve().parent
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
RECORD_HEADING = re.compile(r"^`([A-Za-z_]+)`")
RECONNECT_WORDS = {
    Reconnect.NEVER: "never",
    Reconnect.AFTER_BACKOFF: "after backoff",
    Reconnect.AFTER_REAUTH: "after reauth",
}
SCALAR_NAMES = {str: "str", bytes: "bin", int: "int", bool: "bool"}
RANGE = "\N{EN DASH}"  # the doc writes a range of lengths or values as lo, en dash, hi


@dataclass(frozen=True)
class Section:
    level: int
    title: str
    lines: tuple[str, ...]

    def rows(self) -> list[list[str]]:
        """Table body rows (header and separator rows dropped), cells stripped of backticks."""
        rows = []
        for line in self.lines:
            if not line.startswith("|"):
                continue
            cells = [c.strip().replace("`", "") for c in _split_row(line)]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            rows.append(cells)
        return rows[1:] if rows else rows  # the first row is the header


def _split_row(line: str) -> list[str]:
    """Cells of a Markdown table row; ``\\|`` inside a cell is not a separator."""
    inner = line.strip().strip("|")
    return [c.replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _sections(text: str) -> list[Section]:
    out: list[Section] = []
    level, title = 0, ""
    lines: list[str] = []
    for line in text.splitlines():
        m = HEADING.match(line)
        if m:
            out.append(Section(level, title, tuple(lines)))
            level, title, lines = len(m.group(1)), m.group(2).strip(), []
        else:
            lines.append(line)
    out.append(Section(level, title, tuple(lines)))
    return out


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sections(doc: str) -> list[Section]:
    return _sections(doc)


def _section(sections: list[Section], starts: str) -> Section:
    found = [s for s in sections if s.title.startswith(starts)]
    assert len(found) == 1, f"expected one section titled {starts!r}, found {len(found)}"
    return found[0]


def _record_sections(sections: list[Section]) -> dict[str, Section]:
    """Level-4 sections whose title starts with a backticked name: frames and records."""
    out: dict[str, Section] = {}
    for s in sections:
        m = RECORD_HEADING.match(s.title)
        if s.level == 4 and m:
            assert m.group(1) not in out, f"two sections for {m.group(1)}"
            out[m.group(1)] = s
    return out


# ------------------------------------------------------------------------------- codes


def test_every_error_code_is_in_the_table(sections: list[Section]) -> None:
    rows = {r[0]: r for r in _section(sections, "4.1 ErrorCode").rows()}
    for code in ErrorCode:
        row = rows.get(str(int(code)))
        assert row is not None, f"{code.name} ({int(code)}) missing from section 4.1"
        assert row[1] == code.name, f"{int(code)} is {code.name}, the doc says {row[1]}"
        assert row[2] == ("yes" if code.retryable else "no"), f"{code.name}: retryable column"
        assert row[3], f"{code.name}: say when it is sent"
    assert set(rows) == {str(int(c)) for c in ErrorCode}, "the doc lists codes the code lacks"


def test_every_close_code_is_in_the_table(sections: list[Section]) -> None:
    rows = {r[0]: r for r in _section(sections, "4.2 CloseCode").rows()}
    for code in CloseCode:
        row = rows.get(str(int(code)))
        assert row is not None, f"{code.name} ({int(code)}) missing from section 4.2"
        assert row[1] == code.name, f"{int(code)} is {code.name}, the doc says {row[1]}"
        assert row[2] == RECONNECT_WORDS[code.reconnect], f"{code.name}: reconnect column"
        assert row[3], f"{code.name}: say when it is sent"
    assert set(rows) == {str(int(c)) for c in CloseCode}, "the doc lists codes the code lacks"


# ------------------------------------------------------------------------------ frames


def _records() -> dict[str, type[Record]]:
    """Every frame (by wire type) and every record nested in one (by class name)."""
    out: dict[str, type[Record]] = dict(FRAME_TYPES)
    pending: list[type[Record]] = list(FRAME_TYPES.values())
    while pending:
        cls = pending.pop()
        for spec in cls.SPECS:
            nested = _nested_record(spec.kind)
            if nested is not None and nested not in out.values():
                out[nested.__name__] = nested
                pending.append(nested)
    return out


def _nested_record(kind: Any) -> type[Record] | None:
    if typing.get_origin(kind) is tuple:
        kind = typing.get_args(kind)[0]
    if isinstance(kind, type) and issubclass(kind, Record):
        return kind
    return None


def _doc_name(cls: type[Record]) -> str:
    return getattr(cls, "TYPE", "") or cls.__name__


def _type_word(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is tuple:
        return f"array<{_type_word(typing.get_args(kind)[0])}"
    if origin is dict:
        key, value = typing.get_args(kind)
        return f"map<{SCALAR_NAMES[key]},{SCALAR_NAMES[value]}>"
    if isinstance(kind, type) and issubclass(kind, Record):
        return _doc_name(kind)
    return SCALAR_NAMES[kind]


def _presence_word(spec: Spec) -> str:
    if spec.optional:
        return "opt"
    return "req" if spec.required else "default"


def _bounds_words(spec: Spec) -> list[str]:
    """Phrases the bounds cell must contain."""
    kind, origin = spec.kind, typing.get_origin(spec.kind)
    if spec.choices is not None:
        return list(spec.choices)
    if origin in (tuple, dict) or kind in (str, bytes):
        if spec.max_len is None:
            return []
        if spec.min_len == spec.max_len:
            return [f"exactly {spec.max_len}"]
        return [f"{spec.min_len}{RANGE}{spec.max_len}"]
    if kind is int:
        if spec.lo == spec.hi:
            return [f"exactly {spec.lo}"]
        if spec.hi == INT_MAX:
            return [f"≥ {spec.lo}"]
        return [f"{spec.lo}{RANGE}{spec.hi}"]
    return []


RECORDS = _records()


def test_frame_types_are_all_known() -> None:
    assert FRAME_TYPES, "frames.FRAME_TYPES is empty"
    assert {"hello", "deliver", "error"} <= set(FRAME_TYPES)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_frame_and_record_has_a_table_of_its_fields(
    sections: list[Section], name: str
) -> None:
    cls = RECORDS[name]
    section = _record_sections(sections).get(name)
    assert section is not None, f"no '#### `{name}`' section in {DOC.name}"
    if name in FRAME_TYPES:
        direction = "client → server" if FRAME_TYPES[name].CLIENT else "server → client"
        assert direction in section.title, f"{name}: heading should say ({direction})"
    rows = {r[0]: r for r in section.rows()}
    fields = [spec.name for spec in cls.SPECS]
    missing = [f for f in fields if f not in rows]
    assert not missing, f"{name}: fields missing from its table: {missing}"
    extra = sorted(set(rows) - set(fields))
    assert not extra, f"{name}: the table lists fields the code lacks: {extra}"
    for spec in cls.SPECS:
        _field, type_cell, presence, bounds = rows[spec.name][:4]
        where = f"{name}.{spec.name}"
        assert type_cell.startswith(_type_word(spec.kind)), f"{where}: type {type_cell!r}"
        assert presence.startswith(_presence_word(spec)), f"{where}: presence {presence!r}"
        for words in _bounds_words(spec):
            assert words in bounds, f"{where}: bounds {bounds!r} should say {words!r}"


# ------------------------------------------------------------------------- crypto labels


def _package_trees() -> list[ast.Module]:
    return [ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))]


def _constants(trees: list[ast.Module]) -> dict[str, object]:
    """Module-level ``NAME = <literal>`` / ``NAME: T = <literal>`` constants of the package."""
    out: dict[str, object] = {}
    for tree in trees:
        for node in tree.body:
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign):
                target, value = node.target, node.value
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
                out[target.id] = value.value
    return out


def _resolve(node: ast.expr, constants: dict[str, object]) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def signature_labels() -> set[str]:
    """Every ``*_LABEL`` constant and every label passed to sign/verify_with_label."""
    trees = _package_trees()
    constants = _constants(trees)
    labels = {v for k, v in constants.items() if k.endswith("_LABEL") and isinstance(v, str)}
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            position = {"sign_with_label": 1, "verify_with_label": 1}.get(node.func.id)
            if position is None or len(node.args) <= position:
                continue
            label = _resolve(node.args[position], constants)
            assert isinstance(label, str), f"unresolvable label at line {node.lineno}"
            labels.add(label)
    return labels


def personalisations() -> set[str]:
    """Every ``person=`` given to blake2b_256 and every ``*_PERSON`` constant."""
    trees = _package_trees()
    constants = _constants(trees)
    people = {v for k, v in constants.items() if k.endswith("_PERSON") and isinstance(v, bytes)}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "blake2b_256":
                for kw in node.keywords:
                    if kw.arg == "person":
                        value = _resolve(kw.value, constants)
                        assert isinstance(value, bytes), f"unresolvable person, line {kw.lineno}"
                        people.add(value)
    return {p.decode("ascii") for p in people}


def test_label_discovery_finds_the_known_labels() -> None:
    assert {"device-proof", "message", "rekey-manifest", "roster-change"} <= signature_labels()


@pytest.mark.parametrize("label", sorted(signature_labels()))
def test_every_signature_label_is_in_the_table(sections: list[Section], label: str) -> None:
    rows = _section(sections, "5.2 SignWithLabel").rows()
    assert label in {r[0] for r in rows}, f"label {label!r} missing from section 5.2"


@pytest.mark.parametrize("person", sorted(personalisations()))
def test_every_personalisation_is_in_the_table(sections: list[Section], person: str) -> None:
    rows = _section(sections, "5.3 BLAKE2b-256").rows()
    assert person in {r[0] for r in rows}, f"person {person!r} missing from section 5.3"


def test_domain_separator_is_stated(doc: str) -> None:
    assert f'"{DOMAIN.decode("ascii")}"' in doc
