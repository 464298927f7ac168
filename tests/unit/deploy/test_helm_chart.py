"""The Helm chart (deploy/helm/meshnode) renders, for its default values, exactly the plain
manifests (deploy/k8s/meshnode.yaml), object for object.

The `helm` binary is not installable here (not in Debian's, PyPI's or npm's archives), so this is
the YAML-level check: the templates are rendered by the small renderer below, which knows only
what the chart uses (`.Values` lookups, `| nindent N`, `toYaml`, whitespace trimming) and fails
on any other action, so the chart cannot grow a construct this check would misread. Where
`helm` is on PATH the chart is also rendered with `helm template` and compared the same way.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "meshnode"
PLAIN = ROOT / "deploy" / "k8s" / "meshnode.yaml"
_ACTION = re.compile(r"(\s*)\{\{(-?)\s*(.*?)\s*(-?)\}\}(\s*)", re.S)
_LOOKUP = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)$")


def _lookup(values: dict[str, Any], expr: str) -> Any:
    match = _LOOKUP.fullmatch(expr.strip())
    assert match, f"the chart uses a template action this check does not know: {expr!r}"
    value: Any = values
    for part in match.group(1).strip(".").split("."):
        value = value[part]
    return value


def _evaluate(values: dict[str, Any], expr: str) -> str:
    pipeline = [p.strip() for p in expr.split("|")]
    head, filters = pipeline[0], pipeline[1:]
    if head.startswith("toYaml "):
        text = yaml.safe_dump(_lookup(values, head[len("toYaml "):]), default_flow_style=False,
                              sort_keys=True).rstrip("\n")
    else:
        value = _lookup(values, head)
        text = value if isinstance(value, str) else yaml.safe_dump(value).strip().removesuffix(
            "...").strip()
    for f in filters:
        name, _, arg = f.partition(" ")
        assert name == "nindent", f"unknown template function {name!r}"
        pad = " " * int(arg)
        text = "\n" + "\n".join(pad + line for line in text.split("\n"))
    return text


def render(template: str, values: dict[str, Any]) -> str:
    def action(m: re.Match[str]) -> str:
        before, trim_left, expr, trim_right, after = m.groups()
        return ("" if trim_left else before) + _evaluate(values, expr) + (
            "" if trim_right else after)

    return _ACTION.sub(action, template)


def _objects(text: str) -> dict[str, Any]:
    return {f"{d['kind']}/{d['metadata']['name']}": d
            for d in yaml.safe_load_all(text) if d}


def rendered_chart() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for template in sorted((CHART / "templates").glob("*.yaml")):
        out.update(_objects(render(template.read_text(encoding="utf-8"), values)))
    return out


def test_default_values_render_the_plain_manifests() -> None:
    plain = _objects(PLAIN.read_text(encoding="utf-8"))
    chart = rendered_chart()
    assert sorted(chart) == sorted(plain)
    for name, obj in plain.items():
        assert chart[name] == obj, name


def test_values_change_what_they_name() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    values.update(replicas=5, storage="20Gi", image={"repository": "r.example/meshnode",
                                                      "tag": "cuda", "pullPolicy": "Always"})
    values["resources"]["limits"]["nvidia.com/gpu"] = 1
    text = render((CHART / "templates" / "statefulset.yaml").read_text(encoding="utf-8"), values)
    sts = _objects(text)["StatefulSet/meshnode"]
    assert sts["spec"]["replicas"] == 5
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "r.example/meshnode:cuda"
    assert container["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": 1}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "20Gi"}


def test_the_renderer_refuses_what_it_does_not_know() -> None:
    with pytest.raises(AssertionError, match="does not know"):
        render("x: {{ .Release.Name }}", {})
    with pytest.raises(AssertionError, match="unknown template function"):
        render("x: {{ .Values.a | upper }}", {"a": "b"})


@pytest.mark.skipif(shutil.which("helm") is None, reason="the helm binary is not installed")
def test_helm_template_renders_the_plain_manifests() -> None:
    done = subprocess.run(["helm", "template", "meshnode", str(CHART)], capture_output=True,
                          text=True, timeout=60, check=True)
    assert _objects(done.stdout) == _objects(PLAIN.read_text(encoding="utf-8"))


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2" and chart["name"] == "meshnode"
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None and chart["appVersion"] == version.group(1)
