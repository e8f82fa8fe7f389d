"""k8s/: every overlay built by `kubectl kustomize`, checked the way an API server would check it
(Kubernetes' schemas offline, the KubeRay v1.7.0 CRDs' openAPIV3Schema), and for what we promise:
the restricted Pod Security Standard, no secret values, jobs that exist with valid configs, and a
RayService that deploys exactly what `vlsae serve` deploys.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from jsonschema import ValidationError

from vlsae_ray.cli import JOBS, main
from vlsae_ray.config import ServeConfig, load_config, parse_config
from vlsae_ray.deploy import build_application, render_serve_deploy_config, serve_deploy_config

REPO = Path(__file__).parents[2]
OVERLAYS = ("dev", "prod")
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
KUBERNETES_VERSION = "1.37.0"
# each overlay's RayService is generated from this serve config (its serve-config.yaml says so)
SERVE_CONFIGS = {
    "prod": ("jobs/configs/serve.cluster.yaml", "k8s/base/serve-config.yaml"),
    "dev": ("k8s/overlays/dev/configs/serve.cluster.yaml", "k8s/overlays/dev/serve-config.yaml"),
}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = [obj for obj in by_kind(objects, kind) if obj["metadata"]["name"] == name]
    return obj


def cluster_spec(obj: dict) -> dict:
    """The Ray cluster a KubeRay object runs."""
    if obj["kind"] == "RayCluster":
        return obj["spec"]
    return obj["spec"]["rayClusterSpec" if obj["kind"] == "RayJob" else "rayClusterConfig"]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod a KubeRay object makes: head, worker groups, job submitter."""
    cluster = cluster_spec(obj)
    found = [("head", cluster["headGroupSpec"]["template"])]
    found += [(f"worker group {g['groupName']}", g["template"]) for g in cluster["workerGroupSpecs"]]
    if obj["kind"] == "RayJob":
        found.append(("job submitter", obj["spec"]["submitterPodTemplate"]))
    return [(f"{obj['kind']} {obj['metadata']['name']}, {where}", template) for where, template in found]


def all_pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    return [found for kind in RAY_KINDS for obj in by_kind(objects, kind) for found in pod_templates(obj)]


# --- the schemas: Kubernetes' own offline, KubeRay's CRDs -------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_builds_the_objects_a_deployment_needs(built, overlay):
    kinds = {obj["kind"] for obj in built[overlay]}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "NetworkPolicy", *RAY_KINDS} <= kinds
    assert {obj["metadata"]["namespace"] for obj in built[overlay] if obj["kind"] != "Namespace"} == {"vlsae"}
    assert "Secret" not in kinds  # S3 credentials are the user's Secret, created apart (docs/kubernetes.md)
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_and_pod_templates_pass_the_kubernetes_schema(built, overlay):
    core = [obj for obj in built[overlay] if obj["kind"] not in RAY_KINDS]
    # the pods inside the KubeRay objects, as the core PodTemplate kind, against Kubernetes' own schema
    core += [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        for _, template in all_pod_templates(built[overlay])
    ]
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kubernetes_schema_rejects_a_misspelt_field(built):
    policy = copy.deepcopy(by_kind(built["prod"], "NetworkPolicy")[0])
    policy["spec"]["podSelectr"] = policy["spec"].pop("podSelector")
    with pytest.raises(kubernetes_validate.ValidationError, match="podSelectr"):
        kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_objects_pass_the_v1_7_crd_schemas(built, crd_validators, overlay):
    for kind in RAY_KINDS:
        for obj in by_kind(built[overlay], kind):
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in crd_validators[kind].iter_errors(obj)]
            assert not errors, f"{kind} {obj['metadata']['name']}: {errors}"


def _misspell(obj: dict, path: list, bad_key: str) -> dict:
    obj = copy.deepcopy(obj)
    *parents, key = path
    node = obj
    for part in parents:
        node = node[part]
    node[bad_key] = node.pop(key)
    return obj


@pytest.mark.parametrize(
    ("kind", "path", "bad_key"),
    [
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "minReplicas"], "minReplica"),
        ("RayCluster", ["spec", "autoscalerOptions", "idleTimeoutSeconds"], "idleTimeoutSecond"),
        ("RayJob", ["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinish"),
        ("RayJob", ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0,
                    "securityContext", "allowPrivilegeEscalation"], "allowPrivilegeEscalaton"),
        ("RayService", ["spec", "serveConfigV2"], "serveConfigV3"),
    ],
)  # fmt: skip
def test_crd_schema_rejects_an_unknown_or_misspelt_field(built, crd_validators, kind, path, bad_key):
    obj = by_kind(built["prod"], kind)[0]
    assert not list(crd_validators[kind].iter_errors(obj))
    with pytest.raises(ValidationError, match=bad_key):
        crd_validators[kind].validate(_misspell(obj, path, bad_key))


