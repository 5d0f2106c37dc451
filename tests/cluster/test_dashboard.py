"""The Grafana dashboard the chart ships: every expression names metrics the server and gateway
really export (scraped from real processes here), and the chart's ConfigMap carries that file."""

from __future__ import annotations

import json
import re
import subprocess
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from caffe_testing import REPO
from caffe_testing.chart import find, helm_cluster, helm_install, rendered_objects
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.servers import CAFFESERVE, ServerProcess, free_port, http

DASHBOARD = REPO / "charts" / "caffe-serving" / "dashboards" / "caffe-serving.json"


def exported_names(url: str) -> set[str]:
    """Every sample name a /metrics answer holds (with the _total/_bucket/_sum/_count suffixes)."""
    text = http("GET", url + "/metrics")[2].decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    with ServerProcess(DIGITS_DIR / "server.yaml", env={"CAFFESERVE__BACKEND": "pycaffe"}) as server:
        port = free_port()
        gateway = subprocess.Popen(CAFFESERVE + ["gateway", "--host", "127.0.0.1", "--port", str(port), "--no-grpc",
                                                 "--static", f"digits={server.url}"],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if http("GET", url + "/v2/health/ready", timeout=2)[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            body = orjson.dumps({"inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                             "data": [0.0] * 64}]})
            assert http("POST", url + "/v2/models/digits/infer", body)[0] == 200  # labelled series exist now
            return exported_names(server.url) | exported_names(url)
        finally:
            gateway.terminate()
            gateway.wait(15)


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_every_panel_queries_metrics_the_server_or_gateway_exports(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
    for title, expr in expressions(dashboard):
        names = set(re.findall(r"\bcaffeserve_[a-z_]+", expr))
        assert names, (title, expr)
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which nothing exports"
    # the variable that lists models reads a real metric too
    models = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    assert set(re.findall(r"\bcaffeserve_[a-z_]+", models["definition"])) <= exported


def test_dashboard_shows_what_an_operator_of_the_service_asks_first():
    """Per model: requests/s by code, p50/p99 latency, queue depth, batch sizes, backend, load failures."""
    exprs = " ".join(e for _, e in expressions(json.loads(DASHBOARD.read_text())))
    for needed in ("caffeserve_inference_requests_total", "by (model, code)", "histogram_quantile(0.5",
                   "histogram_quantile(0.99", "caffeserve_gateway_queued_requests", "caffeserve_batch_size",
                   "caffeserve_model_backend_info", "caffeserve_model_ready{model=~\"$model\"} == 0"):
        assert needed in exprs, needed


def test_chart_ships_the_dashboard_only_when_asked_and_keeps_the_gateway_up_in_a_drain():
    with helm_cluster() as cluster:
        default = rendered_objects(helm_install(cluster, "a", "caffe-system"))
    with helm_cluster() as cluster:  # Helm installs the CRD once per cluster
        asked = rendered_objects(helm_install(cluster, "b", "other", {
            "metrics": {"grafanaDashboard": {"enabled": True}}, "gateway": {"replicas": 1}}))
    assert not [o for o in find(default, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    (cm,) = [o for o in find(asked, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["caffe-serving.json"]) == json.loads(DASHBOARD.read_text())
    # the gateway PodDisruptionBudget: with 2 replicas (the default) one always stays; with 1 none is made
    # (the operator has its own, for its two replicas)
    def gateway_pdbs(objs):
        return [o for o in find(objs, "PodDisruptionBudget")
                if o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"]

    (pdb,) = gateway_pdbs(default)
    assert pdb["spec"]["minAvailable"] == 1
    assert not gateway_pdbs(asked)
