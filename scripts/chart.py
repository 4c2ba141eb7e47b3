#!/usr/bin/env python3
"""The chart's checks (`make chart`), and its renderer for the install test.

Run with the chart venv's python (scripts/install-test-deps.sh makes it; `make chart` finds it):
Helm's own Go SDK through PyPI helm-python-sdk (no helm binary is installable here) lints and
renders; PyPI kubernetes-validate checks every rendered object against the Kubernetes OpenAPI
schemas of the oldest and newest releases the chart supports.

  chart.py check                       lint; render defaults and ci/values-full.yaml; validate;
                                       bad values refused; CRDs match `make crds`; promtool
  chart.py render NAME NS [VALUES.yaml] [--set-json JSON]
                                       print the manifests (CRDs first), as `helm template
                                       --include-crds` would
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "pgpilot"
# The Kubernetes releases whose schemas the rendered objects must satisfy (Chart.yaml's
# kubeVersion is the floor).
KUBE_VERSIONS = ["1.27", "1.32"]
# Kinds served by CRDs, which the Kubernetes schemas do not know: checked by their own tools
# (promtool for the PrometheusRule) or by the CRDs' schemas when applied (install test).
CUSTOM_GROUPS = ("monitoring.coreos.com/", "pgpilot.io/")


def render(name, namespace, values, crds=True):
    """Documents of the chart rendered with `values`, CRDs first."""
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values=values, name=name, namespace=namespace, is_install=True)
    docs = []
    if crds:
        for crd in sorted((CHART / "crds").glob("*.yaml")):
            docs.extend(d for d in yaml.safe_load_all(crd.read_text()) if d)
    for path in sorted(out):
        if not path.endswith((".yaml", ".yml")) or "/NOTES" in path:
            continue
        docs.extend(d for d in yaml.safe_load_all(out[path]) if d)
    return docs


def fail(msg):
    print(f"chart: {msg}", file=sys.stderr)
    sys.exit(1)


def validate(docs, label):
    kinds = {}
    for d in docs:
        api = d.get("apiVersion", "")
        kind = d.get("kind", "?")
        kinds[kind] = kinds.get(kind, 0) + 1
        if api.startswith(CUSTOM_GROUPS):
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                name = d.get("metadata", {}).get("name")
                fail(f"{label}: {kind}/{name} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"chart: {label}: {len(docs)} objects valid for Kubernetes {' and '.join(KUBE_VERSIONS)} ({summary})")
    return kinds


def check():
    result = helm.lint(str(CHART), strict=True)
    # Severities as Helm's: 1 info, 2 warning, 3 error; --strict fails on warnings.
    problems = [m for m in result.get("messages") or [] if m.get("severity", 0) > 1]
    problems += result.get("errors") or []
    if problems:
        fail(f"helm lint --strict: {problems}")
    print(f"chart: helm lint --strict passed ({helm.helm_sdk_version()})")

    defaults = render("pgpilot", "pgpilot-system", {})
    kinds = validate(defaults, "default values")
    for want in ["CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"]:
        if want not in kinds:
            fail(f"default values render no {want}")
    for off in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"]:
        if off in kinds:
            fail(f"default values render a {off}: it must stay off unless asked for (or its CRDs exist)")

    full_values = yaml.safe_load((CHART / "ci" / "values-full.yaml").read_text())
    full = render("db", "databases", full_values)
    kinds = validate(full, "every option set (ci/values-full.yaml)")
    for want in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy", "Role", "RoleBinding", "ConfigMap"]:
        if want not in kinds:
            fail(f"ci/values-full.yaml renders no {want}")
    rule = next(d for d in full if d["kind"] == "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    if len(rule["spec"]["groups"]) != len(alerts["groups"]):
        fail("the PrometheusRule does not carry every group of files/alerts.yaml")
    base = full_values["monitoring"]["prometheusRule"]["runbookBaseUrl"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            if not r["annotations"]["runbook_url"].startswith(base + "#"):
                fail(f"alert {r['alert']}: runbook_url {r['annotations']['runbook_url']} is not under {base}")

    # Every alert's runbook is a section of the user guide.
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    headings = {line[4:].strip().lower() for line in guide.splitlines() if line.startswith("### ")}
    for group in alerts["groups"]:
        for r in group["rules"]:
            anchor = r["annotations"]["runbook_url"].rsplit("#", 1)[-1]
            if anchor != r["alert"].lower() or anchor not in headings:
                fail(f"alert {r['alert']}: no '### {r['alert']}' runbook section in docs/user-guide.md for #{anchor}")
    print(f"chart: every alert has its runbook section in docs/user-guide.md ({sum(len(g['rules']) for g in alerts['groups'])} alerts)")

    # Bad values fail at install, naming the field.
    for bad, field in [
        ({"operator": {"replicas": "two"}}, "replicas"),
        ({"operator": {"replica": 2}}, "replica"),
        ({"agent": {"allowNetworks": ["10.0.0.0"]}}, "allowNetworks"),
        ({"monitoring": {"podMonitor": {"enabled": "yes"}}}, "enabled"),
    ]:
        try:
            render("pgpilot", "pgpilot-system", bad, crds=False)
        except helm.HelmError as e:
            if field not in str(e):
                fail(f"values {bad} refused without naming {field}: {e}")
            continue
        fail(f"values {bad} were accepted")
    print("chart: bad values are refused with the field named (4 cases)")

    # The CRDs in the chart are the ones the code generates (`make crds`).
    operator = ROOT / "target" / "debug" / "pgpilot-operator"
    if operator.exists():
        generated = subprocess.run([str(operator), "crds"], check=True, capture_output=True, text=True).stdout
        committed = [d for f in sorted((CHART / "crds").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
        fresh = [d for d in yaml.safe_load_all(generated) if d]
        key = lambda d: d["metadata"]["name"]
        if sorted(committed, key=key) != sorted(fresh, key=key):
            fail("charts/pgpilot/crds is stale: run `make crds`")
        print("chart: crds/ matches `pgpilot-operator crds`")

    promtool = shutil.which("promtool")  # scripts/chart.sh puts the tools dir's bin on PATH
    if not promtool:
        fail("promtool not found: run scripts/install-test-deps.sh (make test does)")
    for args in (["check", "rules", str(CHART / "files" / "alerts.yaml")], ["test", "rules", str(CHART / "ci" / "alerts-test.yaml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"promtool {' '.join(args[:2])}: {r.stdout}{r.stderr}")
    print("chart: promtool check rules and test rules passed")


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "check":
        check()
    elif len(sys.argv) >= 4 and sys.argv[1] == "render":
        name, namespace = sys.argv[2], sys.argv[3]
        values = {}
        rest = sys.argv[4:]
        while rest:
            arg = rest.pop(0)
            if arg == "--set-json":
                extra = json.loads(rest.pop(0))
                values = merge(values, extra)
            else:
                values = merge(values, yaml.safe_load(Path(arg).read_text()) or {})
        docs = render(name, namespace, values)
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


def merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


if __name__ == "__main__":
    main()
