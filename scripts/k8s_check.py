#!/usr/bin/env python3
"""Offline validation of the Helm chart (charts/loyalty) and the plain manifests (k8s/).

Run by scripts/k8s-check, which provides the tools (helm, kubernetes-validate, PyYAML) in a
virtual environment. Every check prints what it checked; the first failure ends the run
with a non-zero exit code and says why.

  1. `helm lint --strict` with the default values and every charts/loyalty/ci/*.yaml;
  2. values the schema or the templates must refuse (wrong types, unknown keys, a grace
     period the kubelet would cut short) are refused, with the expected message;
  3. every rendering of the chart and every kustomization in k8s/ passes
     `kubernetes-validate --strict` for the oldest and newest Kubernetes we support;
  4. the rendered workloads carry what SREs rely on (probes, security, rollout, labels);
  5. the chart and k8s/ agree on ports, probes, security settings, rollout and config, on
     which components may reach Redis and ScyllaDB, and on the one-replica services;
  6. the real binary accepts the config.toml both produce (`loyalty config --config`);
  7. the Grafana dashboard parses, queries only metrics (and labels) the code defines, and
     the chart and k8s/overlays/production ship the same file in a ConfigMap.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "loyalty"
K8S = ROOT / "k8s"
DASHBOARD = CHART / "dashboards" / "loyalty.json"
DASHBOARD_COPY = K8S / "overlays" / "production" / "dashboards" / "loyalty.json"
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
# Kinds whose schemas come from operators' CRDs, not from Kubernetes itself.
CRD_KINDS = {"ServiceMonitor", "ScyllaCluster"}
SERVICES = ["identity", "balance", "promotion", "segmentation", "reporting"]
# Services whose state is in embedded files under /data: one replica, no autoscaler.
SINGLE_REPLICA = ["identity", "promotion", "segmentation", "reporting"]
# Those whose /data is a PersistentVolumeClaim by default (and so roll with Recreate).
PERSISTENT = ["identity", "promotion", "segmentation"]
# Who reaches which store in the microservices profile: Redis holds balance's hot state and
# the event streams (identity and promotion append, segmentation and reporting consume);
# ScyllaDB holds the ledger (balance) and reporting's facts, and gets its schema from the migrate Job.
REDIS_CLIENTS = {"identity", "balance", "promotion", "segmentation", "reporting"}
SCYLLA_CLIENTS = {"balance", "reporting", "migrate"}

HELM = os.environ.get("HELM", "helm")
VALIDATE = os.environ.get("KUBERNETES_VALIDATE", "kubernetes-validate")
LOYALTY = os.environ.get("LOYALTY_BIN")


class CheckFailed(Exception):
    pass


def fail(msg: str) -> None:
    raise CheckFailed(msg)


def ok(msg: str) -> None:
    print(f"  ok  {msg}")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------- helm


def helm_template(values: dict | None = None, sets: list[str] | None = None) -> list[dict]:
    cmd = [HELM, "template", "loyalty", str(CHART), "--namespace", "loyalty"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values or {}, f)
        path = f.name
    try:
        cmd += ["-f", path]
        for s in sets or []:
            cmd += ["--set", s]
        out = run(cmd)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        fail(f"helm template {sets or values} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def lint_cases() -> None:
    print("==> helm lint --strict")
    out = run([HELM, "lint", "--strict", str(CHART)])
    if out.returncode != 0:
        fail(f"helm lint (default values):\n{out.stdout}{out.stderr}")
    ok("default values")
    for ci in sorted((CHART / "ci").glob("*.yaml")):
        out = run([HELM, "lint", "--strict", str(CHART), "-f", str(ci)])
        if out.returncode != 0:
            fail(f"helm lint -f {ci.name}:\n{out.stdout}{out.stderr}")
        ok(f"values {ci.relative_to(ROOT)}")


# Values the chart must refuse, and a piece of the message that says why.
NEGATIVE = [
    (["bogus=1"], "Additional property bogus is not allowed"),
    (["services.balance.replicas=three"], "services.balance.replicas: Invalid type"),
    (["services.balance.autoscaling.enabled=maybe"], "Invalid type"),
    (["services.billing.enabled=true"], "Additional property billing is not allowed"),
    (["image.pullPolicy=Sometimes"], "image.pullPolicy must be one of"),
    (["profile=staging"], "profile must be one of"),
    (["ports.grpc=70000"], "Must be less than or equal to 65535"),
    (["redis.url=http://redis:6379"], "redis.url: Does not match pattern"),
    (["scylla.keyspace=bad-name"], "scylla.keyspace: Does not match pattern"),
    (["services.identity.persistence.size=lots"], "Does not match pattern"),
    (["scylla.nodes=null"], "nodes is required"),
    (["scylla.nodes[0]=scylla"], "Does not match pattern"),
    (["config.server.gracePeriodSeconds=null"], "gracePeriodSeconds is required"),
    (["config.log.format=xml"], "config.log.format must be one of"),
    (["config.tracing.sampleRatio=2"], "Must be less than or equal to 1"),
    (["config.tracing.otlpEndpoint=collector:4317"], "otlpEndpoint: Does not match pattern"),
    (["config.metrics.otlpEndpoint=collector:4317"], "otlpEndpoint: Does not match pattern"),
    (["config.metrics.exportIntervalMs=10"], "Must be greater than or equal to 100"),
    (["auth.serviceKey=short"], "Does not match pattern"),
    (["config.auth.cacheTtlSeconds=7200"], "Must be less than or equal to 3600"),
    (["config.rateLimits.perKey=-1"], "Must be greater than or equal to 0"),
    (["config.rateLimits.burstSeconds=0"], "Must be greater than 0"),
    (["config.rateLimits.tenants.acme=lots"], "Invalid type"),
    (["config.server.maxMessageBytes=10"], "Must be greater than or equal to 1024"),
    (["config.identity.defaultRegion=kz"], "Does not match pattern"),
    (["services.identity.resources.requests.cpu=lots"], "cpu"),
    (["networkPolicy.grpcFrom=everyone"], "networkPolicy.grpcFrom: Invalid type"),
    (["topologySpread.zone.whenUnsatisfiable=Sometimes"], "whenUnsatisfiable must be one of"),
    (["serviceMonitor.interval=often"], "serviceMonitor.interval: Does not match pattern"),
    (["grafanaDashboard.enabled=maybe"], "grafanaDashboard.enabled: Invalid type"),
    (["grafanaDashboard.folder=Loyalty"], "Additional property folder is not allowed"),
    (["tls.clientCertificates=sometimes"], "tls.clientCertificates must be one of"),
    (["tls.enabled=yes"], "tls.enabled: Invalid type"),
    # Rules the schema cannot express, enforced by the templates (`helm lint` reports a
    # template's `fail` only as INFO, so these are checked with `helm template` alone).
    (
        ["terminationGracePeriodSeconds=20"],
        "terminationGracePeriodSeconds (20) must exceed",
    ),
    (
        ["profile=dev", "terminationGracePeriodSeconds=25"],
        "terminationGracePeriodSeconds (25) must exceed",
    ),
    (["services.identity.replicas=2"], "services.identity runs one replica"),
    (["tls.enabled=true"], "tls.enabled needs tls.secretName"),
    (["services.promotion.autoscaling.enabled=true"], "services.promotion runs one replica"),
    (["services.segmentation.replicas=2"], "services.segmentation runs one replica"),
    (["services.segmentation.autoscaling.enabled=true"], "services.segmentation runs one replica"),
    (["services.reporting.replicas=2"], "services.reporting runs one replica"),
    (["config.segmentation.reevaluateIntervalMs=-1"], "Must be greater than or equal to 0"),
    (["config.segmentation.rfmIntervalMs=-5"], "Must be greater than or equal to 0"),
    (["config.segmentation.everyMs=1"], "Additional property everyMs is not allowed"),
    (
        ["services.balance.autoscaling.minReplicas=9", "services.balance.autoscaling.maxReplicas=3"],
        "services.balance.autoscaling.minReplicas exceeds maxReplicas",
    ),
]


def negative_cases() -> None:
    print("==> values the chart refuses")
    for sets, expected in NEGATIVE:
        cmd = [HELM, "template", "loyalty", str(CHART)]
        for s in sets:
            cmd += ["--set", s]
        out = run(cmd)
        if out.returncode == 0:
            fail(f"the chart accepted {sets}; it must refuse them ({expected})")
        if expected not in out.stderr:
            fail(f"refusing {sets} did not say {expected!r}:\n{out.stderr}")
        lint = run([HELM, "lint", "--strict", str(CHART)] + [a for s in sets for a in ("--set", s)])
        if not any(m in expected for m in ("must exceed", "exceeds", "one replica", "needs tls")) and lint.returncode == 0:
            fail(f"helm lint accepted {sets}")
        ok(f"{' '.join(sets)} -> {expected}")


# ---------------------------------------------------------------- kustomize (the subset k8s/ uses)


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "replicas",
    "patches",
    "configMapGenerator",
}
# What a configMapGenerator entry, and its `options`, may say.
GENERATOR_KEYS = {"name", "files", "options"}
GENERATOR_OPTIONS = {"labels", "disableNameSuffixHash"}


def kustomize(directory: Path) -> list[dict]:
    """Builds a kustomization: the subset of kustomize's features k8s/ uses. Anything else
    in a kustomization.yaml is an error here, so the check never silently ignores a field."""
    kfile = directory / "kustomization.yaml"
    if not kfile.exists():
        fail(f"{directory.relative_to(ROOT)} has no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        fail(f"{kfile.relative_to(ROOT)} uses {sorted(unknown)}, which the offline build does not implement")
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        objs += kustomize(path) if path.is_dir() else load_docs(path)
    renames: dict[str, str] = {}
    for gen in k.get("configMapGenerator", []):
        unknown = set(gen) - GENERATOR_KEYS
        options = gen.get("options") or {}
        unknown |= {f"options.{o}" for o in set(options) - GENERATOR_OPTIONS}
        if unknown:
            fail(
                f"{kfile.relative_to(ROOT)}: configMapGenerator {gen.get('name')} uses {sorted(unknown)}, "
                "which the offline build does not implement"
            )
        data = {}
        for f in gen.get("files", []):
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (directory / (src or f)).read_text()
        if options.get("disableNameSuffixHash"):
            name = gen["name"]
        else:
            body = json.dumps({"kind": "ConfigMap", "name": gen["name"], "data": data}, sort_keys=True)
            name = f"{gen['name']}-{hashlib.sha256(body.encode()).hexdigest()[:10]}"
        renames[gen["name"]] = name
        metadata = {"name": name}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for o in objs:
        for vol in pod_spec(o).get("volumes", []) if pod_spec(o) else []:
            cm = vol.get("configMap")
            if cm and cm.get("name") in renames:
                cm["name"] = renames[cm["name"]]
    for patch in k.get("patches", []):
        target = patch.get("target", {})
        body = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [
            o
            for o in objs
            if o["kind"] == target.get("kind", body.get("kind"))
            and o["metadata"]["name"] == target.get("name", body["metadata"]["name"])
        ]
        if not hits:
            fail(f"{kfile.relative_to(ROOT)}: patch {patch['path']} matches nothing")
        for o in hits:
            merge(o, body)
    for r in k.get("replicas", []):
        hits = [o for o in objs if o["metadata"]["name"] == r["name"] and "replicas" in o.get("spec", {})]
        if not hits:
            fail(f"{kfile.relative_to(ROOT)}: replicas for {r['name']} matches nothing")
        for o in hits:
            o["spec"]["replicas"] = r["count"]
    for img in k.get("images", []):
        for c in containers(objs):
            repo, _, tag = c["image"].partition(":")
            if repo == img["name"]:
                c["image"] = f"{img.get('newName', repo)}:{img.get('newTag', tag)}"
    for label in k.get("labels", []):
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(label["pairs"])
            if label.get("includeSelectors"):
                fail("labels with includeSelectors are not implemented by the offline build")
            if label.get("includeTemplates") and pod_template(o):
                pod_template(o)["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in k:
        for o in objs:
            if o["kind"] != "Namespace":
                o["metadata"]["namespace"] = k["namespace"]
    return objs


def merge(base: dict, patch: dict) -> None:
    """Strategic merge for the shapes k8s/ patches: maps merge, lists of named items merge
    by name, other lists are replaced, and `null` deletes a key."""
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif (
            isinstance(value, list)
            and isinstance(base.get(key), list)
            and value
            and all(isinstance(v, dict) and "name" in v for v in value)
        ):
            by_name = {item.get("name"): item for item in base[key] if isinstance(item, dict)}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def pod_template(o: dict) -> dict | None:
    spec = o.get("spec", {})
    if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return spec.get("template")
    return None


def pod_spec(o: dict) -> dict | None:
    t = pod_template(o)
    return t.get("spec") if t else None


def containers(objs: list[dict]) -> list[dict]:
    return [c for o in objs if pod_spec(o) for c in pod_spec(o).get("containers", [])]


# ---------------------------------------------------------------- schema validation


def kube_validate(name: str, objs: list[dict]) -> None:
    crds = sorted({o["kind"] for o in objs if o["kind"] in CRD_KINDS})
    plain = [o for o in objs if o["kind"] not in CRD_KINDS]
    for o in objs:
        if o["kind"] in CRD_KINDS and not o.get("spec"):
            fail(f"{name}: {o['kind']} {o['metadata']['name']} has no spec")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(plain, f)
        path = f.name
    try:
        for version in KUBE_VERSIONS:
            out = run([VALIDATE, "--strict", "--quiet", "-k", version, path])
            if out.returncode != 0 or "ERROR" in out.stdout + out.stderr:
                fail(f"{name} does not validate against Kubernetes {version}:\n{out.stdout}{out.stderr}")
    finally:
        os.unlink(path)
    note = f"; CRD kinds checked for shape only: {', '.join(crds)}" if crds else ""
    ok(f"{name}: {len(plain)} objects valid (--strict) for Kubernetes {' and '.join(KUBE_VERSIONS)}{note}")


# ---------------------------------------------------------------- what SREs rely on


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def expect(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)


def workload_checks(name: str, objs: list[dict], grace_needed: int) -> None:
    workloads = by_kind(objs, "Deployment") + by_kind(objs, "StatefulSet")
    expect(workloads, f"{name}: no workloads rendered")
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    policies = by_kind(objs, "NetworkPolicy")
    expect(
        any(
            not p["spec"].get("ingress") and not p["spec"].get("egress")
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            for p in policies
        ),
        f"{name}: no deny-by-default NetworkPolicy",
    )
    for w in workloads:
        wname = w["metadata"]["name"]
        labels = w["metadata"]["labels"]
        for key in ("name", "instance", "component", "part-of", "version"):
            expect(f"app.kubernetes.io/{key}" in labels, f"{wname}: label app.kubernetes.io/{key} missing")
        spec = pod_spec(w)
        psc = spec["securityContext"]
        expect(psc.get("runAsNonRoot") is True, f"{wname}: pod may run as root")
        expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{wname}: seccomp")
        expect(spec.get("automountServiceAccountToken") is False, f"{wname}: mounts an API token")
        grace = spec["terminationGracePeriodSeconds"]
        for c in spec["containers"]:
            sc = c["securityContext"]
            expect(sc.get("readOnlyRootFilesystem") is True, f"{wname}: writable root filesystem")
            expect(sc.get("allowPrivilegeEscalation") is False, f"{wname}: privilege escalation")
            expect(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{wname}: capabilities not dropped")
            expect(sc.get("runAsNonRoot") is True, f"{wname}: container may run as root")
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            tls = any(m["name"] == "tls" for m in c.get("volumeMounts", []))
            expect(
                set(ports) == ({"grpc", "metrics", "health"} if tls else {"grpc", "metrics"}),
                f"{wname}: ports {ports}",
            )
            # The kubelet's gRPC probes cannot speak TLS: with it, they ask the health port.
            probe_port = ports["health"] if tls else ports["grpc"]
            for probe, service in (
                ("startupProbe", "liveness"),
                ("livenessProbe", "liveness"),
                ("readinessProbe", ""),
            ):
                g = c[probe].get("grpc")
                expect(g is not None, f"{wname}: {probe} is not a native gRPC probe")
                expect(g["port"] == probe_port, f"{wname}: {probe} on port {g['port']}")
                expect(g.get("service", "") == service, f"{wname}: {probe} asks for {g.get('service')!r}")
            sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            expect(grace > sleep + grace_needed, f"{wname}: grace {grace} <= preStop {sleep} + drain {grace_needed}")
        if w["kind"] == "Deployment":
            strategy = w["spec"]["strategy"]
            component = labels["app.kubernetes.io/component"]
            if component == "reporting":
                # Its rollups are built in memory at start: a surged new pod would miss what
                # the old one still takes in.
                expect(strategy["type"] == "Recreate", f"{wname}: reporting rolls with {strategy['type']}")
            elif strategy["type"] == "Recreate":
                # Only a pod whose /data is a claim (one node at a time) is replaced, not surged.
                claims = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
                expect(claims, f"{wname}: Recreate without a PersistentVolumeClaim")
            else:
                ru = strategy["rollingUpdate"]
                expect(ru["maxUnavailable"] == 0, f"{wname}: maxUnavailable {ru['maxUnavailable']}")
            expect(spec.get("topologySpreadConstraints"), f"{wname}: no topology spread")
        annotations = pod_template(w)["metadata"].get("annotations", {})
        volumes = [v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v]
        expect(
            "checksum/config" in annotations or any(len(n.rsplit("-", 1)[-1]) == 10 for n in volumes),
            f"{wname}: pods do not roll when the config changes",
        )
        component = labels["app.kubernetes.io/component"]
        for svc_name in (wname, f"{wname}-headless"):
            expect(svc_name in services, f"{wname}: Service {svc_name} missing")
        expect(services[f"{wname}-headless"]["spec"].get("clusterIP") == "None", f"{wname}: headless Service is not headless")
        expect(
            any(p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component for p in policies),
            f"{wname}: no NetworkPolicy for {component}",
        )
    ok(f"{name}: probes, security, rollout, labels, Services and NetworkPolicies of {len(workloads)} workloads")


def config_of(objs: list[dict]) -> str:
    maps = [m for m in by_kind(objs, "ConfigMap") if "config.toml" in m.get("data", {})
            and "migrate" not in m["metadata"]["name"]]
    expect(len(maps) == 1, f"expected one config ConfigMap, found {[m['metadata']['name'] for m in maps]}")
    return maps[0]["data"]["config.toml"]


def binary_accepts(name: str, config: str) -> None:
    if not LOYALTY:
        fail("LOYALTY_BIN is not set: cannot check that the binary accepts the rendered config")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config)
        path = f.name
    env = {"PATH": os.environ.get("PATH", ""), "LOYALTY_STORAGE__REDIS__URL": "redis://:secret@redis:6379/"}
    try:
        out = run([LOYALTY, "config", "--config", path], env=env)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        fail(f"loyalty refuses the config.toml of {name}:\n{out.stderr}")
    expect("secret" not in out.stdout, f"loyalty config printed the Redis password for {name}")
    ok(f"loyalty config accepts the config.toml of {name}")


# ---------------------------------------------------------------- stores and replicas


def shared_store_checks(redis_port: int) -> None:
    """With `services.<name>.store: redis`, identity, promotion and segmentation scale out:
    replicas and an autoscaler, a rolling update, no volume claim, Redis egress and
    `store = "redis"` in their config sections."""
    for name in ("identity", "promotion", "segmentation"):
        objs = helm_template(
            sets=[
                f"services.{name}.store=redis",
                f"services.{name}.replicas=3",
                f"services.{name}.autoscaling.enabled=true",
            ]
        )
        d = next(
            d for d in by_kind(objs, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == name
        )
        expect(d["spec"]["strategy"]["type"] == "RollingUpdate", f"shared {name} rolls with {d['spec']['strategy']}")
        claims = {c["metadata"]["name"] for c in by_kind(objs, "PersistentVolumeClaim")}
        expect(not any(name in c for c in claims), f"shared {name} still claims a volume: {claims}")
        volumes = {v["name"]: v for v in pod_spec(d).get("volumes", [])}
        expect("emptyDir" in volumes.get("data", {}), f"shared {name} has no emptyDir /data")
        scaled = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(objs, "HorizontalPodAutoscaler")}
        expect(d["metadata"]["name"] in scaled, f"shared {name} has no HorizontalPodAutoscaler")
        expect(redis_port in egress_ports(objs).get(name, set()), f"shared {name} may not reach Redis")
        config = config_of(objs)
        section = config.split(f"[{name}]", 1)[1].split("\n[", 1)[0]
        expect('store = "redis"' in section, f"config.toml does not put {name} on Redis:\n{section}")
        binary_accepts(f"chart ({name} on Redis)", config)
        ok(f"chart ({name} on Redis): replicas and HPA, RollingUpdate, no claim, Redis egress, store = \"redis\"")



def egress_ports(objs: list[dict]) -> dict[str, set[int]]:
    """The TCP/UDP ports each component's NetworkPolicy lets it reach."""
    out: dict[str, set[int]] = {}
    for p in by_kind(objs, "NetworkPolicy"):
        component = p["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if not component:
            continue
        ports = out.setdefault(component, set())
        for rule in p["spec"].get("egress") or []:
            ports |= {int(port["port"]) for port in rule.get("ports", [])}
    return out


def store_checks(name: str, objs: list[dict], redis_port: int, scylla_ports: list[int]) -> None:
    """Only the components that use a store may reach it, and the one-replica services
    have one replica and no autoscaler."""
    egress = egress_ports(objs)
    for component, ports in sorted(egress.items()):
        reaches_redis = redis_port in ports
        reaches_scylla = bool(set(scylla_ports) & ports)
        expect(
            reaches_redis == (component in REDIS_CLIENTS),
            f"{name}: {component} {'may' if reaches_redis else 'may not'} reach Redis ({redis_port})",
        )
        expect(
            reaches_scylla == (component in SCYLLA_CLIENTS)
            and (not reaches_scylla or set(scylla_ports) <= ports),
            f"{name}: {component} reaches ScyllaDB ports {sorted(set(scylla_ports) & ports)}",
        )
    missing = (REDIS_CLIENTS | SCYLLA_CLIENTS) - set(egress)
    expect(not missing, f"{name}: no NetworkPolicy for {sorted(missing)}")
    deployments = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(objs, "Deployment")
    }
    scaled = {
        h["spec"]["scaleTargetRef"]["name"] for h in by_kind(objs, "HorizontalPodAutoscaler")
    }
    claims = {c["metadata"]["name"] for c in by_kind(objs, "PersistentVolumeClaim")}
    for component in SINGLE_REPLICA:
        d = deployments.get(component)
        expect(d is not None, f"{name}: no Deployment for {component}")
        expect(d["spec"].get("replicas") == 1, f"{name}: {component} has replicas {d['spec'].get('replicas')}, not 1")
        expect(d["metadata"]["name"] not in scaled, f"{name}: {component} has a HorizontalPodAutoscaler")
        mounts = {m["mountPath"]: m["name"] for m in pod_spec(d)["containers"][0].get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod_spec(d).get("volumes", [])}
        data = volumes.get(mounts.get("/data", ""), {})
        if component in PERSISTENT:
            claim = data.get("persistentVolumeClaim", {}).get("claimName")
            expect(
                claim in claims and d["spec"]["strategy"]["type"] == "Recreate",
                f"{name}: {component}'s /data is not its PersistentVolumeClaim with strategy Recreate",
            )
        else:
            expect("emptyDir" in data, f"{name}: {component} has no writable /data (emptyDir)")
    ok(
        f"{name}: Redis egress only for {', '.join(sorted(REDIS_CLIENTS))}; ScyllaDB only for "
        f"{', '.join(sorted(SCYLLA_CLIENTS))}; {', '.join(SINGLE_REPLICA)}: one replica, no HPA; "
        f"/data a claim (Recreate) for {', '.join(PERSISTENT)}"
    )


