"""Moved: `tests.kit.openai_schemas` is the one schema kit (this name is kept until the tests
that import it are switched, later in this branch)."""

from tests.kit.openai_schemas import validate

__all__ = ["validate"]
