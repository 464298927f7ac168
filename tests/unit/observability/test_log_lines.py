"""Foreign lines made readable: aiohttp's traceback for a gRPC client on the HTTP port becomes
one warning a minute per client; a seed's join failure is explained in words."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import BadHttpMessage

from meshnode.mesh.seeds import diagnose
from meshnode.observability.logging import ProtocolMismatchFilter


def _record(exc: BaseException, peer: str = "10.0.0.7") -> logging.LogRecord:
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                             "Error handling request from %s", (peer,), (type(exc), exc, None))


def test_grpc_preface_is_one_warning_a_minute_per_client() -> None:
    now = [100.0]
    f = ProtocolMismatchFilter(clock=lambda: now[0])
    preface = BadHttpMessage("Pause on PRI/Upgrade:\n\n    b'\\x00\\x00\\x12\\x04'")
    first = _record(preface)
    assert f.filter(first) is True
    assert first.levelno == logging.WARNING and first.exc_info is None
    assert "gRPC (HTTP/2) client at 10.0.0.7 called the HTTP API port" in first.getMessage()
    assert f.filter(_record(preface)) is False  # the joiner knocks again: not logged
    assert f.filter(_record(preface, "10.0.0.8")) is True  # another client is
    now[0] += 61
    assert f.filter(_record(preface)) is True  # a minute later, once more


def test_other_records_pass_untouched() -> None:
    f = ProtocolMismatchFilter()
    other = _record(BadHttpMessage("Invalid method encountered"))
    assert f.filter(other) is True and other.levelno == logging.ERROR
    assert other.exc_info is not None
    plain = logging.LogRecord("aiohttp.server", logging.INFO, __file__, 1, "hello", (), None)
    assert f.filter(plain) is True and plain.getMessage() == "hello"


def test_join_failures_are_explained() -> None:
    a = "10.0.0.2:50051"
    assert "refused us: mesh authentication failed" in diagnose(
        a, f"{a}: UNAUTHENTICATED: mesh authentication failed")
    assert "speaks HTTP/1.1, not gRPC" in diagnose(
        a, f"{a}: UNAVAILABLE: Trying to connect an http1.x server")
    assert "nothing answers gRPC at" in diagnose(
        a, f"{a}: UNAVAILABLE: failed to connect to all addresses")
    assert "did not answer in time" in diagnose(a, f"{a}: DEADLINE_EXCEEDED: Deadline Exceeded")
    assert diagnose(a, None) == f"{a} did not answer"
