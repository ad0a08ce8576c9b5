#!/usr/bin/env bash
# Validate the Kubernetes manifests in deploy/ offline: no cluster, no network, a few seconds.
#
#   bash scripts/validate-manifests.sh            # every *.yaml / *.yml in deploy/
#   bash scripts/validate-manifests.sh FILE|DIR…  # something else (used to test this script)
#
# Exit status 0 when every manifest is valid; 1 with one line per problem otherwise; 2 when a
# tool it needs (python3 with PyYAML) is missing.
#
# Why not `kubectl apply/create --dry-run=client`: even client-side dry-run needs the API
# server's discovery documents to map kinds to resources. With a throwaway kubeconfig whose
# server is unreachable, kubectl 1.32 fails every file at once with "unable to recognize ...:
# connection refused" (and with no credentials in that kubeconfig it stops to prompt for a
# username), so it validates nothing offline. `--validate=strict` needs the server's OpenAPI
# documents as well. Instead this script runs two offline checks:
#
#  1. `kubectl kustomize` over all files together (when kubectl is installed): kubectl's own
#     YAML reader, which rejects malformed YAML, objects without apiVersion/kind/metadata.name,
#     and two files defining the same object (which would overwrite each other on apply).
#  2. A schema check in python3 + PyYAML for the kinds deploy/ uses (Namespace, ServiceAccount,
#     Secret, ConfigMap, Service, StatefulSet, Deployment, Role, RoleBinding): known
#     apiVersion/kind pairs, required fields, field types, unknown (misspelt) fields, which the
#     API server rejects under strict field validation, plus the mistakes a server accepts but
#     which break the deployment: selectors that do not match the pod template, probes or
#     Services naming a port no container declares, mounts without a volume, $(VAR) in
#     command/args with no such env var (Kubernetes leaves it unexpanded), requests above
#     limits, invalid names and label values. Fields this script does not know are errors:
#     if a new field is valid, add it to the schema below.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -eq 0 ]; then
  set -- deploy
fi

files=()
for arg in "$@"; do
  if [ -d "$arg" ]; then
    while IFS= read -r f; do files+=("$f"); done < <(find "$arg" -maxdepth 1 -type f \( -name '*.yaml' -o -name '*.yml' \) | LC_ALL=C sort)
  elif [ -f "$arg" ]; then
    files+=("$arg")
  else
    echo "validate-manifests: no such file or directory: $arg" >&2
    exit 2
  fi
done
if [ "${#files[@]}" -eq 0 ]; then
  echo "validate-manifests: no manifests found in: $*" >&2
  exit 1
fi

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import yaml' >/dev/null 2>&1; then
  echo "validate-manifests: needs python3 with PyYAML (apt-get install python3-yaml, or pip install pyyaml)" >&2
  exit 2
fi

status=0

