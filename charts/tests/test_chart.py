#!/usr/bin/env python3
"""Tests of charts/fsm with the real Helm engine (helm-python-sdk: Helm v4 as a library, no helm
binary). Lints the chart, renders it with the defaults and with other values and checks the
objects: names and kinds, the binaries' flags and probes, the webhooks, the exact RBAC rules, the
MeshConfig against its CRD's schema, and that refused values fail with a message naming them.

Run with `make chart-test` (or `.venv/bin/python charts/tests/test_chart.py`). Prints each check
and `chart: N passed, M failed`; exits 1 when one failed.

With `--fsm PATH/TO/fsm`, every render is also done by `fsm install --dry-run` (the CLI's own
renderer of the chart it embeds), which must give the same objects in the same order, and every
refused value must be refused by it too with the same message (the integration test
`fsm_install` runs it so).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ beside the chart's tests
sys.path.insert(0, str(Path(__file__).resolve().parent))
import render  # noqa: E402  (re-runs this script with .venv/bin/python when the imports are missing)
from render import CHART, REPO  # noqa: E402
import observability  # noqa: E402

import helm_python  # noqa: E402
import yaml  # noqa: E402

CHECKS = []

# `fsm` binary whose `install --dry-run` must render like Helm (--fsm PATH); None: Helm only.
FSM_BIN = None


def check(function):
    CHECKS.append(function)
    return function


# === helpers ===


class Rendered:
    """The objects of one render, looked up by kind and name."""

    def __init__(self, values=None, namespace="fsm-system", name="fsm"):
        self.values = values or {}
        self.namespace = namespace
        self.items = render.render(values, namespace=namespace, name=name)
        self.objects = [obj for obj, _ in self.items]
        if FSM_BIN:
            out = fsm_dry_run(values, namespace, name)
            assert out.returncode == 0, f"fsm install --dry-run refused {values}: {out.stderr}"
            theirs = [o for o in yaml.safe_load_all(out.stdout) if o and o["kind"] != "CustomResourceDefinition"]
            assert len(theirs) == len(self.objects), \
                f"fsm renders {[(o['kind'], o['metadata']['name']) for o in theirs]}, Helm {self.names()}"
            for helm, fsm in zip(self.objects, theirs):
                assert helm == fsm, f"fsm install renders differently from Helm:\nHelm: {helm}\nfsm:  {fsm}"

    def get(self, kind, name):
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}: {self.names()}"
        return found[0]

    def text(self, kind, name):
        return next(t for o, t in self.items if o["kind"] == kind and o["metadata"]["name"] == name)

    def names(self):
        return sorted((o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in self.objects)

    def container(self, deployment):
        containers = self.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, f"{deployment}: expected one container"
        return containers[0]

    def args(self, deployment):
        """The container's --flag=value arguments as a dict (a bare --flag maps to True)."""
        parsed = {}
        for arg in self.container(deployment)["args"]:
            assert arg.startswith("--"), f"{deployment}: argument {arg!r} is not a --flag"
            flag, _, value = arg[2:].partition("=")
            assert flag not in parsed, f"{deployment}: --{flag} given twice"
            parsed[flag] = value if "=" in arg else True
        return parsed


def fsm_dry_run(values, namespace, name):
    """`fsm install --dry-run` with these values; the mesh name is the values' (the flag wins)."""
    import tempfile
    mesh = ((values or {}).get("fsm") or {}).get("meshName", name)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values or {}, f)
        f.flush()
        return subprocess.run([FSM_BIN, "install", "--dry-run", "-f", f.name, "--mesh-name", str(mesh),
                               "--fsm-namespace", namespace], capture_output=True, text=True, timeout=60)


def render_error(values, namespace="fsm-system"):
    try:
        render.render(values, namespace=namespace)
    except helm_python.HelmRenderError as e:
        message = str(e)
    else:
        raise AssertionError(f"rendering {values} should have failed")
    if FSM_BIN:
        out = fsm_dry_run(values, namespace, "fsm")
        assert out.returncode != 0, f"fsm install --dry-run accepted {values}"
        # Helm: `execution error at (fsm/templates/validate.yaml:1:4): <the chart's message>`.
        reason = message.split("): ", 1)[-1].strip()
        if "fsm.meshName" not in reason:  # the CLI checks --mesh-name itself, first
            assert reason in out.stderr, f"fsm install's refusal {out.stderr!r} lacks Helm's {reason!r}"
        else:
            assert "fsm.meshName" in out.stderr, out.stderr
    return message


def rules_of(role):
    """A role's rules as a set of (apiGroup, resource, verb, resourceName or None)."""
    flat = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        flat.add((group, resource, verb, name))
    return flat


def expand(*rules):
    """Expected rules written as (group, [resources], [verbs], [names] or None)."""
    flat = set()
    for group, resources, verbs, names in rules:
        for resource in resources:
            for verb in verbs:
                for name in names or [None]:
                    flat.add((group, resource, verb, name))
    return flat


WATCHED = [
    ("", ["namespaces", "services", "endpoints", "serviceaccounts"], ["list", "watch"], None),
    ("", ["pods"], ["get", "list", "watch"], None),
    ("discovery.k8s.io", ["endpointslices"], ["list", "watch"], None),
    ("config.flomesh.io", ["meshconfigs"], ["list", "watch"], None),
    ("access.smi-spec.io", ["traffictargets"], ["list", "watch"], None),
    ("specs.smi-spec.io", ["httproutegroups", "tcproutes"], ["list", "watch"], None),
    ("split.smi-spec.io", ["trafficsplits"], ["list", "watch"], None),
    ("policy.flomesh.io", ["egresses", "egressgateways", "ingressbackends", "retries",
                           "upstreamtrafficsettings", "accesscontrols", "accesscerts", "isolations"],
     ["list", "watch"], None),
    ("", ["secrets"], ["list", "create", "patch", "delete"], None),
]
LEASES = [
    ("coordination.k8s.io", ["leases"], ["create"], None),
    ("coordination.k8s.io", ["leases"], ["get", "update"], ["fsm-controller"]),
]
CERTIFICATE_REQUESTS = ("cert-manager.io", ["certificaterequests"], ["create", "list", "watch", "delete"], None)


RECONCILER = [
    ("admissionregistration.k8s.io", ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
     ["list", "watch", "create", "update"], None),
    ("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch", "create", "update"], None),
]