def test_crd_schema_rejects_a_value_outside_an_enum(built, crd_validators):
    cluster = copy.deepcopy(by_kind(built["prod"], "RayCluster")[0])
    cluster["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(ValidationError, match="tokens"):
        crd_validators["RayCluster"].validate(cluster)


# --- security: restricted Pod Security Standard, no secret values, no API access --------------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def restricted_violations(where: str, template: dict) -> list[str]:
    """What in a pod template breaks the restricted Pod Security Standard (every container must say
    so itself or through the pod: non-root, no privilege escalation, ALL capabilities dropped,
    RuntimeDefault seccomp; no host namespaces, ports or paths)."""
    pod = template["spec"]
    pod_context = pod.get("securityContext", {})
    found = [f"{where}: {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    found += [
        f"{where}: volume {v['name']} is {kind}"
        for v in pod.get("volumes", [])
        for kind in set(v) - {"name"} - RESTRICTED_VOLUMES
    ]
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = f"{where}, container {container['name']}"
        context = container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {
            "NET_BIND_SERVICE"
        }:
            found.append(f"{name}: capabilities are not drop [ALL]")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault")
        found += [f"{name}: hostPort" for port in container.get("ports", []) if port.get("hostPort")]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_meets_the_restricted_pod_security_standard(built, overlay):
    templates = all_pod_templates(built[overlay])
    found = [v for where, template in templates for v in restricted_violations(where, template)]
    # KubeRay adds the autoscaler to the head pod with autoscalerOptions.securityContext
    for kind in RAY_KINDS:
        for obj in by_kind(built[overlay], kind):
            autoscaler = {
                "name": "autoscaler",
                "securityContext": cluster_spec(obj)["autoscalerOptions"]["securityContext"],
            }
            found += restricted_violations(
                f"{kind} {obj['metadata']['name']}", {"spec": {"containers": [autoscaler]}}
            )
    assert not found
    # each RayCluster spec (the cluster, the RayService's, one per RayJob) has its head and worker
    # groups (prod: and the GPU group); each RayJob has its submitter
    groups = {"dev": 2, "prod": 3}[overlay]
    assert len(templates) == (2 + len(JOBS)) * groups + len(JOBS)
    namespace = by_kind(built[overlay], "Namespace")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_restricted_check_catches_a_container_that_may_escalate(built):
    where, template = all_pod_templates(built["prod"])[0]
    template = copy.deepcopy(template)
    template["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    del template["spec"]["securityContext"]["seccompProfile"]
    del template["spec"]["containers"][0]["securityContext"]["seccompProfile"]
    assert len(restricted_violations(where, template)) == 2


SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
SECRET_TEXT = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|aws_secret_access_key\s*[:=]", re.I)


def secret_values(objects: list[dict]) -> list[str]:
    """Secret values written into manifests: Secret objects, literal env values of secret-looking
    names, and key-shaped text anywhere (the job configs in ConfigMaps too)."""
    found = [f"Secret {obj['metadata']['name']}" for obj in objects if obj["kind"] == "Secret"]
    for obj in objects:
        found += [
            f"{obj['kind']} {obj['metadata']['name']}: {m}" for m in SECRET_TEXT.findall(yaml.dump(obj))
        ]
        stack = [obj]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if "value" in node and "name" in node and SECRET_NAME.search(str(node["name"])):
                    found.append(f"{obj['kind']} {obj['metadata']['name']}: env {node['name']} has a value")
                stack += node.values()
            elif isinstance(node, list):
                stack += node
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_manifest_holds_a_secret_value(built, overlay):
    assert secret_values(built[overlay]) == []
    # the S3 credentials reach every Ray container by reference to the user's Secret
    for where, template in all_pod_templates(built[overlay]):
        if "submitter" not in where:
            (container,) = template["spec"]["containers"]
            assert container["envFrom"] == [
                {"secretRef": {"name": "vlsae-object-store", "optional": True}}
            ], where


def test_the_secret_check_catches_a_literal_key(built):
    cluster = copy.deepcopy(by_kind(built["prod"], "RayCluster")[0])
    container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG"}]
    config = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "key: AKIAIOSFODNN7EXAMPLE"}}
    assert len(secret_values([cluster, config])) == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_cannot_call_the_kubernetes_api(built, overlay):
    (account,) = by_kind(built[overlay], "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for where, template in all_pod_templates(built[overlay]):
        pod = template["spec"]
        if where.endswith("head"):
            # the head runs under the account KubeRay makes for its autoscaler (scales this cluster only)
            assert "serviceAccountName" not in pod, where
        else:
            assert pod["serviceAccountName"] == account["metadata"]["name"], where
            assert pod["automountServiceAccountToken"] is False, where


# --- network policies: a small evaluator of the Kubernetes NetworkPolicy semantics ---------------------

HEAD = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head", "ray.io/cluster": "vlsae"}
WORKER = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker", "ray.io/cluster": "vlsae"}
SUBMITTER = {"job-name": "vlsae-extract"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}
DNS = {"k8s-app": "kube-dns"}


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator knows matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peers: list | None, peer: tuple[str, dict] | None, own: str) -> bool:
    """Does a rule's from/to list admit `peer` ((namespace, pod labels), or None: outside the cluster)?"""
    if not peers:
        return True
    for entry in peers:
        if "ipBlock" in entry:
            return True
        if peer is None:
            continue
        peer_namespace, labels = peer
        if "namespaceSelector" in entry:
            in_namespace = _selects(
                entry["namespaceSelector"], {"kubernetes.io/metadata.name": peer_namespace}
            )
        else:
            in_namespace = peer_namespace == own
        if in_namespace and _selects(entry.get("podSelector", {}), labels):
            return True
    return False