# 1. kubectl's own reader, offline.
if command -v kubectl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  {
    echo "resources:"
    i=0
    for f in "${files[@]}"; do
      i=$((i + 1))
      cp "$f" "$tmp/$i-$(basename "$f")"
      echo "- $i-$(basename "$f")"
    done
  } >"$tmp/kustomization.yaml"
  if ! out=$(cd "$tmp" && KUBECONFIG=/dev/null timeout 30 kubectl kustomize . 2>&1 >/dev/null); then
    # Map the numbered copies back to the real file names in the message.
    i=0
    for f in "${files[@]}"; do
      i=$((i + 1))
      out=${out//"$i-$(basename "$f")"/"$f"}
    done
    echo "INVALID (kubectl kustomize): $out" >&2
    status=1
  fi
else
  echo "validate-manifests: kubectl not found, skipping the kubectl check" >&2
fi

# 2. Schema and consistency checks.
python3 - "${files[@]}" <<'PY' || status=1
import re
import sys

import yaml

errors = []

# ---- a small schema language --------------------------------------------------------------
# A type is: "str", "int", "bool", "intstr" (int or port name), "qty" (resource quantity),
# "strmap" (string → string), "any", a list [T], a tuple ("enum", values...), or a dict of
# field → type, where a "!" in front of the field name makes it required.

ENUM = lambda *v: ("enum",) + v

SELECTOR = {"matchLabels": "strmap", "matchExpressions": [{"!key": "str", "!operator": ENUM("In", "NotIn", "Exists", "DoesNotExist"), "values": ["str"]}]}
OBJMETA = {"name": "str", "generateName": "str", "namespace": "str", "labels": "strmap", "annotations": "strmap"}
KEYREF = {"!name": "str", "!key": "str", "optional": "bool"}
ENV = {"!name": "str", "value": "str", "valueFrom": {
    "fieldRef": {"!fieldPath": "str", "apiVersion": "str"},
    "resourceFieldRef": {"!resource": "str", "containerName": "str", "divisor": "qty"},
    "secretKeyRef": KEYREF, "configMapKeyRef": KEYREF}}
PROBE = {
    "httpGet": {"!port": "intstr", "path": "str", "host": "str", "scheme": ENUM("HTTP", "HTTPS"), "httpHeaders": [{"!name": "str", "!value": "str"}]},
    "tcpSocket": {"!port": "intstr", "host": "str"},
    "grpc": {"!port": "int", "service": "str"},
    "exec": {"command": ["str"]},
    "initialDelaySeconds": "int", "periodSeconds": "int", "timeoutSeconds": "int",
    "successThreshold": "int", "failureThreshold": "int", "terminationGracePeriodSeconds": "int"}
SECCOMP = {"!type": ENUM("RuntimeDefault", "Localhost", "Unconfined"), "localhostProfile": "str"}
CONTAINER_SC = {
    "allowPrivilegeEscalation": "bool", "readOnlyRootFilesystem": "bool", "privileged": "bool",
    "runAsNonRoot": "bool", "runAsUser": "int", "runAsGroup": "int",
    "capabilities": {"add": ["str"], "drop": ["str"]}, "seccompProfile": SECCOMP,
    "procMount": "str", "seLinuxOptions": "any", "appArmorProfile": "any", "windowsOptions": "any"}
POD_SC = {
    "runAsNonRoot": "bool", "runAsUser": "int", "runAsGroup": "int", "fsGroup": "int",
    "fsGroupChangePolicy": ENUM("OnRootMismatch", "Always"), "supplementalGroups": ["int"],
    "supplementalGroupsPolicy": "str", "seccompProfile": SECCOMP, "sysctls": [{"!name": "str", "!value": "str"}],
    "seLinuxOptions": "any", "appArmorProfile": "any", "windowsOptions": "any", "seLinuxChangePolicy": "str"}
CONTAINER = {
    "!name": "str", "!image": "str", "imagePullPolicy": ENUM("Always", "IfNotPresent", "Never"),
    "command": ["str"], "args": ["str"], "workingDir": "str",
    "ports": [{"!containerPort": "int", "name": "str", "protocol": ENUM("TCP", "UDP", "SCTP"), "hostPort": "int", "hostIP": "str"}],
    "env": [ENV], "envFrom": "any",
    "resources": {"requests": "qtymap", "limits": "qtymap", "claims": "any"},
    "volumeMounts": [{"!name": "str", "!mountPath": "str", "readOnly": "bool", "subPath": "str", "subPathExpr": "str", "mountPropagation": "str", "recursiveReadOnly": "str"}],
    "livenessProbe": PROBE, "readinessProbe": PROBE, "startupProbe": PROBE,
    "securityContext": CONTAINER_SC, "lifecycle": "any", "restartPolicy": "str",
    "terminationMessagePath": "str", "terminationMessagePolicy": ENUM("File", "FallbackToLogsOnError"),
    "stdin": "bool", "stdinOnce": "bool", "tty": "bool", "volumeDevices": "any", "resizePolicy": "any"}
VOLUME = {
    "!name": "str",
    "secret": {"secretName": "str", "defaultMode": "int", "optional": "bool", "items": [{"!key": "str", "!path": "str", "mode": "int"}]},
    "configMap": {"name": "str", "defaultMode": "int", "optional": "bool", "items": [{"!key": "str", "!path": "str", "mode": "int"}]},
    "emptyDir": {"medium": "str", "sizeLimit": "qty"},
    "persistentVolumeClaim": {"!claimName": "str", "readOnly": "bool"},
    "projected": "any", "downwardAPI": "any", "hostPath": "any", "csi": "any", "ephemeral": "any"}
POD_SPEC = {
    "!containers": [CONTAINER], "initContainers": [CONTAINER], "volumes": [VOLUME],
    "serviceAccountName": "str", "automountServiceAccountToken": "bool", "securityContext": POD_SC,
    "nodeSelector": "strmap", "affinity": "any", "tolerations": "any", "priorityClassName": "str",
    "topologySpreadConstraints": [{"!maxSkew": "int", "!topologyKey": "str", "!whenUnsatisfiable": ENUM("DoNotSchedule", "ScheduleAnyway"),
                                   "labelSelector": SELECTOR, "minDomains": "int", "matchLabelKeys": ["str"],
                                   "nodeAffinityPolicy": "str", "nodeTaintsPolicy": "str"}],
    "terminationGracePeriodSeconds": "int", "restartPolicy": ENUM("Always", "OnFailure", "Never"),
    "dnsPolicy": "str", "dnsConfig": "any", "hostNetwork": "bool", "hostname": "str", "subdomain": "str",
    "imagePullSecrets": [{"!name": "str"}], "enableServiceLinks": "bool", "shareProcessNamespace": "bool",
    "runtimeClassName": "str", "schedulerName": "str", "preemptionPolicy": "str"}
TEMPLATE = {"metadata": OBJMETA, "!spec": POD_SPEC}
PVC_SPEC = {"accessModes": [ENUM("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")],
            "resources": {"requests": "qtymap", "limits": "qtymap"}, "storageClassName": "str",
            "volumeMode": ENUM("Filesystem", "Block"), "selector": SELECTOR, "dataSource": "any", "dataSourceRef": "any",
            "volumeName": "str", "volumeAttributesClassName": "str"}

KINDS = {
    ("v1", "Namespace"): {"spec": "any"},
    ("v1", "ServiceAccount"): {"automountServiceAccountToken": "bool", "secrets": "any", "imagePullSecrets": [{"!name": "str"}]},
    ("v1", "Secret"): {"type": "str", "data": "strmap", "stringData": "strmap", "immutable": "bool"},
    ("v1", "ConfigMap"): {"data": "strmap", "binaryData": "strmap", "immutable": "bool"},
    ("v1", "Service"): {"!spec": {
        "ports": [{"!port": "int", "name": "str", "targetPort": "intstr", "protocol": ENUM("TCP", "UDP", "SCTP"), "nodePort": "int", "appProtocol": "str"}],
        "selector": "strmap", "type": ENUM("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"),
        "clusterIP": "str", "clusterIPs": ["str"], "publishNotReadyAddresses": "bool",
        "externalTrafficPolicy": ENUM("Cluster", "Local"), "internalTrafficPolicy": ENUM("Cluster", "Local"),
        "loadBalancerSourceRanges": ["str"], "loadBalancerIP": "str", "loadBalancerClass": "str",
        "allocateLoadBalancerNodePorts": "bool", "healthCheckNodePort": "int", "externalName": "str", "externalIPs": ["str"],
        "sessionAffinity": ENUM("None", "ClientIP"), "sessionAffinityConfig": "any",
        "ipFamilyPolicy": ENUM("SingleStack", "PreferDualStack", "RequireDualStack"), "ipFamilies": [ENUM("IPv4", "IPv6")],
        "trafficDistribution": "str"}},
    ("apps/v1", "StatefulSet"): {"!spec": {
        "!selector": SELECTOR, "!template": TEMPLATE, "serviceName": "str", "replicas": "int",
        "podManagementPolicy": ENUM("OrderedReady", "Parallel"), "updateStrategy": "any",
        "volumeClaimTemplates": [{"!metadata": OBJMETA, "!spec": PVC_SPEC}], "revisionHistoryLimit": "int",
        "minReadySeconds": "int", "persistentVolumeClaimRetentionPolicy": "any", "ordinals": "any"}},
    ("apps/v1", "Deployment"): {"!spec": {
        "!selector": SELECTOR, "!template": TEMPLATE, "replicas": "int", "strategy": "any",
        "revisionHistoryLimit": "int", "minReadySeconds": "int", "progressDeadlineSeconds": "int", "paused": "bool"}},
    ("rbac.authorization.k8s.io/v1", "Role"): {"rules": [{"!verbs": ["str"], "apiGroups": ["str"], "resources": ["str"], "resourceNames": ["str"]}]},
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): {
        "!roleRef": {"!apiGroup": ENUM("rbac.authorization.k8s.io"), "!kind": ENUM("Role", "ClusterRole"), "!name": "str"},
        "subjects": [{"!kind": ENUM("User", "Group", "ServiceAccount"), "!name": "str", "namespace": "str", "apiGroup": "str"}]},
}

