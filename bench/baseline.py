"""The "before" of a before/after run: meshnode's source at a git revision, unpacked beside today's.

It owns three things: which revision the baseline is (`--baseline REV`, else the one recorded in
`bench/baseline.rev`, `none` to skip), unpacking that revision's tree into a scratch folder with
`git archive` (no worktree is registered, so nothing is left in `.git` if the run is killed), and
making the tree runnable with the venv of this checkout (the generated gRPC modules, when the
revision did not commit them). It starts nothing: `bench.targets` starts a node from the folder
with `PYTHONPATH` pointing at it, and `bench.run` removes the scratch folder on exit, error or
Ctrl-C. Without git, or outside a git checkout (an sdist), or with an unknown revision, it raises
`BaselineUnavailable` with a sentence that says so, and the run measures today's code alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REV_FILE = Path(__file__).resolve().parent / "baseline.rev"
# What `git rev-parse` accepts that we pass on: names, hashes, `HEAD~3`, `main^`, `v1.2`.
_REV = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/~^@{}-]*$")
_GENERATED = Path("meshnode") / "rpc" / "generated" / "mesh_pb2.py"


class BaselineUnavailable(RuntimeError):
    """The baseline revision cannot be unpacked here (no git, not a checkout, unknown revision)."""


@dataclass(frozen=True)
class BaselineSource:
    rev: str  # as asked for: "0c3eb37", "main~2"
    commit: str  # the full hash it resolved to
    short: str  # the abbreviated hash, for the target's name
    path: Path  # the unpacked tree: PYTHONPATH for the baseline node

    @property
    def target_name(self) -> str:
        return f"meshnode@{self.short}"


def parse_rev_file(text: str) -> str | None:
    """The revision recorded in a rev file: its first line that is neither blank nor a comment.

    `none` (any case) means "no baseline". Raises ValueError for text that is not a revision.
    """
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            return parse_rev_arg(line)
    return None


def parse_rev_arg(value: str) -> str | None:
    """`--baseline` as given: a revision, or None for `none`/`off`/empty. ValueError otherwise."""
    rev = value.strip()
    if rev.lower() in ("", "none", "off"):
        return None
    if not _REV.match(rev) or ".." in rev:
        raise ValueError(f"not a git revision: {value!r}")
    return rev


def default_rev(rev_file: Path = REV_FILE) -> str | None:
    """The revision recorded in `bench/baseline.rev`; None when the file is absent or says none."""
    try:
        text = rev_file.read_text()
    except FileNotFoundError:
        return None
    return parse_rev_file(text)


def _git(repo: Path, *args: str, timeout_s: float = 60.0) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except FileNotFoundError as exc:
        raise BaselineUnavailable("git is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise BaselineUnavailable(f"git {args[0]} took over {timeout_s:.0f}s") from exc
    if done.returncode != 0:
        raise BaselineUnavailable(f"git {' '.join(args)}: {done.stderr.strip()[:300]}")
    return done.stdout.strip()


def resolve(repo: Path, rev: str) -> tuple[str, str]:
    """(full hash, short hash) of `rev` in the checkout at `repo`."""
    try:
        _git(repo, "rev-parse", "--git-dir")
    except BaselineUnavailable as exc:
        raise BaselineUnavailable(f"{repo} is not a git checkout ({exc})") from exc
    try:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BaselineUnavailable as exc:
        raise BaselineUnavailable(f"revision {rev!r} is not in this checkout") from exc
    return commit, _git(repo, "rev-parse", "--short", commit)


def unpack(repo: Path, rev: str, into: Path) -> BaselineSource:
    """Unpack the tree of `rev` into the empty or missing folder `into`; ready to run."""
    commit, short = resolve(repo, rev)
    into.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=repo,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    except FileNotFoundError as exc:
        raise BaselineUnavailable("git is not installed") from exc
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
            archive.extractall(into, filter="data")
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait(timeout=60)
    if rc != 0:
        raise BaselineUnavailable(f"git archive {short}: {stderr.strip()[:300]}")
    if not (into / "meshnode" / "__init__.py").exists():
        raise BaselineUnavailable(f"{short} has no meshnode package")
    prepare(into)
    return BaselineSource(rev, commit, short, into)


def prepare(tree: Path) -> None:
    """Build what a checkout needs before it runs: today only the generated gRPC modules.

    They are committed (so this is a no-op for every revision so far); a revision that did not
    commit them gets them from its own `meshnode.rpc.build_proto` with this venv's grpcio-tools.
    """
    if (tree / _GENERATED).exists():
        return
    if not (tree / "meshnode" / "rpc" / "build_proto.py").exists():
        return
    done = subprocess.run([sys.executable, "-m", "meshnode.rpc.build_proto"], cwd=tree,
                          env=_pythonpath_env(tree), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if done.returncode != 0 or not (tree / _GENERATED).exists():
        raise BaselineUnavailable(
            f"could not generate the gRPC modules for the baseline: {done.stderr.strip()[-300:]}"
        )


def _pythonpath_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}