# ---------------------------------------------------------------- chart and k8s/ agree


def comparable(w: dict) -> dict:
    spec = pod_spec(w)
    c = spec["containers"][0]
    keep = ("ports", "startupProbe", "livenessProbe", "readinessProbe", "lifecycle", "securityContext", "args", "env")
    out = {k: c.get(k) for k in keep}
    out["podSecurityContext"] = spec.get("securityContext")
    out["terminationGracePeriodSeconds"] = spec.get("terminationGracePeriodSeconds")
    out["automountServiceAccountToken"] = spec.get("automountServiceAccountToken")
    out["mounts"] = sorted(m["mountPath"] for m in c.get("volumeMounts", []))
    if w["kind"] == "Deployment":
        out["strategy"] = w["spec"]["strategy"]
    return out


def diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: chart {a!r} vs k8s {b!r}"]


def agree(name: str, chart: list[dict], plain: list[dict]) -> None:
    def workloads(objs):
        return {
            w["metadata"]["labels"]["app.kubernetes.io/component"]: w
            for w in by_kind(objs, "Deployment") + by_kind(objs, "StatefulSet")
        }

    cw, kw = workloads(chart), workloads(plain)
    expect(set(cw) == set(kw), f"{name}: chart runs {sorted(cw)}, k8s/ runs {sorted(kw)}")
    problems = []
    for component in sorted(cw):
        problems += [f"{component}{d}" for d in diff(comparable(cw[component]), comparable(kw[component]))]

    def service_ports(objs):
        return {
            s["metadata"]["name"].removeprefix("loyalty-"): sorted((p["name"], p["port"]) for p in s["spec"]["ports"])
            for s in by_kind(objs, "Service")
        }

    problems += diff(service_ports(chart), service_ports(plain), ".services")
    problems += diff(
        {c: sorted(p) for c, p in egress_ports(chart).items()},
        {c: sorted(p) for c, p in egress_ports(plain).items()},
        ".egress",
    )
    chart_toml, plain_toml = tomllib.loads(config_of(chart)), tomllib.loads(config_of(plain))
    problems += diff(chart_toml, plain_toml, ".config.toml")
    if problems:
        fail(f"{name}: the chart and k8s/ disagree:\n  " + "\n  ".join(problems))
    ok(f"{name}: chart and k8s/ agree on ports, probes, security, rollout, args and config.toml")


