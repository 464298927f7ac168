"""`bench.baseline`: which revision the "before" node runs and unpacking it with `git archive`,
against a throwaway git repository (real git, no node)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench import baseline
from bench.baseline import BaselineUnavailable, default_rev, parse_rev_arg, parse_rev_file, unpack

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def test_the_rev_file_gives_its_first_revision_line() -> None:
    assert parse_rev_file("# the baseline\n\n  0c3eb37   # before issue 20\nabc1234\n") == "0c3eb37"
    assert parse_rev_file("# nothing here\n\n") is None
    assert parse_rev_file("none\n") is None
    with pytest.raises(ValueError, match="not a git revision"):
        parse_rev_file("0c3eb37; rm -rf /\n")


def test_the_baseline_argument() -> None:
    assert parse_rev_arg("0c3eb37") == "0c3eb37"
    assert parse_rev_arg(" main~2 ") == "main~2"
    assert parse_rev_arg("v1.2^") == "v1.2^"
    for off in ("none", "NONE", "off", ""):
        assert parse_rev_arg(off) is None
    for bad in ("--output=/tmp/x", "-n", "a..b", "a b", "rev;ls"):
        with pytest.raises(ValueError):
            parse_rev_arg(bad)


def test_the_committed_rev_file_names_a_revision(tmp_path: Path) -> None:
    assert default_rev() == "0c3eb37"
    assert default_rev(tmp_path / "missing.rev") is None
    (tmp_path / "off.rev").write_text("# skipped\nnone\n")
    assert default_rev(tmp_path / "off.rev") is None


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "meshnode" / "rpc" / "generated").mkdir(parents=True)
    (root / "meshnode" / "__init__.py").write_text("VERSION = 1\n")
    (root / "meshnode" / "rpc" / "generated" / "mesh_pb2.py").write_text("# generated\n")
    _git(root.parent, "init", "-q", str(root))
    _git(root, "add", ".")
    _git(root, "-c", "user.name=b", "-c", "user.email=b@example.invalid", "commit", "-qm", "one")
    (root / "meshnode" / "__init__.py").write_text("VERSION = 2\n")
    _git(root, "-c", "user.name=b", "-c", "user.email=b@example.invalid", "commit", "-qam", "two")
    return root


@needs_git
def test_unpack_gives_the_tree_of_that_revision_not_of_the_checkout(
    repo: Path, tmp_path: Path
) -> None:
    (repo / "meshnode" / "__init__.py").write_text("VERSION = 3  # uncommitted\n")
    source = unpack(repo, "HEAD~1", tmp_path / "out")
    assert (source.path / "meshnode" / "__init__.py").read_text() == "VERSION = 1\n"
    assert source.commit == _git(repo, "rev-parse", "HEAD~1")
    assert source.target_name == f"meshnode@{_git(repo, 'rev-parse', '--short', 'HEAD~1')}"
    # Nothing registered in the repository: no worktree to clean up after a killed run.
    assert _git(repo, "worktree", "list").count("\n") == 0


@needs_git
def test_an_unknown_revision_or_no_checkout_says_so(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(BaselineUnavailable, match="'feedbee' is not in this checkout"):
        unpack(repo, "feedbee", tmp_path / "out")
    plain = tmp_path / "sdist"
    plain.mkdir()
    with pytest.raises(BaselineUnavailable, match="is not a git checkout"):
        unpack(plain, "HEAD", tmp_path / "out2")


def test_no_git_at_all_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    with pytest.raises(BaselineUnavailable, match="git is not installed"):
        baseline.resolve(tmp_path, "HEAD")


@needs_git
def test_a_revision_without_generated_grpc_code_gets_it_built(repo: Path, tmp_path: Path) -> None:
    (repo / "meshnode" / "rpc" / "build_proto.py").write_text(
        "from pathlib import Path\n"
        "out = Path('meshnode/rpc/generated')\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'mesh_pb2.py').write_text('# built\\n')\n"
    )
    _git(repo, "rm", "-q", "meshnode/rpc/generated/mesh_pb2.py")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=b", "-c", "user.email=b@example.invalid", "commit", "-qm", "three")
    source = unpack(repo, "HEAD", tmp_path / "out")
    assert (source.path / "meshnode" / "rpc" / "generated" / "mesh_pb2.py").read_text() == (
        "# built\n"
    )