def multi_version_crds():
    """Names of the chart's CRDs serving more than one version: fsm-controller points their
    spec.conversion at its conversion webhook (control-plane/controller/src/conversion.rs)."""
    names = []
    for path in sorted((CHART / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if sum(1 for v in crd["spec"]["versions"] if v.get("served")) > 1:
            assert "conversion" not in crd["spec"], f"{path.name}: fsm-controller writes spec.conversion at run time"
            names.append(crd["metadata"]["name"])
    return names


CONVERTED_CRDS = multi_version_crds()
assert CONVERTED_CRDS, "the TrafficSplit CRD serves v1alpha4 and v1alpha2"


def expected_rbac(kind, mesh="fsm", reconciler=False):
    """The exact rules of each role for a certificate provider (and the reconciler when on)."""
    controller_role = list(LEASES)
    injector_role = [("config.flomesh.io", ["meshconfigs"], ["get"], ["fsm-mesh-config"])]
    if kind == "tresor":
        tresor = [("", ["secrets"], ["get"], ["fsm-ca-bundle"]), ("", ["secrets"], ["create"], None)]
        controller_role += tresor
        injector_role += tresor
    if kind == "cert-manager":
        controller_role.append(CERTIFICATE_REQUESTS)
        injector_role.append(CERTIFICATE_REQUESTS)
    return {
        ("ClusterRole", f"fsm-controller-{mesh}"): expand(
            *WATCHED,
            ("admissionregistration.k8s.io", ["validatingwebhookconfigurations"], ["get", "update"],
             [f"fsm-validator-mesh-{mesh}"]),
            ("apiextensions.k8s.io", ["customresourcedefinitions"], ["get", "update"], CONVERTED_CRDS),
            *(RECONCILER if reconciler else []),
        ),
        ("Role", "fsm-controller"): expand(*controller_role),
        ("ClusterRole", f"fsm-injector-{mesh}"): expand(
            ("", ["namespaces"], ["get"], None),
            ("admissionregistration.k8s.io", ["mutatingwebhookconfigurations"], ["get", "update"],
             [f"fsm-webhook-{mesh}"]),
        ),
        ("Role", "fsm-injector"): expand(*injector_role),
    }


def assert_rbac(r, kind, mesh="fsm", reconciler=False):
    for (role_kind, name), expected in expected_rbac(kind, mesh, reconciler).items():
        actual = rules_of(r.get(role_kind, name))
        missing, extra = expected - actual, actual - expected
        assert not missing and not extra, (
            f"{role_kind} {name} ({kind}): missing {sorted(missing, key=str)}, extra {sorted(extra, key=str)}")


def flag_names_of_rust_args(*crates):
    """--flags of the clap structs in these crates' sources: every field after an
    #[arg(... long ...)] (the crates of a binary: where a struct moves inside them does not
    matter)."""
    flags = set()
    for path in sorted(p for crate in crates for p in (REPO / crate / "src").rglob("*.rs")):
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            if line.startswith("#[arg("):
                attribute = line
                while not attribute.rstrip().endswith(")]"):
                    i += 1
                    attribute += lines[i].strip()
                i += 1
                while lines[i].strip().startswith(("#[", "///")):
                    i += 1
                field = re.match(r"\s*(?:pub\s+)?(\w+)\s*:", lines[i])
                if re.search(r"\blong\b", attribute) and field:
                    flags.add(field.group(1).replace("_", "-"))
            i += 1
    return flags


# The certificate provider flags live in cert-manager/ (fsm-certs setup), shared by both binaries.
CONTROLLER_FLAGS = flag_names_of_rust_args("control-plane/controller", "cert-manager")
INJECTOR_FLAGS = flag_names_of_rust_args("control-plane/injector", "cert-manager")


def assert_not_loopback(address, what):
    host, _, port = address.rpartition(":")
    assert port.isdigit(), f"{what}: {address!r} has no port"
    host = host.strip("[]")
    assert host != "localhost" and not ipaddress.ip_address(host).is_loopback, (
        f"{what} listens on {address}: other pods cannot reach a loopback address")


def validate_schema(value, schema, path="spec"):
    """Checks `value` against an OpenAPI v3 structural schema as the API server would, and
    refuses fields the schema does not declare (the API server would drop them silently)."""
    errors = []
    if value is None:
        if not schema.get("nullable"):
            errors.append(f"{path}: null")
        return errors
    kind = schema.get("type")
    python_types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    if kind in python_types:
        if not isinstance(value, python_types[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
            return [f"{path}: {value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} < minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} > maximum {schema['maximum']}")
    if kind == "object":
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += validate_schema(item, properties[key], f"{path}.{key}")
            elif "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
                errors += validate_schema(item, schema["additionalProperties"], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{key}: unknown field")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required")
    if kind == "array":
        for i, item in enumerate(value):
            errors += validate_schema(item, schema.get("items", {}), f"{path}[{i}]")
    return errors


def meshconfig_schema():
    crd = yaml.safe_load((CHART / "crds" / "meshconfigs.config.flomesh.io.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha3")
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def leaf_values(values, prefix=""):
    """Dotted names of the leaves of a values tree (a list or an empty map is a leaf)."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("resource", "podLabels", "nodeSelector", "affinity"):
            yield from leaf_values(value, name + ".")
        else:
            yield name


DEFAULT = None


def default():
    global DEFAULT
    if DEFAULT is None:
        DEFAULT = Rendered()
    return DEFAULT


NON_DEFAULT_VALUES = {
    "fsm": {
        "meshName": "mesh2",
        "controllerLogLevel": "debug",
        "sidecarLogLevel": "debug",
        "sidecarImage": "example.com/envoy:v1",
        "sidecarClass": "fsm-sidecar",
        "certificateProvider": {"kind": "vault", "serviceCertValidityDuration": "1h30m", "certKeyBitSize": 4096},
        "vault": {"host": "vault.other.svc.cluster.local", "token": "s3cr3t-token", "protocol": "https", "port": 8201, "role": "mesh2"},
        "fsmController": {"replicaCount": 2, "resource": {"requests": {"cpu": "100m", "memory": "64M"}},
                          "webhookTimeoutSeconds": 25},
        "injector": {"replicaCount": 2, "webhookTimeoutSeconds": 10},
        "image": {"registry": "registry.example.com/fsm", "tag": "v9.9.9", "pullPolicy": "Always"},
        "enablePermissiveTrafficPolicy": True,
        "enableEgress": False,
        "enablePrivilegedInitContainer": True,
        "outboundIPRangeExclusionList": ["10.96.0.0/12", "169.254.169.254/32"],
        "outboundIPRangeInclusionList": ["10.0.0.0/8"],
        "outboundPortExclusionList": [6379, "7070"],
        "inboundPortExclusionList": [8081],
        "networkInterfaceExclusionList": ["eth1"],
        "tracing": {"enable": True},
        "grafanaDashboards": {"enabled": True, "label": "example.com/dashboard", "labelValue": "fsm",
                              "folderAnnotation": "example.com/folder"},
        "prometheusConfig": {"enabled": True},
        "featureFlags": {"enableRetryPolicy": True, "enableEgressPolicy": False},
    }
}

NON_DEFAULT = None


def non_default():
    global NON_DEFAULT
    if NON_DEFAULT is None:
        NON_DEFAULT = Rendered(NON_DEFAULT_VALUES, namespace="other", name="mesh2")
    return NON_DEFAULT


# === checks: lint and objects ===


@check
def lint_passes_strict_with_default_and_other_values():
    for values, namespace in [(None, "fsm-system"), (NON_DEFAULT_VALUES, "other")]:
        report = helm_python.lint(CHART, values, strict=True, namespace=namespace, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"helm lint: {problems}"


@check
def default_render_has_exactly_the_control_plane_objects():
    expected = [
        ("ClusterRole", None, "fsm-controller-fsm"),
        ("ClusterRole", None, "fsm-injector-fsm"),
        ("ClusterRoleBinding", None, "fsm-controller-fsm"),
        ("ClusterRoleBinding", None, "fsm-injector-fsm"),
        ("Deployment", "fsm-system", "fsm-controller"),
        ("Deployment", "fsm-system", "fsm-injector"),
        ("MeshConfig", "fsm-system", "fsm-mesh-config"),
        ("MutatingWebhookConfiguration", None, "fsm-webhook-fsm"),
        ("Role", "fsm-system", "fsm-controller"),
        ("Role", "fsm-system", "fsm-injector"),
        ("RoleBinding", "fsm-system", "fsm-controller"),
        ("RoleBinding", "fsm-system", "fsm-injector"),
        ("Service", "fsm-system", "fsm-controller"),
        ("Service", "fsm-system", "fsm-injector"),
        ("ServiceAccount", "fsm-system", "fsm-controller"),
        ("ServiceAccount", "fsm-system", "fsm-injector"),
        ("ValidatingWebhookConfiguration", None, "fsm-validator-mesh-fsm"),
    ]
    assert default().names() == expected, default().names()


@check
def every_object_carries_fsm_labels():
    for r in (default(), non_default()):
        for obj in r.objects:
            labels = obj["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/name") == "flomesh.io", obj["metadata"]
            assert labels.get("app.kubernetes.io/instance") == r.values.get("fsm", {}).get("meshName", "fsm"), obj["metadata"]


@check
def controller_deployment_args_listen_off_loopback():
    r = default()
    deployment = r.get("Deployment", "fsm-controller")
    assert deployment["metadata"]["labels"]["app"] == "fsm-controller"
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == {"app": "fsm-controller"}
    assert template["metadata"]["labels"]["app"] == "fsm-controller"
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "flomesh.io"
    assert template["spec"]["serviceAccountName"] == "fsm-controller"
    args = r.args("fsm-controller")
    assert args == {
        "mesh-name": "fsm",
        "fsm-namespace": "fsm-system",
        "ads-listen": "0.0.0.0:15128",
        "http-listen": "0.0.0.0:9091",
        "validating-webhook-listen": "0.0.0.0:9093",
        "validating-webhook-config-name": "fsm-validator-mesh-fsm",
        "log-level": "info",
        "log-json": True,
        "leader-election-lease-name": "fsm-controller",
        "certificate-provider": "tresor",
    }, args
    assert "kubeconfig" not in args and "manifest-dir" not in args, "in a pod the controller uses its service account"
    assert_not_loopback(args["ads-listen"], "ADS")
    assert_not_loopback(args["http-listen"], "HTTP")
    assert_not_loopback(args["validating-webhook-listen"], "validating webhook")
    assert deployment["spec"]["replicas"] == 1
    assert r.container("fsm-controller")["image"] == "flomesh/fsm-controller:0.1.0"


@check
def chart_passes_only_flags_the_binaries_have():
    assert {"ads-listen", "http-listen", "mesh-name", "certificate-provider", "vault-token", "validating-webhook-listen",
            "validating-webhook-config-name", "webhook-service-name", "webhook-service-port"} <= CONTROLLER_FLAGS, CONTROLLER_FLAGS
    assert {"listen", "webhook-config-name", "init-image", "certificate-provider"} <= INJECTOR_FLAGS, INJECTOR_FLAGS
    for values in [None, NON_DEFAULT_VALUES, {"fsm": {"certificateProvider": {"kind": "cert-manager"}}}]:
        r = Rendered(values)
        unknown = set(r.args("fsm-controller")) - CONTROLLER_FLAGS
        assert not unknown, f"fsm-controller has no flags {unknown}"
        unknown = set(r.args("fsm-injector")) - INJECTOR_FLAGS
        assert not unknown, f"fsm-injector has no flags {unknown}"


@check
def controller_env_probes_ports_resources_security():
    r = default()
    container = r.container("fsm-controller")
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "FSM_VAULT_TOKEN" not in env
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": 9091}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/alive", "port": 9091}
    assert container["startupProbe"]["httpGet"] == {"path": "/health/alive", "port": 9091}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"ads": 15128, "http": 9091, "webhook": 9093}, ports
    assert container["resources"] == {"limits": {"cpu": "2", "memory": "1G"}, "requests": {"cpu": "0.5", "memory": "128M"}}
    pod = r.get("Deployment", "fsm-controller")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@check
def controller_pods_carry_prometheus_annotations():
    annotations = default().get("Deployment", "fsm-controller")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9091", "prometheus.io/path": "/metrics"}, annotations


@check
def controller_service_ports():
    service = default().get("Service", "fsm-controller")
    assert service["spec"]["selector"] == {"app": "fsm-controller"}
    ports = [(p["name"], p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]]
    assert ports == [("ads", 15128, 15128, "TCP"), ("http", 9091, 9091, "TCP"), ("webhook", 9093, 9093, "TCP")], ports


@check
def injector_deployment_follows_its_contract():
    r = default()
    deployment = r.get("Deployment", "fsm-injector")
    assert deployment["spec"]["selector"]["matchLabels"] == {"app": "fsm-injector"}
    assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == "fsm-injector"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "fsm-injector"
    args = r.args("fsm-injector")
    assert args == {
        "listen": "0.0.0.0:9090",
        "metrics-listen": "0.0.0.0:9091",
        "mesh-name": "fsm",
        "fsm-namespace": "fsm-system",
        "webhook-config-name": "fsm-webhook-fsm",
        "service-name": "fsm-injector",
        "log-level": "info",
        "ads-address": "fsm-controller.fsm-system.svc.cluster.local:15128",
        "init-image": "flomesh/fsm-sidecar-init:0.1.0",
        "envoy-image": "envoyproxy/envoy:v1.40-latest",
        "fsm-sidecar-image": "flomesh/fsm-sidecar:0.1.0",
        "sidecar-class": "envoy",
        "certificate-provider": "tresor",
    }, args
    assert "kubeconfig" not in args, "in a pod the injector uses its service account"
    assert_not_loopback(args["listen"], "fsm-injector")
    container = r.container("fsm-injector")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": 9090, "scheme": "HTTPS"}, container[probe]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert {p["containerPort"] for p in container["ports"]} == {9090, 9091}
    assert container["securityContext"]["runAsNonRoot"] is True
    service = r.get("Service", "fsm-injector")
    assert service["spec"]["selector"] == {"app": "fsm-injector"}
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("sidecar-inject", 9090, 9090)]


@check
def mutating_webhook_calls_the_injector_for_monitored_namespaces():
    r = default()
    config = r.get("MutatingWebhookConfiguration", "fsm-webhook-fsm")
    assert config["metadata"]["labels"]["app"] == "fsm-injector"
    assert len(config["webhooks"]) == 1
    webhook = config["webhooks"][0]
    assert webhook["name"] == "fsm-inject.flomesh.io"
    assert webhook["clientConfig"] == {
        "service": {"name": "fsm-injector", "namespace": "fsm-system", "path": "/mutate-pod-creation", "port": 9090}
    }, "clientConfig, without caBundle (the injector writes it)"
    assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}]
    selector = webhook["namespaceSelector"]
    assert selector["matchLabels"] == {"flomesh.io/monitored-by": "fsm"}
    expressions = {e["key"]: (e["operator"], e["values"]) for e in selector["matchExpressions"]}
    assert expressions == {
        "flomesh.io/ignore": ("NotIn", ["true"]),
        "name": ("NotIn", ["fsm-system"]),
        "kubernetes.io/metadata.name": ("NotIn", ["fsm-system"]),
    }, expressions
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["sideEffects"] == "NoneOnDryRun"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["timeoutSeconds"] == 20
    assert webhook["reinvocationPolicy"] == "Never"
    # The injector patches this object and is reached through this Service.
    args = r.args("fsm-injector")
    assert args["webhook-config-name"] == config["metadata"]["name"]
    assert args["service-name"] == webhook["clientConfig"]["service"]["name"]
    assert any(p["port"] == webhook["clientConfig"]["service"]["port"] for p in r.get("Service", "fsm-injector")["spec"]["ports"])


# The rules of the validating webhook: CREATE and UPDATE of every version of every CRD of the mesh.
VALIDATED = [
    (["config.flomesh.io"], ["v1alpha3"], ["meshconfigs"], "Namespaced"),
    (["specs.smi-spec.io"], ["v1alpha4"], ["httproutegroups", "tcproutes"], "Namespaced"),
    (["access.smi-spec.io"], ["v1alpha3"], ["traffictargets"], "Namespaced"),
    (["split.smi-spec.io"], ["v1alpha4", "v1alpha2"], ["trafficsplits"], "Namespaced"),
    (["policy.flomesh.io"], ["v1alpha1"], ["accesscerts", "accesscontrols", "egresses", "egressgateways",
                                           "ingressbackends", "retries", "upstreamtrafficsettings"], "Namespaced"),
    (["policy.flomesh.io"], ["v1alpha1"], ["isolations"], "Cluster"),
]


def assert_validating_webhook(r, mesh, namespace, timeout):
    name = f"fsm-validator-mesh-{mesh}"
    config = r.get("ValidatingWebhookConfiguration", name)
    assert "namespace" not in config["metadata"], "cluster-scoped"
    labels = config["metadata"]["labels"]
    assert labels["app"] == "fsm-controller" and labels["app.kubernetes.io/instance"] == mesh, labels
    assert len(config["webhooks"]) == 1, config["webhooks"]
    webhook = config["webhooks"][0]
    assert webhook["name"] == "fsm-validate.flomesh.io" and len(webhook["name"].split(".")) == 3, webhook["name"]
    assert webhook["clientConfig"] == {
        "service": {"name": "fsm-controller", "namespace": namespace, "path": "/validate", "port": 9093}
    }, "clientConfig, without caBundle (fsm-controller writes it)"
    assert "caBundle" not in r.text("ValidatingWebhookConfiguration", name), "helm upgrade would erase the published caBundle"
    expected = [{"operations": ["CREATE", "UPDATE"], "apiGroups": g, "apiVersions": v, "resources": res, "scope": scope}
                for g, v, res, scope in VALIDATED]
    assert webhook["rules"] == expected, webhook["rules"]
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["matchPolicy"] == "Equivalent"
    assert webhook["timeoutSeconds"] == timeout
    assert set(webhook) == {"name", "clientConfig", "rules", "failurePolicy", "sideEffects", "admissionReviewVersions",
                            "matchPolicy", "timeoutSeconds"}, sorted(webhook)
    # fsm-controller serves it and publishes its caBundle: the flags, the Service port, the
    # container port and the RBAC rule all name the same things.
    args = r.args("fsm-controller")
    assert args["validating-webhook-config-name"] == name
    assert args["validating-webhook-listen"] == "0.0.0.0:9093"
    assert args.get("webhook-service-name", "fsm-controller") == webhook["clientConfig"]["service"]["name"], (
        "the webhook's certificate names <webhook-service-name>.<fsm namespace>.svc")
    assert args["fsm-namespace"] == webhook["clientConfig"]["service"]["namespace"]
    service = r.get("Service", "fsm-controller")
    port = next(p for p in service["spec"]["ports"] if p["port"] == webhook["clientConfig"]["service"]["port"])
    container_ports = {p["name"]: p["containerPort"] for p in r.container("fsm-controller")["ports"]}
    assert port["targetPort"] == container_ports["webhook"] == int(args["validating-webhook-listen"].rpartition(":")[2])
    assert int(args.get("webhook-service-port", 9093)) == port["port"], (
        "the CRDs' conversion webhook names --webhook-service-port of the Service")
    role = r.get("ClusterRole", f"fsm-controller-{mesh}")
    assert {(g, res, v, n) for g, res, v, n in rules_of(role) if res == "validatingwebhookconfigurations"} == {
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "get", name),
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "update", name),
    }


@check
def validating_webhook_calls_the_controller_for_the_mesh_objects():
    assert_validating_webhook(default(), "fsm", "fsm-system", 10)
    assert_validating_webhook(non_default(), "mesh2", "other", 25)
    r = Rendered({"fsm": {"meshName": "east", "fsmNamespace": "mesh-system", "fsmController": {"webhookTimeoutSeconds": 3},
                          "certificateProvider": {"kind": "cert-manager"}}}, namespace="default")
    assert_validating_webhook(r, "east", "mesh-system", 3)
    # The path is the one the controller serves (control-plane/controller/src/admission.rs).
    admission = (REPO / "control-plane/controller/src/admission.rs").read_text()
    assert re.search(r'VALIDATE_PATH: &str = "/validate";', admission), "fsm-controller serves POST /validate"


@check
def validating_webhook_rules_cover_every_crd_of_the_mesh():
    """Every CRD in charts/fsm/crds with every version it serves and its scope, nothing else."""
    served = set()
    for path in (CHART / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())["spec"]
        for version in crd["versions"]:
            if version.get("served"):
                served.add((crd["group"], version["name"], crd["names"]["plural"], crd["scope"]))
    rules = default().get("ValidatingWebhookConfiguration", "fsm-validator-mesh-fsm")["webhooks"][0]["rules"]
    covered = set()
    for rule in rules:
        for field in ("apiGroups", "apiVersions", "resources"):
            assert not any("*" in item or "/" in item for item in rule[field]), f"wildcard or subresource in {rule}"
        covered |= {(g, v, res, rule["scope"]) for g in rule["apiGroups"] for v in rule["apiVersions"] for res in rule["resources"]}
    assert covered == served, f"missing {sorted(served - covered)}, extra {sorted(covered - served)}"


@check
def rbac_is_exactly_what_the_code_uses():
    for kind, values in [("tresor", None), ("vault", NON_DEFAULT_VALUES), ("cert-manager", {"fsm": {"certificateProvider": {"kind": "cert-manager"}}})]:
        r = Rendered(values)
        assert_rbac(r, kind, mesh=(values or {}).get("fsm", {}).get("meshName", "fsm"))


@check
def rbac_has_no_wildcards_and_leases_are_namespaced():
    for r in (default(), non_default(), Rendered({"fsm": {"certificateProvider": {"kind": "cert-manager"}}})):
        for obj in r.objects:
            if obj["kind"] not in ("ClusterRole", "Role"):
                continue
            for rule in obj["rules"]:
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert not any("*" in item for item in rule.get(field, [])), f"{obj['metadata']['name']}: wildcard in {rule}"
                if obj["kind"] == "ClusterRole":
                    assert "leases" not in rule["resources"], f"{obj['metadata']['name']}: Leases cluster-wide"
                    assert "certificaterequests" not in rule["resources"], "CertificateRequests cluster-wide"
        leases = [o for o in r.objects if any("leases" in rule["resources"] for rule in o.get("rules", []))]
        assert [(o["kind"], o["metadata"]["namespace"]) for o in leases] == [("Role", r.namespace)]


@check
def every_rbac_rule_says_why():
    for r in (default(), Rendered({"fsm": {"certificateProvider": {"kind": "cert-manager"}}})):
        for obj, text in r.items:
            if obj["kind"] not in ("ClusterRole", "Role"):
                continue
            lines = text.splitlines()
            rule_lines = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
            assert len(rule_lines) == len(obj["rules"])
            for i in rule_lines:
                assert lines[i - 1].strip().startswith("#"), f"{obj['kind']} {obj['metadata']['name']}: no comment above {lines[i].strip()}"


@check
def bindings_bind_each_role_to_its_service_account():
    for r in (default(), non_default()):
        for obj in r.objects:
            if obj["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
                continue
            role_kind = obj["kind"].replace("Binding", "")
            r.get(role_kind, obj["roleRef"]["name"])
            assert obj["roleRef"]["kind"] == role_kind
            component = "fsm-controller" if "controller" in obj["metadata"]["name"] else "fsm-injector"
            assert obj["subjects"] == [{"kind": "ServiceAccount", "name": component, "namespace": r.namespace}], obj["subjects"]
            r.get("ServiceAccount", component)


@check
def meshconfig_defaults_are_valid_against_the_crd():
    mc = default().get("MeshConfig", "fsm-mesh-config")
    assert mc["apiVersion"] == "config.flomesh.io/v1alpha3"
    assert mc["metadata"]["namespace"] == "fsm-system"
    errors = validate_schema(mc["spec"], meshconfig_schema())
    assert not errors, errors
    spec = mc["spec"]
    assert spec["traffic"]["enablePermissiveTrafficPolicyMode"] is False
    assert spec["traffic"]["enableEgress"] is True
    for key in ("outboundPortExclusionList", "inboundPortExclusionList", "outboundIPRangeExclusionList",
                "outboundIPRangeInclusionList", "networkInterfaceExclusionList"):
        assert spec["traffic"][key] == [], key
    assert spec["sidecar"] == {"enablePrivilegedInitContainer": False, "logLevel": "error", "sidecarImage": "",
                               "sidecarClass": "envoy", "maxDataPlaneConnections": 0,
                               "configResyncInterval": "0s"}
    assert spec["certificate"] == {"serviceCertValidityDuration": "24h", "certKeyBitSize": 2048}
    assert spec["observability"]["fsmLogLevel"] == "info"
    assert spec["observability"]["tracing"]["address"] == "jaeger.fsm-system.svc.cluster.local"
    flags = meshconfig_schema()["properties"]["featureFlags"]["properties"]
    assert set(spec["featureFlags"]) == set(flags), "every MeshConfig feature flag has a value"
    assert spec["featureFlags"]["enableEgressPolicy"] is True and spec["featureFlags"]["enableRetryPolicy"] is False


@check
def non_default_values_reach_every_object():
    r = non_default()
    names = {(kind, name) for kind, _, name in r.names()}
    for kind, name in [("MutatingWebhookConfiguration", "fsm-webhook-mesh2"), ("ClusterRole", "fsm-controller-mesh2"),
                       ("ValidatingWebhookConfiguration", "fsm-validator-mesh-mesh2"),
                       ("ClusterRole", "fsm-injector-mesh2"), ("Secret", "fsm-vault-token")]:
        assert (kind, name) in names, (kind, name)
    for obj in r.objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            assert obj["metadata"]["namespace"] == "other", obj["metadata"]
        else:
            assert "namespace" not in obj["metadata"], obj["metadata"]
    controller = r.get("Deployment", "fsm-controller")
    assert controller["spec"]["replicas"] == 2 and r.get("Deployment", "fsm-injector")["spec"]["replicas"] == 2
    args = r.args("fsm-controller")
    for flag, value in {"mesh-name": "mesh2", "fsm-namespace": "other", "log-level": "debug",
                        "certificate-provider": "vault", "vault-host": "vault.other.svc.cluster.local",
                        "vault-port": "8201", "vault-protocol": "https", "vault-role": "mesh2",
                        "ads-listen": "0.0.0.0:15128", "http-listen": "0.0.0.0:9091",
                        "validating-webhook-listen": "0.0.0.0:9093",
                        "validating-webhook-config-name": "fsm-validator-mesh-mesh2"}.items():
        assert args.get(flag) == value, (flag, args.get(flag))
    assert r.container("fsm-controller")["image"] == "registry.example.com/fsm/fsm-controller:v9.9.9"
    assert r.container("fsm-controller")["imagePullPolicy"] == "Always"
    assert r.container("fsm-controller")["resources"]["requests"] == {"cpu": "100m", "memory": "64M"}
    injector = r.args("fsm-injector")
    assert injector["webhook-config-name"] == "fsm-webhook-mesh2"
    assert injector["ads-address"] == "fsm-controller.other.svc.cluster.local:15128"
    assert injector["init-image"] == "registry.example.com/fsm/fsm-sidecar-init:v9.9.9"
    assert injector["sidecar-class"] == "fsm-sidecar"
    assert injector["certificate-provider"] == "vault" and injector["vault-host"] == "vault.other.svc.cluster.local"
    webhook = r.get("MutatingWebhookConfiguration", "fsm-webhook-mesh2")["webhooks"][0]
    assert webhook["clientConfig"]["service"]["namespace"] == "other"
    assert webhook["namespaceSelector"]["matchLabels"] == {"flomesh.io/monitored-by": "mesh2"}
    assert {"key": "name", "operator": "NotIn", "values": ["other"]} in webhook["namespaceSelector"]["matchExpressions"]
    assert webhook["timeoutSeconds"] == 10


@check
def vault_token_travels_in_a_secret_not_on_the_command_line():
    r = non_default()
    secret = r.get("Secret", "fsm-vault-token")
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cr3t-token"
    for deployment in ("fsm-controller", "fsm-injector"):
        container = r.container(deployment)
        assert not any("s3cr3t" in a for a in container["args"]), f"{deployment}: token on the command line"
        env = {e["name"]: e for e in container["env"]}
        assert env["FSM_VAULT_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "fsm-vault-token", "key": "token"}}
    own = Rendered({"fsm": {"certificateProvider": {"kind": "vault"},
                            "vault": {"host": "vault", "secret": {"name": "my-vault", "key": "tok"}}}})
    assert "Secret" not in {o["kind"] for o in own.objects}
    env = {e["name"]: e for e in own.container("fsm-controller")["env"]}
    assert env["FSM_VAULT_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "my-vault", "key": "tok"}}


@check
def cert_manager_flags():
    r = Rendered({"fsm": {"certificateProvider": {"kind": "cert-manager"},
                          "certmanager": {"issuerName": "mesh-ca", "issuerKind": "ClusterIssuer"}}})
    for deployment in ("fsm-controller", "fsm-injector"):
        args = r.args(deployment)
        assert args["certificate-provider"] == "cert-manager"
        assert args["cert-manager-issuer-name"] == "mesh-ca"
        assert args["cert-manager-issuer-kind"] == "ClusterIssuer"
        assert args["cert-manager-issuer-group"] == "cert-manager.io"
        assert not any(flag.startswith("vault") for flag in args)


@check
def meshconfig_follows_non_default_values():
    mc = non_default().get("MeshConfig", "fsm-mesh-config")
    assert mc["metadata"]["namespace"] == "other"
    errors = validate_schema(mc["spec"], meshconfig_schema())
    assert not errors, errors
    spec = mc["spec"]
    assert spec["traffic"]["enablePermissiveTrafficPolicyMode"] is True
    assert spec["traffic"]["enableEgress"] is False
    assert spec["traffic"]["outboundIPRangeExclusionList"] == ["10.96.0.0/12", "169.254.169.254/32"]
    assert spec["traffic"]["outboundIPRangeInclusionList"] == ["10.0.0.0/8"]
    assert spec["traffic"]["outboundPortExclusionList"] == [6379, 7070], "ports are integers, also from --set strings"
    assert spec["traffic"]["inboundPortExclusionList"] == [8081]
    assert spec["traffic"]["networkInterfaceExclusionList"] == ["eth1"]
    assert spec["sidecar"]["enablePrivilegedInitContainer"] is True
    assert spec["sidecar"]["logLevel"] == "debug"
    assert spec["sidecar"]["sidecarImage"] == "example.com/envoy:v1"
    assert spec["sidecar"]["sidecarClass"] == "fsm-sidecar", "the mesh's sidecar class follows the value"
    assert spec["certificate"] == {"serviceCertValidityDuration": "1h30m", "certKeyBitSize": 4096}
    assert spec["observability"]["fsmLogLevel"] == "debug"
    assert spec["observability"]["tracing"]["enable"] is True
    assert spec["observability"]["tracing"]["address"] == "jaeger.other.svc.cluster.local"
    assert spec["featureFlags"]["enableRetryPolicy"] is True
    assert spec["featureFlags"]["enableEgressPolicy"] is False
    assert spec["featureFlags"]["enableIngressBackendPolicy"] is True, "flags not given keep their defaults"


@check
def fsm_namespace_value_overrides_the_release_namespace():
    r = Rendered({"fsm": {"fsmNamespace": "mesh-system"}}, namespace="default")
    for obj in r.objects:
        if "namespace" in obj["metadata"]:
            assert obj["metadata"]["namespace"] == "mesh-system", obj["metadata"]
    assert r.args("fsm-controller")["fsm-namespace"] == "mesh-system"
    assert r.get("ClusterRoleBinding", "fsm-controller-fsm")["subjects"][0]["namespace"] == "mesh-system"


@check
def log_levels_map_to_the_binaries_filters():
    for level, flag in [("warn", "warn"), ("fatal", "error"), ("panic", "error"), ("disabled", "off"), ("trace", "trace")]:
        r = Rendered({"fsm": {"controllerLogLevel": level}})
        assert r.args("fsm-controller")["log-level"] == flag and r.args("fsm-injector")["log-level"] == flag, level
        assert r.get("MeshConfig", "fsm-mesh-config")["spec"]["observability"]["fsmLogLevel"] == level


@check
def refused_values_fail_with_a_message_naming_them():
    cases = [
        ({"certificateProvider": {"kind": "bogus"}}, ["fsm.certificateProvider.kind", "tresor, vault, cert-manager", '"bogus"']),
        ({"certificateProvider": {"kind": "vault"}, "vault": {"token": "t"}}, ["fsm.vault.host is required"]),
        ({"certificateProvider": {"kind": "vault"}, "vault": {"host": "v"}}, ["fsm.vault.token"]),
        ({"certificateProvider": {"kind": "vault"}, "vault": {"host": "v", "token": "t", "protocol": "ftp"}}, ["fsm.vault.protocol", '"ftp"']),
        ({"certmanager": {"issuerKind": "Bogus"}, "certificateProvider": {"kind": "cert-manager"}}, ["fsm.certmanager.issuerKind"]),
        ({"meshName": "Mesh_2"}, ["fsm.meshName", '"Mesh_2"']),
        ({"meshName": "m" * 64}, ["fsm.meshName"]),
        ({"caBundleSecretName": "my-ca"}, ["fsm.caBundleSecretName", "fsm-ca-bundle"]),
        ({"certificateProvider": {"serviceCertValidityDuration": "one day"}}, ["serviceCertValidityDuration", '"one day"']),
        ({"certificateProvider": {"certKeyBitSize": 1024}}, ["certKeyBitSize"]),
        ({"controllerLogLevel": "verbose"}, ["fsm.controllerLogLevel", '"verbose"']),
        ({"fsmController": {"replicaCount": 0}}, ["fsm.fsmController.replicaCount"]),
        ({"injector": {"webhookTimeoutSeconds": 31}}, ["fsm.injector.webhookTimeoutSeconds"]),
        ({"fsmController": {"webhookTimeoutSeconds": 0}}, ["fsm.fsmController.webhookTimeoutSeconds", "1 to 30", "got 0"]),
        ({"fsmController": {"webhookTimeoutSeconds": 31}}, ["fsm.fsmController.webhookTimeoutSeconds", "got 31"]),
        ({"fsmController": {"webhookTimeoutSeconds": "ten"}}, ["fsm.fsmController.webhookTimeoutSeconds", "got ten"]),
        ({"outboundPortExclusionList": [70000]}, ["fsm.outboundPortExclusionList", "70000"]),
        ({"inboundPortExclusionList": ["http"]}, ["fsm.inboundPortExclusionList", '"http"']),
        ({"outboundIPRangeExclusionList": ["10.0.0.0"]}, ["fsm.outboundIPRangeExclusionList", '"10.0.0.0"']),
        ({"featureFlags": {"enableWASMStats": True}}, ["fsm.featureFlags.enableWASMStats"]),
        ({"featureFlags": {"enableRetryPolicy": "yes"}}, ["fsm.featureFlags.enableRetryPolicy", "true or false"]),
        ({"deployPrometheus": True}, ["fsm.deployPrometheus"]),
        ({"sidecarClass": "pipy"}, ["fsm.sidecarClass", '"pipy"']),
        ({"tracing": {"sampledFraction": "1.5"}}, ["fsm.tracing.sampledFraction", '"1.5"']),
        ({"tracing": {"sampledFraction": "ten percent"}}, ["fsm.tracing.sampledFraction"]),
        ({"grafanaDashboards": {"enabled": True, "label": "grafana dashboard"}}, ["fsm.grafanaDashboards.label", '"grafana dashboard"']),
        ({"grafanaDashboards": {"enabled": True, "labelValue": "a/b"}}, ["fsm.grafanaDashboards.labelValue", '"a/b"']),
        ({"grafanaDashboards": {"enabled": True, "folderAnnotation": "-x"}}, ["fsm.grafanaDashboards.folderAnnotation"]),
    ]
    for values, needles in cases:
        message = render_error({"fsm": values})
        for needle in needles:
            assert needle in message, f"{values}: {needle!r} not in {message!r}"


@check
def ipv6_ranges_and_ports_from_set_strings_are_accepted():
    r = Rendered({"fsm": {"outboundIPRangeExclusionList": ["fd00::/8", "10.0.0.1/32"],
                          "outboundPortExclusionList": helm_python.parse_set_string("p={6379,7070}")["p"]}})
    traffic = r.get("MeshConfig", "fsm-mesh-config")["spec"]["traffic"]
    assert traffic["outboundIPRangeExclusionList"] == ["fd00::/8", "10.0.0.1/32"]
    assert traffic["outboundPortExclusionList"] == [6379, 7070]


@check
def rendering_is_deterministic():
    first = render.render(NON_DEFAULT_VALUES, namespace="other")
    second = render.render(NON_DEFAULT_VALUES, namespace="other")
    assert [t for _, t in first] == [t for _, t in second]


# === checks: dashboards and Prometheus configuration ===


def promtool():
    """Debian's promtool (package prometheus; `make prometheus` installs it)."""
    import shutil
    path = shutil.which("promtool")
    assert path, "promtool is missing: run `make prometheus` (Debian's prometheus package)"
    return path


def source_dashboards():
    import json
    return {p.name: json.loads(p.read_text()) for p in sorted(observability.DASHBOARDS.glob("*.json"))}


@check
def observability_templates_are_generated_from_the_files():
    stale = observability.stale()
    assert not stale, f"{[str(p) for p in stale]} stale: run `.venv/bin/python charts/tests/observability.py --write`"


@check
def dashboards_and_prometheus_config_are_off_by_default():
    names = {(kind, name) for kind, _, name in default().names()}
    assert not [n for n in names if n[0] == "ConfigMap"], names


@check
def dashboards_ship_in_configmaps_for_grafanas_sidecar():
    import json
    dashboards = source_dashboards()
    for r, label, value, folder_key in [
        (Rendered({"fsm": {"grafanaDashboards": {"enabled": True}}}), "grafana_dashboard", "1", "grafana_folder"),
        (non_default(), "example.com/dashboard", "fsm", "example.com/folder"),
    ]:
        shipped = {}
        for tag, (folder, name) in observability.FOLDERS.items():
            cm = r.get("ConfigMap", name)
            assert cm["metadata"]["namespace"] == r.namespace, cm["metadata"]
            assert cm["metadata"]["labels"][label] == value, cm["metadata"]
            assert cm["metadata"]["annotations"] == {folder_key: folder}, cm["metadata"]
            for key, text in cm["data"].items():
                assert tag in json.loads(text)["tags"], (name, key)
                shipped[key] = json.loads(text)
        assert shipped == dashboards, "the ConfigMaps carry exactly charts/fsm/dashboards/*.json, unchanged"


@check
def dashboards_are_well_formed():
    dashboards = source_dashboards()
    titles = {d["title"] for d in dashboards.values()}
    # FSM's dashboard names (and the service-to-service dashboard's URL, /d/FSMs2sMetrics/...).
    assert {"FSM Control Plane Metrics", "FSM Service to Service Metrics", "FSM Workload to Workload Metrics"} <= titles, titles
    assert dashboards["fsm-service-to-service.json"]["uid"] == "FSMs2sMetrics"
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids) and all(len(u) <= 40 for u in uids), uids
    for name, d in dashboards.items():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus", name
        ids = [p["id"] for p in d["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: panel ids repeat"
        for panel in d["panels"]:
            where = f"{name}: {panel['title']!r}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), where
            for target in panel["targets"]:
                expr = target["expr"]
                used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__range", "__interval"}
                assert used <= set(variables), f"{where}: undefined variables {used - set(variables)}"
                # A variable with "All" (.*) or several values only works in a regex matcher.
                assert not re.search(r'[^~!]="\$', expr), f"{where}: use =~ with a variable: {expr}"
                assert expr.count("(") == expr.count(")"), f"{where}: unbalanced parentheses: {expr}"


def rendered_prometheus_config(r):
    cm = r.get("ConfigMap", observability.PROMETHEUS_CONFIGMAP)
    assert set(cm["data"]) == set(observability.PROMETHEUS_FILES), cm["data"].keys()
    return cm["data"]


@check
def prometheus_config_ships_fsm_scrape_job_and_the_rules():
    for r in (Rendered({"fsm": {"prometheusConfig": {"enabled": True}}}), non_default()):
        data = rendered_prometheus_config(r)
        for name in observability.PROMETHEUS_FILES:
            # (Shipped as `|-`: without the file's final newline.)
            assert data[name].rstrip("\n") == (observability.PROMETHEUS / name).read_text().rstrip("\n"), \
                f"{name} shipped unchanged"
    config = yaml.safe_load(data["prometheus.yml"])
    assert config["rule_files"] == ["fsm-rules.yml"], "the rules are read from beside prometheus.yml"
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = [c.get("target_label") for c in job["relabel_configs"]]
    for label in ["__metrics_path__", "__address__", "source_namespace", "source_pod_name",
                  "source_workload_kind", "source_workload_name"]:
        assert label in targets, f"FSM's relabelling sets {label}"
    assert {"regex": "(__meta_kubernetes_pod_label_app)", "action": "labelmap", "replacement": "source_service"} \
        in job["relabel_configs"]
    rules = yaml.safe_load(data["fsm-rules.yml"])
    recorded = {rule["record"] for group in rules["groups"] for rule in group["rules"]}
    assert recorded == {"sidecar_cluster_upstream_rq_xx", "sidecar_cluster_upstream_rq_total", "fsm_request_total",
                        "fsm_request_duration_ms_bucket", "fsm_request_duration_ms_sum",
                        "fsm_request_duration_ms_count"}, recorded
    # Everything a rule reads passes the scrape job's metric filter.
    keep = next(c for c in job["metric_relabel_configs"] if c["action"] == "keep")
    exprs = " ".join(rule["expr"] for group in rules["groups"] for rule in group["rules"])
    for source in set(re.findall(r"\b(envoy_[a-z_]+)\{", exprs)):
        assert re.fullmatch(keep["regex"], source), f"{source} is dropped before the rules read it"


@check
def promtool_accepts_the_config_and_the_rules_pass_their_tests():
    import tempfile
    data = rendered_prometheus_config(Rendered({"fsm": {"prometheusConfig": {"enabled": True}}}))
    config = yaml.safe_load(data["prometheus.yml"])
    # Debian's Prometheus is built without Kubernetes discovery: check the job with a static target
    # in its place (the relabelling, the filters and the rules are checked as shipped).
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["10.0.0.7:15010"]}]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(config))
        (Path(tmp) / "fsm-rules.yml").write_text(data["fsm-rules.yml"])
        out = subprocess.run([promtool(), "check", "config", str(Path(tmp) / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS: 6 rules found" in out.stdout + out.stderr, out.stdout + out.stderr
    tests = Path(__file__).resolve().parent / "fsm-rules.test.yml"
    out = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# === checks: the render script and the docs ===


@check
def render_script_writes_the_default_manifests_in_install_order():
    out = subprocess.run([sys.executable, str(Path(render.__file__)), "none"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert kinds == ["ServiceAccount"] * 2 + ["ClusterRole"] * 2 + ["ClusterRoleBinding"] * 2 + ["Role"] * 2 + \
        ["RoleBinding"] * 2 + ["Service"] * 2 + ["Deployment"] * 2 + \
        ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "MeshConfig"], kinds
    with_crds = subprocess.run([sys.executable, str(Path(render.__file__)), "none", "--include-crds"],
                               capture_output=True, text=True, timeout=60)
    kinds = [d["kind"] for d in yaml.safe_load_all(with_crds.stdout) if d]
    crds = len(list((CHART / "crds").glob("*.yaml")))
    assert kinds[:crds] == ["CustomResourceDefinition"] * crds, kinds
    assert kinds[crds:] == [k for k in kinds if k != "CustomResourceDefinition"]


@check
def render_script_takes_values_files_stdin_and_set():
    script = str(Path(render.__file__))
    values = "fsm:\n  meshName: fromstdin\n"
    out = subprocess.run([sys.executable, script, "-", "--namespace", "ns1", "--set", "fsm.fsmController.replicaCount=3"],
                         input=values, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    controller = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "fsm-controller")
    assert controller["spec"]["replicas"] == 3 and controller["metadata"]["namespace"] == "ns1"
    assert any(d["metadata"]["name"] == "fsm-webhook-fromstdin" for d in docs)
    bad = subprocess.run([sys.executable, script, "none", "--set", "fsm.certificateProvider.kind=bogus"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "fsm.certificateProvider.kind" in bad.stderr and not bad.stdout, bad


@check
def readme_documents_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    missing = [name for name in leaf_values(values) if f"`{name}`" not in readme]
    assert not missing, f"charts/fsm/README.md does not document {missing}"


@check
def packaged_chart_holds_only_chart_files():
    with helm_python.Chart.load(CHART) as chart:
        files = [f["name"] for f in chart.files]
        templates = [t["name"] for t in chart.templates]
    assert not [f for f in files + templates if f.endswith(".py") or "__pycache__" in f], files


@check
def tracing_sampled_fraction_reaches_the_mesh_config():
    tracing = default().get("MeshConfig", "fsm-mesh-config")["spec"]["observability"]["tracing"]
    assert "sampledFraction" not in tracing, tracing
    for given in ["0.25", 0.25, "1", ".5"]:
        r = Rendered({"fsm": {"tracing": {"enable": True, "sampledFraction": given}}})
        tracing = r.get("MeshConfig", "fsm-mesh-config")["spec"]["observability"]["tracing"]
        assert tracing["sampledFraction"] == str(given) and tracing["enable"] is True, tracing


@check
def reconciler_is_off_by_default_and_on_with_its_rights_and_labels():
    default_render = default()
    assert "enable-reconciler" not in default_render.args("fsm-controller")
    r = Rendered({"fsm": {"enableReconciler": True}})
    assert r.args("fsm-controller")["enable-reconciler"] is True
    assert_rbac(r, "tresor", reconciler=True)
    for kind, name in [("MutatingWebhookConfiguration", "fsm-webhook-fsm"),
                       ("ValidatingWebhookConfiguration", "fsm-validator-mesh-fsm")]:
        assert r.get(kind, name)["metadata"]["labels"]["flomesh.io/reconcile"] == "true", kind
    for path in (CHART / "crds").glob("*.yaml"):
        labels = yaml.safe_load(path.read_text())["metadata"]["labels"]
        assert labels.get("flomesh.io/reconcile") == "true", path.name


@check
def injector_serves_metrics_where_prometheus_looks():
    r = default()
    deployment = r.get("Deployment", "fsm-injector")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9091"
    assert r.args("fsm-injector")["metrics-listen"] == "0.0.0.0:9091"
    ports = {p["name"]: p["containerPort"] for p in r.container("fsm-injector")["ports"]}
    assert ports["metrics"] == 9091, ports


@check
def fsm_install_dry_run_puts_the_same_crds_first():
    if not FSM_BIN:
        return
    out = fsm_dry_run({}, "fsm-system", "fsm")
    assert out.returncode == 0, out.stderr
    theirs = [o for o in yaml.safe_load_all(out.stdout) if o]
    helm = [o for o, _ in render.render({}, include_crds=True)]
    crds = [o for o in helm if o["kind"] == "CustomResourceDefinition"]
    assert theirs[:len(crds)] == crds or sorted(map(str, theirs[:len(crds)])) == sorted(map(str, crds)), \
        "fsm install --dry-run starts with charts/fsm/crds"
    assert all(o["kind"] != "CustomResourceDefinition" for o in theirs[len(crds):])


def main():
    global FSM_BIN
    if "--fsm" in sys.argv:
        FSM_BIN = sys.argv[sys.argv.index("--fsm") + 1]
    started = time.monotonic()
    passed = failed = 0
    print(f"charts/fsm with Helm {helm_python.helm_sdk_version()} (helm-python-sdk {helm_python.__version__})"
          + (f", and {FSM_BIN} install --dry-run compared with it" if FSM_BIN else ""))
    for function in CHECKS:
        name = function.__name__.replace("_", " ")
        try:
            function()
        except Exception:  # noqa: BLE001 - report every check, whatever broke
            failed += 1
            print(f"FAIL {name}")
            print("     " + traceback.format_exc().strip().replace("\n", "\n     "))
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"({time.monotonic() - started:.1f}s)")
    print(f"chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