QTY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+)?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RBAC_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection", "*",
              "impersonate", "bind", "escalate", "use", "approve", "sign"}


def tname(v):
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping", type(None): "null"}.get(type(v), type(v).__name__)


def check(value, typ, path, err):
    if typ == "any":
        return
    if isinstance(typ, tuple) and typ[0] == "enum":
        if value not in typ[1:]:
            err(f"{path}: {value!r} is not one of {', '.join(map(str, typ[1:]))}")
        return
    if typ == "str":
        if not isinstance(value, str):
            err(f"{path}: expected a string, got {tname(value)} {value!r}")
    elif typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            err(f"{path}: expected an integer, got {tname(value)} {value!r}")
    elif typ == "bool":
        if not isinstance(value, bool):
            err(f"{path}: expected true or false, got {tname(value)} {value!r}")
    elif typ == "intstr":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            err(f"{path}: expected a port number or name, got {tname(value)} {value!r}")
        elif isinstance(value, int) and not 1 <= value <= 65535:
            err(f"{path}: port {value} is out of range 1-65535")
    elif typ == "qty":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not QTY.match(str(value)):
            err(f"{path}: {value!r} is not a resource quantity (e.g. 100m, 64Mi, 1Gi)")
    elif typ in ("strmap", "qtymap"):
        if not isinstance(value, dict):
            err(f"{path}: expected a mapping, got {tname(value)}")
            return
        for k, v in value.items():
            if not isinstance(k, str):
                err(f"{path}: key {k!r} must be a string")
            check(v, "qty" if typ == "qtymap" else "str", f"{path}.{k}", err)
    elif isinstance(typ, list):
        if not isinstance(value, list):
            err(f"{path}: expected a list, got {tname(value)}")
            return
        for i, item in enumerate(value):
            check(item, typ[0], f"{path}[{i}]", err)
    elif isinstance(typ, dict):
        if not isinstance(value, dict):
            err(f"{path}: expected a mapping, got {tname(value)}")
            return
        known = {k.lstrip("!"): t for k, t in typ.items()}
        for k in typ:
            if k.startswith("!") and value.get(k[1:]) is None:
                err(f"{path + '.' if path else ''}{k[1:]}: required field is missing")
        for k, v in value.items():
            if k not in known:
                err(f"{path + '.' if path else ''}{k}: unknown field")
            elif v is not None:
                check(v, known[k], f"{path}.{k}" if path else k, err)
    else:
        raise AssertionError(typ)


UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def qty(v):
    m = re.match(r"^\+?([0-9.]+)([a-zA-Z]*|[eE][+-]?[0-9]+)$", str(v))
    if not m:
        return None
    num, unit = m.groups()
    if unit[:1] in ("e", "E") and unit[1:].lstrip("+-").isdigit():
        return float(num + unit)
    return float(num) * UNITS[unit] if unit in UNITS else None


def labels_ok(labels, path, err):
    for k, v in (labels or {}).items():
        name = str(k).split("/")[-1]
        if not (len(name) <= 63 and LABEL_VALUE.match(name) and name):
            err(f"{path}: invalid label key {k!r}")
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            err(f"{path}.{k}: invalid label value {v!r} (63 characters of [A-Za-z0-9-_.], quoted if it looks like a number or boolean)")


def pod_checks(spec, path, err, volume_claims=()):
    volumes = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)} | set(volume_claims)
    for i, c in enumerate((spec.get("containers") or []) + (spec.get("initContainers") or [])):
        if not isinstance(c, dict):
            continue
        cpath = f"{path}.containers[{c.get('name', i)}]"
        names = []
        for p in c.get("ports") or []:
            n = p.get("name") if isinstance(p, dict) else None
            if n is None:
                continue
            if not (isinstance(n, str) and len(n) <= 15 and PORT_NAME.match(n) and re.search("[a-z]", n)):
                err(f"{cpath}.ports: invalid port name {n!r} (at most 15 lowercase letters, digits and '-', one letter)")
            if n in names:
                err(f"{cpath}.ports: port name {n!r} is used twice")
            names.append(n)
            if isinstance(p.get("containerPort"), int) and not 1 <= p["containerPort"] <= 65535:
                err(f"{cpath}.ports[{n}].containerPort: out of range 1-65535")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            pr = c.get(probe)
            if isinstance(pr, dict):
                handlers = [h for h in ("httpGet", "tcpSocket", "grpc", "exec") if h in pr]
                if len(handlers) != 1:
                    err(f"{cpath}.{probe}: needs exactly one of httpGet, tcpSocket, grpc, exec")
                for h in ("httpGet", "tcpSocket"):
                    port = (pr.get(h) or {}).get("port") if isinstance(pr.get(h), dict) else None
                    if isinstance(port, str) and port not in names:
                        err(f"{cpath}.{probe}.{h}.port: no container port is named {port!r}")
        env = []
        for e in c.get("env") or []:
            if isinstance(e, dict):
                if "value" in e and "valueFrom" in e:
                    err(f"{cpath}.env[{e.get('name')}]: value and valueFrom are exclusive")
                env.append(e.get("name"))
        for field in ("command", "args"):
            for j, a in enumerate(c.get(field) or []):
                for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
                    if var not in env:
                        err(f"{cpath}.{field}[{j}]: $({var}) is not an env var of this container, so Kubernetes leaves it unexpanded")
        for m in c.get("volumeMounts") or []:
            if isinstance(m, dict) and m.get("name") not in volumes:
                err(f"{cpath}.volumeMounts[{m.get('name')}]: no volume (or volumeClaimTemplate) has this name")
        res = c.get("resources") or {}
        if isinstance(res, dict):
            for r, req in (res.get("requests") or {}).items():
                lim = (res.get("limits") or {}).get(r)
                if lim is not None and qty(req) is not None and qty(lim) is not None and qty(req) > qty(lim):
                    err(f"{cpath}.resources: requests.{r} {req} is above limits.{r} {lim}")
    return None


