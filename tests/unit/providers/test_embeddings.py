"""encoding_format and dimensions for adapters that build embedding answers themselves."""

from __future__ import annotations

import base64
import math
import struct

import pytest

from meshnode.errors import InvalidRequest
from meshnode.providers.embeddings import (
    EmbeddingOptions,
    encode_vectors,
    parse_embedding_options,
)


def test_options() -> None:
    assert parse_embedding_options({}, model="m", width=384, matryoshka=False) == \
        EmbeddingOptions("float", None)
    assert parse_embedding_options({"encoding_format": "base64"}, model="m", width=384,
                                   matryoshka=False).encoding_format == "base64"
    with pytest.raises(InvalidRequest) as info:
        parse_embedding_options({"dimensions": 128}, model="minilm", width=384,
                                matryoshka=False)
    assert info.value.param == "dimensions" and "does not support" in info.value.message
    assert "384 wide" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        parse_embedding_options({"dimensions": 8}, model="bge", width=None, matryoshka=False)
    assert info.value.param == "dimensions" and "does not support" in info.value.message
    assert parse_embedding_options({"dimensions": 128}, model="m", width=384,
                                   matryoshka=True).dimensions == 128
    assert parse_embedding_options({"dimensions": 384}, model="m", width=384,
                                   matryoshka=True).dimensions is None
    for bad in ({"dimensions": 385}, {"dimensions": 0}, {"dimensions": True},
                {"encoding_format": "int8"}):
        with pytest.raises(InvalidRequest) as info:
            parse_embedding_options(bad, model="m", width=384, matryoshka=True)
        assert info.value.param in ("dimensions", "encoding_format")


def test_base64_is_little_endian_float32_and_floats_stay_as_given() -> None:
    rows = [[0.1, -2.5, 3.0], [1e-3, 0.0, 7.25]]
    assert encode_vectors(rows, EmbeddingOptions("float", None)) == rows
    encoded = encode_vectors(rows, EmbeddingOptions("base64", None))
    for text, row in zip(encoded, rows, strict=True):
        raw = base64.b64decode(text)
        assert raw == struct.pack("<3f", *row)


def test_dimensions_cut_and_renormalise() -> None:
    (cut,) = encode_vectors([[3.0, 4.0, 12.0]], EmbeddingOptions("float", 2))
    assert cut == pytest.approx([0.6, 0.8])
    assert math.isclose(math.hypot(*cut), 1.0, rel_tol=1e-6)