# ---------------------------------------------------------------- the image


def dockerfile_checks(values: dict) -> None:
    """No container engine runs here, so the Dockerfile is checked for what the chart
    relies on: a multi-stage build, a runtime stage without a shell, the same non-root user
    as the pods' security context, the ports, and `loyalty` as entrypoint."""
    print("==> the Dockerfile and the chart agree")
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    stages = [line for line in lines if line.upper().startswith("FROM ")]
    expect(len(stages) >= 2, "the Dockerfile is not a multi-stage build")
    runtime = lines[lines.index(stages[-1]):]
    expect("distroless" in stages[-1], f"the runtime stage {stages[-1]!r} is not distroless (no shell)")
    expect(not any(line.upper().startswith("RUN ") for line in runtime), "the runtime stage runs commands")
    user = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    expect(user == ["65532:65532"], f"the image runs as {user}, the pods as 65532:65532")
    exposed = {int(p) for line in runtime if line.upper().startswith("EXPOSE ") for p in line.split()[1:]}
    expect(exposed == {values["ports"]["grpc"], values["ports"]["metrics"]}, f"the image exposes {exposed}")
    entry = [line for line in runtime if line.upper().startswith("ENTRYPOINT ")]
    expect(entry and json.loads(entry[0].split(None, 1)[1]) == ["/usr/local/bin/loyalty"], f"entrypoint {entry}")
    ok("multi-stage, distroless runtime, user 65532, ports and entrypoint match the chart")


