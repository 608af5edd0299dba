"""A frame naming another protocol version gets UNSUPPORTED_VERSION, not a field error."""

import pytest
from medrelay_protocol import codec
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import UnsupportedVersion


@pytest.mark.parametrize("version", [0, 2, 99])
def test_other_version_refused_with_its_code(version: int) -> None:
    raw = pack_body({"t": "hello", "v": version, "rid": "1"})
    with pytest.raises(UnsupportedVersion) as info:
        codec.decode(raw)
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