def allowed(
    policies: list[dict], direction: str, pod: dict, port: int, peer: tuple[str, dict] | None
) -> bool:
    """Is traffic of `direction` ("Ingress" into `pod`, "Egress" out of it) on `port` allowed?"""
    selecting = [
        p
        for p in policies
        if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)
    ]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        own = policy["metadata"]["namespace"]
        for rule in policy["spec"].get(key, []):
            ports = rule.get("ports")
            if (not ports or any(p["port"] == port for p in ports)) and _peer_matches(
                rule.get(peers_key), peer, own
            ):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_serve_port_is_open_to_other_namespaces(built, overlay):
    policies = by_kind(built[overlay], "NetworkPolicy")
    ingress = lambda pod, port, peer: allowed(policies, "Ingress", pod, port, peer)  # noqa: E731
    outsider = ("shop", {"app": "web"})
    for pod in (HEAD, WORKER):
        assert ingress(pod, 8000, outsider) and ingress(pod, 8000, None)
        # GCS, dashboard and job API, Ray client, dashboard agent, metrics
        for port in (6379, 8265, 10001, 52365, 8080):
            assert not ingress(pod, port, outsider) and not ingress(pod, port, None), (pod, port)
            assert ingress(pod, port, ("vlsae", SUBMITTER)), (pod, port)
    # the KubeRay operator reads job and Serve status from the head's dashboard and agent, and no more
    assert ingress(HEAD, 8265, ("kuberay-system", OPERATOR)) and ingress(
        HEAD, 52365, ("kuberay-system", OPERATOR)
    )
    assert not ingress(HEAD, 6379, ("kuberay-system", OPERATOR))
    assert not ingress(HEAD, 8265, ("kuberay-system", {"app": "other"}))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_is_dns_the_object_store_and_the_namespace(built, overlay):
    policies = by_kind(built[overlay], "NetworkPolicy")
    egress = lambda pod, port, peer: allowed(policies, "Egress", pod, port, peer)  # noqa: E731
    for pod in (HEAD, WORKER, SUBMITTER):
        assert egress(pod, 53, ("kube-system", DNS)) and egress(pod, 8265, ("vlsae", HEAD))
        assert not egress(pod, 6379, ("shop", {"app": "redis"})) and not egress(pod, 22, None)
    assert egress(WORKER, 443, None) and not egress(SUBMITTER, 443, None)
    assert egress(HEAD, 6443, None) and not egress(WORKER, 6443, None)  # the autoscaler's API server