# ---------------------------------------------------------------- the Grafana dashboard


# Labels Prometheus (and the ServiceMonitors) put on every scraped series.
TARGET_LABELS = {"namespace", "service", "pod", "instance", "job", "container", "endpoint"}
# Series Prometheus records itself for every scrape target.
SCRAPE_SERIES = {"up"}
# Words of PromQL that look like names: keywords and operators.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
STRING = r'"(?:[^"\\]|\\.)*"'
NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"


def code_metrics() -> dict[str, dict]:
    """The metrics the Rust code defines (`counter!`, `gauge!`, `histogram!` under
    services/), with their labels and the string literals of the files that record them."""
    found: dict[str, dict] = {}
    call = re.compile(r"\b(counter|gauge|histogram)!\(\s*\"([^\"]+)\"")
    for path in sorted((ROOT / "services").rglob("*.rs")):
        text = path.read_text()
        for m in call.finditer(text):
            depth, end = 1, m.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            args = text[m.end():end]
            entry = found.setdefault(m.group(2), {"type": m.group(1), "labels": set(), "literals": set()})
            expect(entry["type"] == m.group(1), f"{m.group(2)} is both a {entry['type']} and a {m.group(1)}")
            entry["labels"] |= set(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"\s*=>', args))
            entry["literals"] |= set(re.findall(r'"([^"\\]*)"', text))
    expect(found, "no counter!/gauge!/histogram! found under services/")
    return found


def series_of(metrics: dict[str, dict]) -> dict[str, tuple[set, set]]:
    """Every series name Prometheus can hold for the code's metrics (a histogram's _bucket,
    _sum and _count, not its bare name), with its labels and allowed literal values."""
    series: dict[str, tuple[set, set]] = {}
    for name, m in metrics.items():
        if m["type"] == "histogram":
            series[f"{name}_bucket"] = (m["labels"] | {"le"}, m["literals"])
            series[f"{name}_sum"] = (m["labels"], m["literals"])
            series[f"{name}_count"] = (m["labels"], m["literals"])
        else:
            series[name] = (m["labels"], m["literals"])
    for name in SCRAPE_SERIES:
        series[name] = (set(), set())
    return series


def promql_names(expr: str) -> tuple[list[str], list[str]]:
    """The metric names and the grouping labels (by, without, on, ignoring) of a PromQL
    expression."""
    s = re.sub(STRING, '""', expr)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\{[^}]*\}", "", s)
    grouping = []
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        grouping += [g.strip() for g in m.group(2).split(",") if g.strip()]
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = []
    for m in re.finditer(NAME, s):
        if s[m.end():].lstrip().startswith("(") or m.group() in PROMQL_WORDS:
            continue  # a function call or a keyword
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # inside a number, e.g. 1e3
        names.append(m.group())
    return names, grouping


