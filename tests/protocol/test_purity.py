"""The protocol package is sans-I/O: importing it loads no event loop, web, broker or DB code."""

import subprocess
import sys

FORBIDDEN = ("asyncio", "starlette", "uvicorn", "websockets", "redis", "sqlalchemy", "socket")

PROBE = """
import sys, pkgutil, importlib
import medrelay_protocol
for m in pkgutil.iter_modules(medrelay_protocol.__path__):
    importlib.import_module("medrelay_protocol." + m.name)
print(",".join(sorted(k for k in sys.modules)))
"""


def test_protocol_imports_no_io_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(out.strip().split(","))
    assert "medrelay_protocol.codec" in loaded  # the probe really imported the package
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert bad == []