# --- the RayCluster, the RayJobs' clusters and the RayService's cluster -------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_cluster_is_the_raycluster_with_token_auth_and_autoscaling(built, overlay):
    (cluster,) = by_kind(built[overlay], "RayCluster")
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "vlsae-ray-token"}
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    for kind in ("RayJob", "RayService"):
        for obj in by_kind(built[overlay], kind):
            assert cluster_spec(obj) == spec, f"{kind} {obj['metadata']['name']} runs another cluster"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in groups.values())
    images = {c["image"] for _, t in all_pod_templates(built[overlay]) for c in t["spec"]["containers"]}
    if overlay == "prod":
        assert set(groups) == {"cpu", "gpu"} and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (gpu,) = groups["gpu"]["template"]["spec"]["containers"]
        assert (
            gpu["resources"]["requests"]["nvidia.com/gpu"]
            == gpu["resources"]["limits"]["nvidia.com/gpu"]
            == "1"
        )
        tolerations = groups["gpu"]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert images == {"registry.example.com/vlsae-ray:0.1.0-cuda"}
    else:
        assert set(groups) == {"cpu"} and "num-cpus" not in spec["headGroupSpec"]["rayStartParams"]
        assert "nvidia.com/gpu" not in yaml.dump(built[overlay])
        assert images == {"vlsae-ray:dev-cpu"}


# --- the RayJobs: entrypoints that exist, configs that validate -------------------------------------