def dashboard_checks(everything: list[dict], default: list[dict], production: list[dict]) -> None:
    print("==> the Grafana dashboard")
    text = DASHBOARD.read_text()
    try:
        dash = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{DASHBOARD.relative_to(ROOT)} is not valid JSON: {e}")
    expect(dash.get("uid") == "loyalty-overview", f"dashboard uid {dash.get('uid')!r}")
    expect(dash.get("title") == "Loyalty engine", f"dashboard title {dash.get('title')!r}")
    expect(dash.get("tags") == ["loyalty"], f"dashboard tags {dash.get('tags')!r}")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    expect(set(variables) == {"datasource", "namespace", "service"}, f"dashboard variables {sorted(variables)}")
    expect(
        variables["datasource"].get("type") == "datasource" and variables["datasource"].get("query") == "prometheus",
        "the datasource variable does not pick a Prometheus data source",
    )
    panels = dash.get("panels", [])
    ids = [p.get("id") for p in panels]
    expect(len(ids) == len(set(ids)), f"dashboard panel ids repeat: {ids}")
    rows = [p["title"] for p in panels if p.get("type") == "row"]
    expect(rows == ["RED per RPC", "Business", "Pods"], f"dashboard rows {rows}")
    ok(f"{DASHBOARD.relative_to(ROOT)} parses: uid, title, tags, variables, rows {rows}")

    series = series_of(code_metrics())
    # (query, labels it reads): panel queries, and the selector of each label_values() variable.
    exprs: list[tuple[str, list[str]]] = []
    for v in variables.values():
        if v.get("type") == "query":
            m = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)", v.get("definition", ""))
            expect(m, f"dashboard variable {v['name']}: expected label_values(selector, label), got {v.get('definition')!r}")
            exprs.append((m.group(1), [m.group(2)]))
    for p in panels:
        if p.get("type") == "row":
            continue
        title = p.get("title")
        expect(p.get("description", "").strip(), f"dashboard panel {title!r} has no description")
        expect(p.get("datasource", {}).get("uid") == "${datasource}", f"dashboard panel {title!r}: datasource")
        targets = p.get("targets", [])
        expect(targets, f"dashboard panel {title!r} has no queries")
        for t in targets:
            expr = t.get("expr", "")
            expect('namespace="$namespace"' in expr, f"dashboard panel {title!r}: no namespace filter in {expr}")
            ranges = set(re.findall(r"\[([^\]]*)\]", re.sub(STRING, '""', expr)))
            expect(ranges <= {"$__rate_interval"}, f"dashboard panel {title!r}: ranges {sorted(ranges)}, use $__rate_interval")
            exprs.append((expr, []))
    used = set()
    for expr, reads in exprs:
        names, grouping = promql_names(expr)
        grouping += reads
        expect(names, f"dashboard query references no metric: {expr}")
        labels = set(TARGET_LABELS)
        for name in names:
            expect(name in series, f"dashboard query uses {name}, which the code does not export: {expr}")
            labels |= series[name][0]
            used.add(name)
        for label in grouping:
            expect(label in labels, f"dashboard query uses the label {label!r}, which {names} do not have: {expr}")
        for m in re.finditer(rf"({NAME})\s*\{{([^}}]*)\}}", expr):
            own, literals = series[m.group(1)]
            for mm in re.finditer(rf'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*({STRING})', m.group(2)):
                label, op, value = mm.group(1), mm.group(2), json.loads(mm.group(3))
                expect(label in own | TARGET_LABELS, f"dashboard query: {m.group(1)} has no label {label!r}: {expr}")
                if label in own and op in ("=", "!=") and "$" not in value:
                    expect(value in literals, f"dashboard query: {label}{op}{value!r} is a value the code never sets: {expr}")
    ok(f"every query uses metrics and labels the code defines: {', '.join(sorted(used))}")

    copy_text = DASHBOARD_COPY.read_text() if DASHBOARD_COPY.exists() else None
    expect(copy_text == text, f"{DASHBOARD_COPY.relative_to(ROOT)} differs from {DASHBOARD.relative_to(ROOT)}")
    json.loads(copy_text)
    ok(f"{DASHBOARD_COPY.relative_to(ROOT)} is identical")

    def dashboards(objs):
        return [m for m in by_kind(objs, "ConfigMap") if "loyalty.json" in m.get("data", {})]

    expect(not dashboards(default), "the chart renders the dashboard ConfigMap while grafanaDashboard.enabled is false")
    maps = dashboards(everything)
    expect(len(maps) == 1 and maps[0]["metadata"]["name"] == "loyalty-dashboard", "the chart renders no loyalty-dashboard ConfigMap")
    meta = maps[0]["metadata"]
    expect(meta["labels"].get("grafana_dashboard") == "1", f"chart dashboard labels {meta['labels']}")
    expect(meta["labels"].get("app.kubernetes.io/part-of") == "loyalty", f"chart dashboard labels {meta['labels']}")
    expect(meta.get("annotations", {}).get("grafana_folder") == "Loyalty", f"chart dashboard annotations {meta.get('annotations')}")
    expect(maps[0]["data"]["loyalty.json"] == text, "the chart's ConfigMap does not hold dashboards/loyalty.json as is")
    ok("the chart renders loyalty-dashboard (labels, annotations, the file as is) only when enabled")

    maps = dashboards(production)
    expect(len(maps) == 1, "k8s/overlays/production has no dashboard ConfigMap")
    meta = maps[0]["metadata"]
    expect(meta["name"] == "loyalty-dashboard" and meta.get("namespace") == "loyalty", f"k8s dashboard ConfigMap {meta}")
    expect(meta.get("labels", {}).get("grafana_dashboard") == "1", f"k8s dashboard labels {meta.get('labels')}")
    expect(maps[0]["data"]["loyalty.json"] == text, "k8s/overlays/production's ConfigMap does not hold the dashboard as is")
    ok("k8s/overlays/production generates loyalty-dashboard with the same file")


