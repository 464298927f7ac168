"""OpenAI message content as plain text, for upstreams (or places) that take text only.

Shared by the adapters that translate OpenAI chat bodies into another vendor's shape.
"""

from __future__ import annotations

from typing import Any

from meshnode.errors import InvalidRequest


def content_text(content: Any, where: str) -> str:
    """The text of an OpenAI message content: a string, or a list of text parts. Any other part
    (an image, audio) is the client's error here: `InvalidRequest` naming the part."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    "only text parts are allowed here", param=f"{where}.content[{j}]"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise InvalidRequest("content must be a string or a list of parts", param=f"{where}.content")
