"""Parsing the Medical Council register from CSV (pure: no database, no I/O but the text).

The MCHK publishes its lists as web pages with no API (CLINICAL §4.1); an operator turns
them into a CSV with a header row. Column names are matched case-insensitively, with the
usual spellings::

    registration_no   "Registration No.", reg_no, registration number     (required)
    name_en           "Name", english name, "name (english)"             (required)
    name_zh           chinese name, "name (chinese)"
    specialty         speciality
    status            active | lapsed | removed | suspended | deceased | inactive
                      (absent column: every listed doctor is active)
    reg_type          type, registration type  (full, limited, provisional, temporary, special)
    qualification     qualifications
    qualification_date "qualification date", date

Decisions: the registration number is kept as a string, upper-cased, and only *warned*
about when it does not look like ``M12345`` (the formats of non-full registrations are not
confirmed); a row with a missing number or name, an unknown status, an over-long field or a
duplicate number is skipped and reported, never guessed.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

MAX_BYTES = 64 * 1024 * 1024
MAX_ROWS = 500_000
MAX_FIELD = 256
ACTIVE = "active"
STATUSES = frozenset({ACTIVE, "lapsed", "removed", "suspended", "deceased", "inactive"})
_NUMBER = re.compile(r"[A-Z]\d{5}")

_ALIASES: dict[str, tuple[str, ...]] = {
    "registration_no": (
        "registration_no",
        "registration no.",
        "registration no",
        "registration number",
        "reg_no",
        "reg no",
    ),
    "name_en": ("name_en", "name", "english name", "name (english)", "name in english"),
    "name_zh": ("name_zh", "chinese name", "name (chinese)", "name in chinese"),
    "specialty": ("specialty", "speciality"),
    "status": ("status",),
    "reg_type": ("reg_type", "type", "registration type", "registration_type"),
    "qualification": ("qualification", "qualifications"),
    "qualification_date": ("qualification_date", "qualification date", "date"),
}


class RegisterFormatError(ValueError):
    """The file as a whole cannot be read as a register (no header, missing columns)."""


@dataclass(frozen=True, slots=True)
class RegisterEntry:
    registration_no: str
    name_en: str
    name_zh: str | None = None
    specialty: str | None = None
    reg_type: str | None = None
    qualification: str | None = None
    qualification_date: str | None = None
    status: str = ACTIVE

    @property
    def active(self) -> bool:
        return self.status == ACTIVE


@dataclass
class ParsedRegister:
    entries: list[RegisterEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def parse_register_csv(data: bytes) -> ParsedRegister:
    if len(data) > MAX_BYTES:
        raise RegisterFormatError(f"file larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RegisterFormatError("the register must be UTF-8") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise RegisterFormatError("empty file")
    columns = _columns(header)
    out = ParsedRegister()
    seen: set[str] = set()
    for line, row in enumerate(reader, start=2):
        if line > MAX_ROWS + 1:
            raise RegisterFormatError(f"more than {MAX_ROWS} rows")
        if not any(cell.strip() for cell in row):
            continue
        problem, entry = _entry(row, columns)
        if entry is not None and entry.registration_no in seen:
            problem, entry = "duplicate registration number", None
        if entry is None:
            out.skipped.append(f"line {line}: {problem}")
            continue
        if not _NUMBER.fullmatch(entry.registration_no):
            out.warnings.append(f"line {line}: unusual registration number format")
        seen.add(entry.registration_no)
        out.entries.append(entry)
    return out


def _columns(header: list[str]) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    columns: dict[str, int] = {}
    for canonical, aliases in _ALIASES.items():
        for alias in aliases:
            if alias in names:
                columns[canonical] = names.index(alias)
                break
    missing = {"registration_no", "name_en"} - set(columns)
    if missing:
        raise RegisterFormatError(f"missing column {sorted(missing)[0]}")
    return columns


def _entry(row: list[str], columns: dict[str, int]) -> tuple[str, RegisterEntry | None]:
    values: dict[str, str | None] = {}
    for name, index in columns.items():
        cell = row[index].strip() if index < len(row) else ""
        if len(cell) > MAX_FIELD:
            return f"{name} longer than {MAX_FIELD} characters", None
        values[name] = cell or None
    number, name_en = values.pop("registration_no"), values.pop("name_en")
    if number is None or name_en is None:
        return "registration number and English name are required", None
    status = (values.pop("status", None) or ACTIVE).lower()
    if status not in STATUSES:
        return "unknown status", None
    return "", RegisterEntry(
        registration_no=number.upper().replace(" ", ""),
        name_en=name_en,
        status=status,
        **values,
    )
