"""OpenAI's embedding answer options, for adapters that build the answer themselves (the local
worker, Cloudflare): `encoding_format` and `dimensions`.

OpenAI-compatible upstreams get both fields as the client sent them and answer them; an adapter
that builds its own answer must honour them the same way, or refuse: openai-node asks for
`base64` by default and decodes whatever string it gets, so floats sent to it become garbage
vectors with HTTP 200.
"""

from __future__ import annotations

import array
import base64
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class EmbeddingOptions:
    encoding_format: str  # "float" | "base64"
    dimensions: int | None  # None: the model's own width


def parse_embedding_options(body: dict[str, Any], *, model: str, width: int | None,
                            matryoshka: bool) -> EmbeddingOptions:
    """`encoding_format` and `dimensions` of an embeddings body, for a model whose vectors are
    `width` wide (None: unknown). `dimensions` is honoured only by a model declared `matryoshka`
    (trained so a prefix of its vector is itself an embedding); elsewhere it is a 400, as a
    silently full-width answer would break the caller's index."""
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'",
                             param="encoding_format", code="invalid_value")
    dimensions = body.get("dimensions")
    if dimensions is None:
        return EmbeddingOptions(encoding, None)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise InvalidRequest("dimensions must be a positive integer", param="dimensions",
                             code="invalid_value")
    if not matryoshka:
        wide = f": its embeddings are {width} wide and" if width else ", its embeddings"
        raise InvalidRequest(
            f"model {model!r} does not support 'dimensions'{wide} cannot be shortened "
            "(a local model trained for it can be declared `matryoshka: true`)",
            param="dimensions", code="invalid_value")
    if width is not None and dimensions > width:
        raise InvalidRequest(f"dimensions must be at most {width} for model {model!r}, "
                             f"got {dimensions}", param="dimensions", code="invalid_value")
    return EmbeddingOptions(encoding, None if dimensions == width else dimensions)


def encode_vectors(rows: Sequence[Sequence[float]], options: EmbeddingOptions) -> list[Any]:
    """Each vector as the client asked: a list of floats, or base64 of its little-endian
    float32 bytes (OpenAI's `base64`); cut to `dimensions` and renormalised when asked (the
    caller has checked the model allows it)."""
    out: list[Any] = []
    for row in rows:
        if options.encoding_format == "float" and options.dimensions is None:
            out.append(list(row))  # as computed (or as the upstream sent it)
            continue
        values = array.array("f", row)
        if options.dimensions is not None:
            head = values[:options.dimensions]
            norm = math.sqrt(sum(x * x for x in head)) or 1.0
            values = array.array("f", (x / norm for x in head))
        if options.encoding_format == "base64":
            if sys.byteorder == "big":
                values.byteswap()
            out.append(base64.b64encode(values.tobytes()).decode("ascii"))
        else:
            out.append(values.tolist())
    return out
