"""Kubernetes manifests (deploy/k8s): YAML, offline schema validation of every file and every
rendered overlay, and what the mesh needs of them (probes, GPUs, drain, HPAs, routing)."""
import re
import shutil

import pytest
import yaml
from deploy_support import (
    DEPLOY,
    GPU_STAGES,
    OVERLAYS,
    PORTS,
    ROOT,
    STAGES,
    objects,
    render,
    validate,
)

STAGE_DEPLOYMENTS = [f"michi-{s}" for s in STAGES]


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 15
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path


def test_embedded_configs_parse(rendered):
    cm = objects(rendered["single-gpu"], "ConfigMap")["time-slicing-config"]
    sharing = yaml.safe_load(cm["data"]["any"])["sharing"]["timeSlicing"]
    assert sharing["renameByDefault"] is False  # the stages keep requesting nvidia.com/gpu
    assert sharing["resources"][0]["name"] == "nvidia.com/gpu"
    assert sharing["resources"][0]["replicas"] >= len(GPU_STAGES) + 1  # + 1: room for a rolling update


def test_every_manifest_file_validates_offline():
    files = validate.resource_files()
    assert len(files) >= 10
    for path in files:
        for obj in render.load_docs(path):
            assert validate.validate_object(obj) is None, (path, validate.validate_object(obj))


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_rendered_overlay_validates_offline(rendered, overlay):
    errors = [e for o in rendered[overlay] if (e := validate.validate_object(o, validate.K8S_VERSION))]
    assert errors == []


def test_validation_catches_a_bad_manifest():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {}, "replica": 2}}  # typo: strict mode rejects it
    assert "replica" in validate.validate_object(bad)
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
             "spec": {"containers": [{"name": "c", "readinessProbe": {"grpc": {"port": "grpc"}}}]}}
    assert validate.validate_object(probe) is not None  # grpc probes take a port number, not a name


def test_builtin_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        render.render_builtin(tmp_path)


@pytest.mark.skipif(not shutil.which("kubectl"),
                    reason="kubectl (its built-in kustomize) is not installed: nothing to compare the fallback with")