objects = []  # (file, doc index, obj)
for f in sys.argv[1:]:
    try:
        with open(f, encoding="utf-8") as fh:
            docs = list(yaml.safe_load_all(fh))
    except yaml.YAMLError as e:
        errors.append(f"{f}: not valid YAML: {e}".replace("\n", " "))
        continue
    n = 0
    for i, doc in enumerate(docs, 1):
        if doc is None:
            continue  # an empty or all-comment document
        n += 1
        where = f"{f}: document {i}"
        if not isinstance(doc, dict):
            errors.append(f"{where}: expected a mapping (a Kubernetes object), got {tname(doc)}")
            continue
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        where = f"{f}: document {i} ({kind or '?'} {name or '?'})"
        err = lambda msg, where=where: errors.append(f"{where}: {msg}")
        if not api or not kind:
            err("apiVersion and kind are required")
            continue
        spec = KINDS.get((api, kind))
        if spec is None:
            known = sorted(f"{a} {k}" for a, k in KINDS if k == kind)
            err(f"unknown apiVersion/kind {api} {kind}" + (f" (expected {', '.join(known)})" if known else " (not a kind this script knows; add it to KINDS)"))
            continue
        top = {"!apiVersion": "str", "!kind": "str", "!metadata": {**OBJMETA, "!name": "str"}, **spec}
        check(doc, top, "", err)
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        if isinstance(name, str):
            pattern, what = (DNS1035_LABEL, "an RFC 1035 label") if kind == "Service" else \
                (DNS1123_LABEL, "an RFC 1123 label") if kind in ("Namespace", "StatefulSet") else \
                (DNS1123_SUBDOMAIN, "an RFC 1123 subdomain")
            if len(name) > (63 if pattern is not DNS1123_SUBDOMAIN else 253) or not pattern.match(name):
                err(f"metadata.name {name!r} must be {what} (lowercase letters, digits, '-')")
        if isinstance(meta.get("namespace"), str) and not DNS1123_LABEL.match(meta["namespace"]):
            err(f"metadata.namespace {meta['namespace']!r} is not a valid namespace name")
        if isinstance(meta.get("labels"), dict):
            labels_ok(meta["labels"], "metadata.labels", err)
        objects.append((f, i, doc, err))
    if n == 0:
        errors.append(f"{f}: no Kubernetes objects in this file")