ENTRYPOINT = re.compile(r"python (jobs/(\w+)\.py) -c (jobs/configs/(\S+))")
CONFIGS_MOUNT = "/app/jobs/configs"  # the image's WORKDIR /app (Dockerfile) + jobs/configs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rayjob_runs_an_existing_entrypoint_with_a_valid_config(built, overlay):
    (configs,) = [
        c for c in by_kind(built[overlay], "ConfigMap") if c["metadata"]["name"] == "vlsae-job-configs"
    ]
    jobs = by_kind(built[overlay], "RayJob")
    for job in jobs:
        spec = job["spec"]
        match = ENTRYPOINT.fullmatch(spec["entrypoint"])
        assert match, spec["entrypoint"]
        script, name, config_path, key = match.groups()
        assert (REPO / script).is_file() and job["metadata"]["name"] == f"vlsae-{name}"
        assert config_path == f"jobs/configs/{key}" and key in configs["data"]
        model = JOBS[name][0]
        parse_config(yaml.safe_load(configs["data"][key]), model, source=f"{overlay} {key}")
        # the ConfigMap is where the entrypoint reads it: mounted over jobs/configs on the head,
        # where the driver runs
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == CONFIGS_MOUNT]
        (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == configs["metadata"]["name"]
        # the job's cluster goes away after it, within bounds, and a retry is bounded too
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0 and 0 <= spec["backoffLimit"] <= 2
        assert spec["submissionMode"] == "K8sJobMode" and yaml.safe_load(spec["runtimeEnvYAML"])
        assert spec["suspend"] is True  # applying an overlay starts no job before its input exists
    # one RayJob per batch job whose cluster config is in jobs/configs (a new job's config needs one)
    batch_jobs = {p.name.split(".")[0] for p in (REPO / "jobs" / "configs").glob("*.cluster.yaml")} - {
        "serve"
    }
    assert {job["metadata"]["name"] for job in jobs} == {f"vlsae-{name}" for name in batch_jobs}
    assert set(configs["data"]) == {f"{name}.cluster.yaml" for name in batch_jobs}


def test_the_prod_configmap_is_the_jobs_cluster_configs(built):
    configs = named(built["prod"], "ConfigMap", "vlsae-job-configs")
    for key, text in configs["data"].items():
        assert text == (REPO / "jobs" / "configs" / key).read_text()


# --- the RayService: the serve config `vlsae serve` deploys ------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_deploys_what_vlsae_serve_deploys(built, overlay, capsys):
    from ray.serve.schema import ServeDeploySchema

    source, generated = SERVE_CONFIGS[overlay]
    (service,) = by_kind(built[overlay], "RayService")
    config = load_config(str(REPO / source), ServeConfig)
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert deployed == serve_deploy_config(config)
    ServeDeploySchema.model_validate(deployed)  # Ray's own schema of `serve deploy` and serveConfigV2
    (app,) = deployed["applications"]
    assert ServeConfig.model_validate(app["args"]) == config  # the builder sees the same config
    # the committed file is what `vlsae serve -c SOURCE --print-config` prints (run from the repo root)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["serve", "-c", source, "--print-config"]) == 0
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert printed == (REPO / generated).read_text(), (
        f"regenerate: vlsae serve -c {source} --print-config > {generated}"
    )
    assert printed == render_serve_deploy_config(config, source)
    assert service["spec"]["serveConfigV2"] == printed
    # autoscaled replicas; a cluster change never needs a second cluster's GPUs
    assert (
        config.autoscaling is not None and config.autoscaling.max_replicas > config.autoscaling.min_replicas
    )
    assert service["spec"]["upgradeStrategy"] == {"type": "None"}
    # Serve listens where the pods expose the `serve` port that KubeRay's Serve service targets
    for _, template in pod_templates(service):
        (container,) = template["spec"]["containers"]
        assert {"name": "serve", "containerPort": config.port} in container["ports"]
    assert deployed["http_options"] == {"host": "0.0.0.0", "port": config.port}


def test_the_dev_serve_config_builds_the_autoscaled_application(built):
    """Serve's own step on the cluster: import `import_path` and call it with `args` (device cpu asks
    no GPUs of a cluster, so nothing starts here)."""
    (service,) = by_kind(built["dev"], "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    config = ServeConfig.model_validate(app["args"])
    deployment = build_application(app)._bound_deployment
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (
        config.autoscaling.min_replicas,
        config.autoscaling.max_replicas,
    )
    assert autoscaling.target_ongoing_requests == config.autoscaling.target_ongoing_requests
    assert deployment.ray_actor_options["num_gpus"] == 0


def test_a_serve_config_change_shows_as_drift():
    source = REPO / "jobs" / "configs" / "serve.cluster.yaml"
    edited = yaml.safe_load(source.read_text()) | {"top_k": 11}
    config = parse_config(edited, ServeConfig)
    committed = (REPO / "k8s" / "base" / "serve-config.yaml").read_text()
    assert render_serve_deploy_config(config, "jobs/configs/serve.cluster.yaml") != committed


def test_serve_autoscaling_and_num_replicas_exclude_each_other():
    base = yaml.safe_load((REPO / "jobs" / "configs" / "serve.cluster.yaml").read_text())
    with pytest.raises(ValueError, match="num_replicas or autoscaling"):
        parse_config(base | {"num_replicas": 2}, ServeConfig)
    with pytest.raises(ValueError, match="min_replicas=5 is above max_replicas=4"):
        parse_config(base | {"autoscaling": {"min_replicas": 5, "max_replicas": 4}}, ServeConfig)


# --- the optional PodMonitor --------------------------------------------------------------------------


def test_podmonitor_component_scrapes_the_metrics_port(tmp_path, kustomize):
    overlay = tmp_path / "with-podmonitor"
    overlay.mkdir()
    relative = lambda path: os.path.relpath(path, overlay)  # noqa: E731 (kustomize takes relative paths)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [relative(REPO / "k8s" / "overlays" / "prod")],
                "components": [relative(REPO / "k8s" / "components" / "podmonitor")],
            }
        )
    )
    objects = kustomize(overlay)
    (monitor,) = by_kind(objects, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for where, template in all_pod_templates(objects):
        if "submitter" not in where:
            ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
            assert ports[endpoint["port"]] == 8080, where
    assert monitor["metadata"]["namespace"] == "vlsae"
    policies = by_kind(objects, "NetworkPolicy")
    for policy in policies:
        kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert allowed(policies, "Ingress", WORKER, 8080, prometheus)
    assert not allowed(policies, "Ingress", WORKER, 8265, prometheus)


# Every absolute path the manifests, the Dockerfile and the launcher config may name: the image's
# own folders and JSON-patch paths. Any other one is a folder of the machine that wrote it.
ABSOLUTE_PATH = re.compile(r"(?:^|[\s:=\"'(\[,])(/[\w.${}-]+(?:/[\w.${}*-]*)*)")
IMAGE_PATH = re.compile(
    r"/app(/jobs/configs)?|/opt/venv(/bin)?|/home/ray(/\.cache/torch_extensions|/vlsae-demo)?|/tmp(/ray)?|/etc/vlsae(/api-keys)?"
    r"|/dev/(shm|sda1)|/bin/bash|/var/lib/apt/lists/\*|/spec/[\w/-]+"
)


def test_manifests_name_no_path_of_a_machine():
    for path in [*(REPO / "k8s").rglob("*.yaml"), REPO / "Dockerfile", REPO / "cluster" / "aws.yaml"]:
        for match in ABSOLUTE_PATH.finditer(path.read_text()):
            assert IMAGE_PATH.fullmatch(match.group(1).rstrip("}")), (path, match.group(1))
    assert not IMAGE_PATH.fullmatch("/Users/alice/vlsae/runs")