@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_builtin_renderer_matches_kubectl_kustomize(rendered_builtin, overlay):
    key = render.key_of
    ours = {key(o): o for o in rendered_builtin[overlay]}
    theirs = {key(o): o for o in render.render_kubectl(OVERLAYS[overlay])}
    assert ours == theirs


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_every_deployment_has_probes_and_grace_beyond_the_drain(rendered, overlay):
    docs = rendered[overlay]
    config = objects(docs, "ConfigMap")["michi-config"]["data"]
    drain_s = float(config["MICHI_DRAIN_S"])
    deployments = objects(docs, "Deployment")
    assert set(STAGE_DEPLOYMENTS) <= set(deployments)
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        for c in pod["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, (name, c["name"])
        if name not in STAGE_DEPLOYMENTS:
            continue
        (c,) = pod["containers"]
        stage = name.removeprefix("michi-")
        port = PORTS[stage]
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (name, probe)  # grpc.health.v1, k8s >= 1.24
        # ready = room for one more call (admission control's health service)
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": "michi.capacity"}, name
        assert {"name": "grpc", "containerPort": port} in c["ports"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env[f"MICHI_{stage.upper()}_PORT"] == str(port)
        assert env["MICHI_STAGE"] == stage and c["args"][0] == stage
        assert {"configMapRef": {"name": "michi-config"}} in c["envFrom"]
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        pre_stop_s = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
        assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s + 5, name
        assert pod["securityContext"]["runAsNonRoot"] is True
        # else a Service named michi-backbone injects MICHI_BACKBONE_PORT=tcp://... (the stage's own
        # port variable, parsed as an int) into every pod of the namespace
        assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_gpu_stages_request_a_gpu_and_the_gateway_does_not(rendered, overlay):
    deployments = objects(rendered[overlay], "Deployment")
    for stage in STAGES:
        (c,) = deployments[f"michi-{stage}"]["spec"]["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        assert "requests" in c["resources"] and "memory" in limits and "cpu" in limits
        if stage in GPU_STAGES:
            assert limits["nvidia.com/gpu"] == 1, stage
            assert c["image"].endswith(":gpu")
        else:
            assert "nvidia.com/gpu" not in limits and c["image"].endswith(":cpu")


def test_single_gpu_puts_the_gpu_stages_on_time_sliced_gpus(rendered):
    deployments = objects(rendered["single-gpu"], "Deployment")
    for stage in GPU_STAGES:
        spec = deployments[f"michi-{stage}"]["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.sharing-strategy": "time-slicing"}
    assert "nodeSelector" not in deployments["michi-gateway"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_services_and_pdbs_select_existing_pods(rendered, overlay):
    docs = rendered[overlay]
    pods = [d["spec"]["template"] for d in objects(docs, "Deployment").values()]

    def matches(selector):
        return [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]

    for name, svc in objects(docs, "Service").items():
        (pod,) = matches(svc["spec"]["selector"])
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)
    pdbs = objects(docs, "PodDisruptionBudget")
    for stage in STAGES:
        assert len(matches(pdbs[f"michi-{stage}"]["spec"]["selector"]["matchLabels"])) == 1


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_gateway_addresses_name_services_of_the_right_port(rendered, overlay):
    docs = rendered[overlay]
    config = objects(docs, "ConfigMap")["michi-config"]["data"]
    services = objects(docs, "Service")
    assert config["REDIS_URL"] == "redis://michi-redis:6379/0" and "michi-redis" in services
    for stage in GPU_STAGES:
        address = config[f"MICHI_{stage.upper()}_ADDRS"]
        headless = address.startswith("dns:///")
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        svc = services[host]
        assert int(port) == PORTS[stage] and {"name": "grpc", "port": PORTS[stage]}.items() <= svc["spec"]["ports"][0].items()
        assert (svc["spec"].get("clusterIP") == "None") == headless
        assert headless == (overlay == "scale-out")  # several replicas need the headless Service + rendezvous


def metric_names() -> set[str]:
    """The series michi/serving/metrics.py exports (histograms as their _bucket series)."""
    text = (ROOT / "shared/michi/serving/metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'(Counter|Gauge|Histogram)\("([a-z_]+)"', text):
        names.add({"Histogram": name + "_bucket", "Counter": name if name.endswith("_total") else name + "_total"}
                  .get(kind, name))
    assert "michi_live_sessions" in names
    return names


def test_hpas_target_existing_deployments_on_metrics_the_adapter_serves(rendered):
    docs = rendered["scale-out"]
    deployments = objects(docs, "Deployment")
    hpas = objects(docs, "HorizontalPodAutoscaler")
    adapter = yaml.safe_load(objects(docs, "ConfigMap")["prometheus-adapter"]["data"]["config.yaml"])
    served = {r["name"]["as"]: r for r in adapter["rules"]}
    exported = metric_names()
    for rule in adapter["rules"]:
        series = re.match(r"([a-z_]+)\{", rule["seriesQuery"]).group(1)
        assert series in exported, series
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == set(STAGE_DEPLOYMENTS)
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert "replicas" not in deployments[ref["name"]]["spec"]  # the HPA owns it
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] in served, (name, metric)


def test_scale_out_has_a_headless_service_per_stateful_stage(rendered):
    services = objects(rendered["scale-out"], "Service")
    for stage in GPU_STAGES:
        svc = services[f"michi-{stage}-headless"]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is False


def test_time_slicing_config_keeps_its_own_namespace(rendered):
    cms = [o for o in rendered["single-gpu"] if o["kind"] == "ConfigMap"]
    ns = {o["metadata"]["name"]: o["metadata"].get("namespace") for o in cms}
    assert ns == {"michi-config": "michi", "time-slicing-config": "gpu-operator"}
