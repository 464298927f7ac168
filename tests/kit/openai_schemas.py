"""OpenAI's published response schemas, to validate what meshnode answers.

    from tests.kit.openai_schemas import validate
    validate("CreateChatCompletionResponse", body)        # raises jsonschema.ValidationError

`openai_schemas.json` beside this file is a verbatim copy of the component schemas named in
`ROOTS` and every schema they reference, taken from OpenAI's OpenAPI description
(github.com/openai/openai-openapi at commit f85dbe223d40e1a31cba812ab2d755c7e98a92a3,
2026-08-21, MIT licence; the copy in this workspace is ../shared/openapi/openai-openapi.json).
Regenerate it with `python -m tests.kit.openai_schemas PATH/openai-openapi.json`.

The description is OpenAPI 3.1 (JSON Schema 2020-12) with a few leftover `nullable: true`; they
are read here as "or null" when the validator is built, so the fixture itself stays a copy.
"""

from __future__ import annotations

import copy
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).with_name("openai_schemas.json")
SOURCE = ("openai/openai-openapi@f85dbe223d40e1a31cba812ab2d755c7e98a92a3 "
          "(openapi.yaml, 2026-08-21), components.schemas")
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ErrorResponse",
    "ListModelsResponse",
    "Model",
    "DeleteModelResponse",
    "Response",  # the Responses API: the response object
    "ResponseStreamEvent",  # ... and every event of its stream
)
_PREFIX = "#/components/schemas/"


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_PREFIX):
            found.add(ref[len(_PREFIX):])
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def extract(openapi: dict[str, Any]) -> dict[str, Any]:
    """ROOTS and everything they reference, from a full OpenAPI document."""
    schemas = openapi["components"]["schemas"]
    wanted: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted[name] = schemas[name]
        todo.extend(sorted(_refs(schemas[name]) - set(wanted)))
    return {"source": SOURCE, "schemas": dict(sorted(wanted.items()))}


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema's "or null"."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _validator(name: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = json.loads(FIXTURE.read_text(encoding="utf-8"))
    root = {"components": {"schemas": _nullable(copy.deepcopy(doc["schemas"]))}}
    resource = Resource.from_contents(root, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openai", resource)
    schema = {"$ref": f"urn:openai{_PREFIX}{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


@cache
def _event_schemas() -> dict[str, str]:
    """`ResponseStreamEvent` member schema by event type (`response.completed` -> ...)."""
    schemas = json.loads(FIXTURE.read_text(encoding="utf-8"))["schemas"]
    out = {}
    for member in schemas["ResponseStreamEvent"]["anyOf"]:
        name = member["$ref"][len(_PREFIX):]
        for kind in schemas[name].get("properties", {}).get("type", {}).get("enum", ()):
            out[kind] = name
    return out


def validate(name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError unless `instance` is a valid `name`. A Responses stream
    event is checked against its own event schema first (a readable error: the union's says
    only "not valid under any"), then against the `ResponseStreamEvent` union."""
    if name == "ResponseStreamEvent" and isinstance(instance, dict):
        import jsonschema

        member = _event_schemas().get(str(instance.get("type")))
        if member is None:
            raise jsonschema.ValidationError(f"no stream event type {instance.get('type')!r}")
        _validator(member).validate(instance)
    _validator(name).validate(instance)


if __name__ == "__main__":
    source = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    FIXTURE.write_text(json.dumps(extract(source), indent=1, sort_keys=False) + "\n",
                       encoding="utf-8")
    print(f"wrote {FIXTURE}")