# ---------------------------------------------------------------- main


def main() -> int:
    try:
        lint_cases()
        negative_cases()

        print("==> chart renderings")
        microservices = helm_template(sets=["fullnameOverride=loyalty"])
        dev = helm_template(sets=["fullnameOverride=loyalty", "profile=dev"])
        everything = helm_template(
            sets=[
                "serviceMonitor.enabled=true",
                "redis.clusterNodes[0]=redis://a:6379/",
                "services.balance.autoscaling.enabled=false",
                "config.tracing.otlpEndpoint=http://otel-collector.observability:4317",
                "config.metrics.otlpEndpoint=http://otel-collector.observability:4317",
                "image.digest=sha256:" + "0" * 64,
                "grafanaDashboard.enabled=true",
                "grafanaDashboard.annotations.grafana_folder=Loyalty",
                "config.rateLimits.perKey=500",
                "config.rateLimits.perTenant=20000",
                "config.rateLimits.tenants.acme=50000",
            ]
        )
        secured = helm_template(
            sets=[
                "fullnameOverride=loyalty",
                "tls.enabled=true",
                "tls.secretName=loyalty-tls",
                "tls.clientCertificates=required",
                "tls.metrics=true",
                "serviceMonitor.enabled=true",
            ]
        )
        secured_dev = helm_template(
            sets=["profile=dev", "tls.enabled=true", "tls.secretName=loyalty-tls"]
        )
        trimmed = helm_template(
            sets=[f"services.{s}.enabled=false" for s in ("segmentation", "reporting")]
            + ["networkPolicy.enabled=false", "migrations.enabled=false"]
        )
        for name, objs in (
            ("chart (microservices)", microservices),
            ("chart (dev profile)", dev),
            ("chart (every option on)", everything),
            ("chart (TLS)", secured),
            ("chart (dev profile, TLS)", secured_dev),
            ("chart (services and options off)", trimmed),
        ):
            kube_validate(name, objs)
        expect(len(by_kind(trimmed, "Deployment")) == 3, "disabled services still render")
        expect(not by_kind(trimmed, "NetworkPolicy") and not by_kind(trimmed, "Job"), "disabled options still render")
        expect(len(by_kind(everything, "ServiceMonitor")) == 5, "ServiceMonitors missing")
        jobs = by_kind(microservices, "Job")
        expect(
            len(jobs) == 1 and "pre-install" in jobs[0]["metadata"]["annotations"]["helm.sh/hook"]
            and "pre-upgrade" in jobs[0]["metadata"]["annotations"]["helm.sh/hook"]
            and pod_spec(jobs[0])["containers"][0]["args"][0] == "migrate",
            "no pre-install/pre-upgrade migrate Job",
        )
        ok("options switch objects on and off; the migrate Job is a pre-install/pre-upgrade hook")

        values = yaml.safe_load((CHART / "values.yaml").read_text())
        dockerfile_checks(values)
        drain = values["config"]["server"]["gracePeriodSeconds"]
        workload_checks("chart (microservices)", microservices, drain)
        workload_checks("chart (dev profile)", dev, drain)
        workload_checks("chart (TLS)", secured, drain)
        workload_checks("chart (dev profile, TLS)", secured_dev, drain)
        tls_config = config_of(secured)
        expect(
            "https://loyalty-identity-headless:" in tls_config
            and 'require_client_cert = true' in tls_config
            and 'client_ca_file = "/etc/loyalty-tls/ca.crt"' in tls_config,
            f"chart (TLS): config.toml does not call peers over mutual TLS:\n{tls_config}",
        )
        expect("metrics = true" in tls_config, f"chart (TLS): metrics not over TLS:\n{tls_config}")
        for monitor in by_kind(secured, "ServiceMonitor"):
            endpoint = monitor["spec"]["endpoints"][0]
            expect(
                endpoint.get("scheme") == "https"
                and endpoint["tlsConfig"]["ca"]["secret"]["name"] == "loyalty-tls"
                and endpoint["tlsConfig"]["serverName"].endswith("-headless"),
                f"chart (TLS): ServiceMonitor does not scrape over TLS: {endpoint}",
            )
        expect("[tls]" not in config_of(microservices), "chart (microservices): TLS without tls.enabled")
        ok("chart (TLS): peers over https with client certificates, probes on the health port")

        print("==> k8s/ kustomizations")
        built = {}
        for kdir in sorted(p.parent for p in K8S.rglob("kustomization.yaml")):
            rel = str(kdir.relative_to(ROOT))
            built[rel] = kustomize(kdir)
            kube_validate(rel, built[rel])
        for required in ("k8s/base", "k8s/overlays/production", "k8s/overlays/dev", "k8s/all-in-one"):
            expect(required in built, f"{required} is missing")
        for rel in ("k8s/base", "k8s/overlays/production", "k8s/overlays/dev", "k8s/all-in-one"):
            workload_checks(rel, built[rel], drain)

        print("==> stores and replicas")
        redis_port, scylla_ports = values["redis"]["port"], values["scylla"]["ports"]
        store_checks("chart (microservices)", microservices, redis_port, scylla_ports)
        store_checks("chart (every option on)", everything, redis_port, scylla_ports)
        for rel in ("k8s/base", "k8s/overlays/production", "k8s/overlays/dev"):
            store_checks(rel, built[rel], redis_port, scylla_ports)
        for name, objs in (("chart (dev profile)", dev), ("k8s/all-in-one", built["k8s/all-in-one"])):
            reached = {c: p & ({redis_port} | set(scylla_ports)) for c, p in egress_ports(objs).items()}
            expect(not any(reached.values()), f"{name}: reaches store ports {reached}")
        ok("chart (dev profile), k8s/all-in-one: no egress to Redis or ScyllaDB")

        shared_store_checks(redis_port)

        print("==> the chart and k8s/ agree")
        agree("microservices (k8s/base)", microservices, built["k8s/base"])
        agree("dev profile (k8s/all-in-one)", dev, built["k8s/all-in-one"])

        dashboard_checks(everything, microservices, built["k8s/overlays/production"])

        print("==> the binary accepts the rendered config")
        binary_accepts("the chart (microservices)", config_of(microservices))
        binary_accepts("the chart (dev profile)", config_of(dev))
        binary_accepts("the chart (every option on)", config_of(everything))
        binary_accepts("the chart (TLS)", config_of(secured))
        binary_accepts("k8s/base", config_of(built["k8s/base"]))
        binary_accepts("k8s/all-in-one", config_of(built["k8s/all-in-one"]))
    except CheckFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    print("\nchart and manifests: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
