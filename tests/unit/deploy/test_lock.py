"""The lock files (requirements/lock*.txt) pin everything pyproject.toml asks for, and no torch.

A dependency added to pyproject.toml without `make lock` fails here, not on a new machine.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]


def _pins(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements" / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # one exact pin per line
        assert spec.operator == "==", line
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def _wanted(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize(("lock", "extras"), [("lock.txt", ("local",)),
                                              ("lock-dev.txt", ("local", "dev"))])
def test_lock_pins_every_requirement(lock: str, extras: tuple[str, ...]) -> None:
    pins = _pins(lock)
    for req in _wanted(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in {lock}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {name}=={pins[name]}, pyproject.toml asks {req.specifier}")
    # the build for the box is chosen by requirements/install-torch.sh, never by the lock
    assert not {"torch", "triton"} & set(pins)
    assert not any(name.startswith("nvidia-") for name in pins)


def test_dev_lock_agrees_with_runtime_lock() -> None:
    runtime, dev = _pins("lock.txt"), _pins("lock-dev.txt")
    assert {name: dev[name] for name in runtime} == runtime