# Per-kind consistency checks.
workloads = []
ids = {}
for f, i, doc, err in objects:
    kind = doc["kind"]
    meta = doc.get("metadata") or {}
    key = (doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else "", kind, meta.get("namespace"), meta.get("name"))
    if key in ids:
        err(f"the same object is also defined in {ids[key]}")
    ids[key] = f"{f} document {i}"
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if kind in ("Deployment", "StatefulSet"):
        tmpl = spec.get("template") if isinstance(spec.get("template"), dict) else {}
        tlabels = (tmpl.get("metadata") or {}).get("labels") or {}
        labels_ok(tlabels, "spec.template.metadata.labels", err)
        sel = (spec.get("selector") or {}).get("matchLabels") or {} if isinstance(spec.get("selector"), dict) else {}
        if not sel and not (spec.get("selector") or {}).get("matchExpressions"):
            err("spec.selector must select something")
        for k, v in sel.items():
            if tlabels.get(k) != v:
                err(f"spec.selector.matchLabels.{k}={v} does not match the pod template's labels {tlabels}")
        claims = [((c or {}).get("metadata") or {}).get("name") for c in spec.get("volumeClaimTemplates") or [] if isinstance(c, dict)]
        if isinstance(tmpl.get("spec"), dict):
            pod_checks(tmpl["spec"], "spec.template.spec", err, claims)
        if kind == "StatefulSet" and not spec.get("serviceName"):
            err("spec.serviceName: name the (headless) Service that gives the pods their DNS names")
        workloads.append((meta.get("namespace"), tlabels, tmpl.get("spec") or {}))
    elif kind == "Role":
        for j, rule in enumerate(doc.get("rules") or []):
            if not isinstance(rule, dict):
                continue
            for v in rule.get("verbs") or []:
                if v not in RBAC_VERBS:
                    err(f"rules[{j}].verbs: unknown verb {v!r}")
            if "apiGroups" not in rule or "resources" not in rule:
                err(f"rules[{j}]: a Role rule needs apiGroups and resources")
    elif kind == "RoleBinding":
        for j, s in enumerate(doc.get("subjects") or []):
            if isinstance(s, dict) and s.get("kind") == "ServiceAccount" and not s.get("namespace"):
                err(f"subjects[{j}]: a ServiceAccount subject needs a namespace")
    elif kind == "Secret":
        if doc.get("type") == "kubernetes.io/tls":
            keys = set(doc.get("data") or {}) | set(doc.get("stringData") or {})
            if not {"tls.crt", "tls.key"} <= keys:
                err("a kubernetes.io/tls Secret needs tls.crt and tls.key")

for f, i, doc, err in objects:
    if doc["kind"] != "Service":
        continue
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    typ = spec.get("type", "ClusterIP")
    if spec.get("externalTrafficPolicy") and typ not in ("NodePort", "LoadBalancer"):
        err("spec.externalTrafficPolicy only applies to NodePort and LoadBalancer Services")
    if typ != "ExternalName" and not spec.get("ports") and spec.get("clusterIP") != "None":
        err("spec.ports: a Service needs at least one port")
    pnames = []
    for p in spec.get("ports") or []:
        if not isinstance(p, dict):
            continue
        if isinstance(p.get("port"), int) and not 1 <= p["port"] <= 65535:
            err(f"spec.ports[{p.get('name')}].port: out of range 1-65535")
        if len(spec.get("ports")) > 1 and not p.get("name"):
            err("spec.ports: every port needs a name when there are several")
        if p.get("name") in pnames:
            err(f"spec.ports: port name {p.get('name')!r} is used twice")
        pnames.append(p.get("name"))
    sel = spec.get("selector") or {}
    ns = (doc.get("metadata") or {}).get("namespace")
    matches = [w for w in workloads if w[0] == ns and sel and all(w[1].get(k) == v for k, v in sel.items())]
    if sel and not matches and workloads:
        err(f"spec.selector {sel} matches no pod template in these files")
    for p in spec.get("ports") or []:
        tp = p.get("targetPort") if isinstance(p, dict) else None
        if isinstance(tp, str) and matches:
            declared = {q.get("name") for w in matches for c in w[2].get("containers") or [] for q in c.get("ports") or []}
            if tp not in declared:
                err(f"spec.ports[{p.get('name')}].targetPort: no container port is named {tp!r} in the selected pods")

for e in errors:
    print(f"INVALID {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

if [ "$status" -eq 0 ]; then
  echo "validate-manifests: ${#files[@]} file(s) valid: ${files[*]}"
else
  echo "validate-manifests: FAILED (see INVALID lines above)" >&2
fi
exit "$status"
