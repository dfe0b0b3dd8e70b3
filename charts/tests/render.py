#!/usr/bin/env python3
"""Render charts/fsm with the real Helm engine (helm-python-sdk, Helm v4 as a library) and write
the manifests to stdout as one multi-document YAML stream, in Helm's install order (ServiceAccounts
and RBAC first, the MeshConfig last), ready for `kubectl apply -f -` or a test API server.

    render.py VALUES [--namespace NS] [--name RELEASE] [--set KEY=VALUE ...] [--include-crds]

VALUES is a values YAML file, `-` for a values document on stdin, or `none` for the chart's
defaults. The namespace defaults to `fsm-system` and the release name to `fsm` (FSM names the
release after the mesh). `--include-crds` puts charts/fsm/crds first, as `helm install` does.
A value the chart refuses (e.g. fsm.certificateProvider.kind=bogus) exits 1 with Helm's message on
stderr.

`make chart-deps` installs helm-python-sdk and PyYAML into the repository's .venv; started with
another Python, this script re-runs itself with .venv/bin/python.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fsm"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

try:
    import helm_python
    import yaml
except ImportError:
    # (.venv/bin/python may be a symlink to this very interpreter: compare the prefixes.)
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parents[1].resolve():
        # The script that was run (render.py, or test_chart.py importing it), again.
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    sys.exit("render.py needs helm-python-sdk and PyYAML: run `make chart-deps` (installs them into .venv)")

# Helm's install order (pkg/release/util/kind_sorter.go InstallOrder); other kinds come after.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`, maps recursively (as Helm merges -f and --set)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def split_documents(text: str) -> list[str]:
    """The YAML documents of a rendered template, without the ones that hold only comments."""
    docs, current = [], []
    for line in text.splitlines():
        if line.rstrip() == "---":
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return [d.strip("\n") for d in docs if yaml.safe_load(d) is not None]


def render(values: dict | None = None, namespace: str = "fsm-system", name: str = "fsm",
           include_crds: bool = False) -> list[tuple[dict, str]]:
    """(object, manifest text) of every object the chart renders, in install order.

    Raises helm_python.HelmRenderError (the template's `fail` message) for refused values."""
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
        crds = chart.crds if include_crds else []
    documents = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        documents.extend(split_documents(rendered[path]))
    objects = [(yaml.safe_load(doc), doc) for doc in documents]
    rank = {kind: i for i, kind in enumerate(INSTALL_ORDER)}
    # sorted() is stable: within a kind, the order of the templates stays.
    objects.sort(key=lambda o: rank.get(o[0].get("kind"), len(rank)))
    # Helm installs crds/ before any template.
    definitions = []
    for crd in sorted(crds, key=lambda c: c["name"]):
        data = crd["data"]
        definitions.extend(split_documents(data if isinstance(data, str) else bytes(data).decode()))
    return [(yaml.safe_load(doc), doc) for doc in definitions] + objects


def load_values(source: str, sets: list[str]) -> dict:
    if source == "none":
        values: dict = {}
    elif source == "-":
        values = yaml.safe_load(sys.stdin.read()) or {}
    else:
        values = yaml.safe_load(Path(source).read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"{source}: a values document must be a mapping")
    for expression in sets:
        values = deep_merge(values, helm_python.parse_set_string(expression))
    return values


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("values", help="values YAML file, '-' for stdin, or 'none' for the defaults")
    parser.add_argument("--namespace", default="fsm-system", help="release namespace (default fsm-system)")
    parser.add_argument("--name", default="fsm", help="release name (default fsm)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Helm --set expression; may repeat")
    parser.add_argument("--include-crds", action="store_true", help="put the chart's CRDs first")
    args = parser.parse_args(argv)
    values = load_values(args.values, args.set)
    try:
        objects = render(values, namespace=args.namespace, name=args.name, include_crds=args.include_crds)
    except helm_python.HelmError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"---\n{text}\n" for _, text in objects))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
