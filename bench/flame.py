"""Summarise a py-spy ``--format raw`` (collapsed stacks) profile: where the server's time
goes, inclusive and self, by function and by package.

    python -m bench.flame /tmp/profile.txt [--top 25] [--match medrelay_]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")

PACKAGES = (
    ("medrelay_server/store", "store (SQLAlchemy queries)"),
    ("medrelay_server/journal", "journal"),
    ("medrelay_server/delivery", "delivery fan-out"),
    ("medrelay_server/gateway", "gateway"),
    ("medrelay_server/handlers", "handlers"),
    ("medrelay_server", "server (other)"),
    ("medrelay_protocol", "protocol (codec, crypto, roster)"),
    ("sqlalchemy", "SQLAlchemy"),
    ("aiosqlite", "aiosqlite"),
    ("asyncpg", "asyncpg"),
    ("websockets", "websockets"),
    ("uvicorn", "uvicorn"),
    ("starlette", "starlette"),
    ("nacl", "PyNaCl"),
    ("msgpack", "msgpack"),
    ("asyncio", "asyncio"),
    ("logging", "logging"),
    ("prometheus_client", "prometheus_client"),
)


STAGES = (
    ("receipts (handle_receipt)", "handle_receipt ("),
    ("sends (handle_send)", "_store_and_fan_out ("),
    ("  membership read (require_member)", "require_member ("),
    ("  envelope signature check", "_checked_envelope ("),
    ("  store append / group commit", "GroupCommitter._run ("),
    ("  publish to the broker + local fan-out", "Delivery.publish ("),
    ("fan-out to connections (Delivery._process)", "Delivery._process ("),
    ("socket writes (Connection._drain)", "Connection._drain ("),
    ("frame reads (uvicorn/websockets)", "_receive_frame ("),
    ("frame decode (codec.decode)", "decode (medrelay_protocol/codec.py"),
    ("handshakes (_handshake)", "_handshake ("),
    ("audit chain (ChainWriter)", "ChainWriter."),
    ("SQLAlchemy, anywhere", "sqlalchemy/"),
    ("asyncpg, anywhere", "asyncpg/"),
    ("aiosqlite, anywhere", "aiosqlite/"),
)


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "/protocol/", "/server/", "/clients/python/", "lib/python"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({file})"


def package(frame: str) -> str:
    for needle, label in PACKAGES:
        if needle in frame:
            return label
    return "other"


def summarise(path: Path, *, top: int = 25, match: str = "") -> str:
    stacks = parse(path)
    total = sum(c for _, c in stacks) or 1
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    pkg_incl: Counter[str] = Counter()
    idle = 0
    for frames, count in stacks:
        leaf = frames[-1]
        if (
            "select (selectors.py" in leaf
            or "epoll" in leaf
            or ("_run_once" in leaf and len(frames) < 4)
        ):
            idle += count
        self_time[short(leaf)] += count
        by_pkg[package(leaf)] += count
        for f in {short(f) for f in frames}:
            inclusive[f] += count
        for p in {package(f) for f in frames}:
            pkg_incl[p] += count
    lines = [f"{total} samples ({idle / total:.0%} idle in the event loop's select)"]
    lines.append("\nserver stages (inclusive share of the samples):")
    for label, needle in STAGES:
        c = sum(count for frames, count in stacks if any(needle in f for f in frames))
        if c:
            lines.append(f"  {c / total:6.1%}  {label}")
    lines.append("\nself time by package:")
    for pkg, c in by_pkg.most_common():
        lines.append(f"  {c / total:6.1%}  {pkg}")
    lines.append("\ninclusive time by package (a sample counts for every package on its stack):")
    for pkg, c in pkg_incl.most_common():
        lines.append(f"  {c / total:6.1%}  {pkg}")
    lines.append("\ninclusive time by function:")
    shown = 0
    for f, c in inclusive.most_common():
        if match and match not in f:
            continue
        lines.append(f"  {c / total:6.1%}  {f}")
        shown += 1
        if shown >= top:
            break
    lines.append("\nself time by function:")
    for f, c in self_time.most_common(top):
        lines.append(f"  {c / total:6.1%}  {f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="")
    args = parser.parse_args()
    print(summarise(args.path, top=args.top, match=args.match))


if __name__ == "__main__":
    main()
