"""openai-node (the official JavaScript client) for tests that drive a node with it.

    folder = openai_node_folder(request, tmp_path_factory)   # in a module-scoped fixture
    (folder / "check.mjs").write_text("import OpenAI from 'openai'; ...")
    subprocess.run(["node", str(folder / "check.mjs")], ...)

`npm install openai@<OPENAI_NODE>` runs once per checkout into pytest's cache (`.pytest_cache/`,
git-ignored; a temporary folder when the cache plugin is off). Without node or npm, or when npm
cannot install (no registry), the test is skipped and the reason says which.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

OPENAI_NODE = "openai@7.59.0"


def kept_dir(request: pytest.FixtureRequest, factory: pytest.TempPathFactory,
             name: str) -> Path:
    """A directory that outlives the session (pytest's cache), or a temporary one when the
    cache plugin is off (`-p no:cacheprovider`)."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir(name)) if cache is not None else factory.mktemp(name)


def openai_node_folder(request: pytest.FixtureRequest,
                       factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "openai-node test needs node and npm on PATH (missing: " + ", ".join(
            name for name, path in (("node", node), ("npm", npm)) if path is None) + ")"
        print(reason)
        pytest.skip(reason)
    folder = kept_dir(request, factory, "openai-node")
    if not (folder / "node_modules" / "openai" / "package.json").is_file():
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix",
                               str(folder), OPENAI_NODE], capture_output=True, text=True,
                              timeout=300, check=False)
        if done.returncode != 0:
            pytest.skip(f"npm install {OPENAI_NODE} failed (no registry?): "
                        f"{done.stderr.strip()[-300:]}")
    return folder
