"""The HTTP front-end fixture of tests/unit/api, reused (one home for it)."""

from tests.unit.api.conftest import api_client

__all__ = ["api_client"]
