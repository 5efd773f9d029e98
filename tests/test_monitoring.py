"""The monitoring a run owner gets (docker/monitoring, docker/compose.yaml) agrees with what murmur exports.

Grafana and Prometheus cannot be pulled here, so the checks are the ones that catch a dashboard that drifted:
every query parses as PromQL (promql_parser, the Rust parser of GreptimeDB), every metric it selects is one that
a peer, a bootstrap node or the swarm watcher really exports (read from their registries, not from a list), and
every label it matches or groups by is one those series carry (or one Prometheus adds: job, instance). The
Prometheus config scrapes the compose services at the ports their commands serve metrics on, and the
commands themselves parse with the real CLI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import click
import promql_parser as pq
import pytest
import yaml

from bootstrap.metrics import BootstrapMetrics, DHTStats
from peer.cli.main import main
from peer.node.metrics import GPU_MEMORY_METRICS, LABELS, Metrics, PeerInfo
from peer.swarm.exporter import SwarmExporter
from protocol.records import Announcement

pytestmark = pytest.mark.timeout(60)

DOCKER = Path(__file__).resolve().parent.parent / "docker"
MONITORING = DOCKER / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "murmur.json"
ADDED_BY_PROMETHEUS = {"job", "instance"}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$swarm": ".*"}


def exported() -> dict[str, set[str]]:
    """Every series name murmur serves (histogram and counter sample names included) -> its label names."""
    peer = Metrics()
    peer.identify(PeerInfo(swarm="demo", run="r", peer="p", version="v", device="cpu"))
    peer.reject("stale")
    boot = BootstrapMetrics(peer_id="Qm", version="v")
    boot.update(DHTStats(routing_peers=1, records=1, announced={"r": 1}), 1)
    swarm = SwarmExporter("demo")
    swarm.update([Announcement(peer_id="a" * 64, public_key=b"", run_id="r", endpoint="", tls_fingerprint="",
                               tls_certificate=b"", slice=0, round=1, tokens_per_second=1.0, loss=2.0,
                               software_version="v", protocol_version="1", expires_unix=0.0)])  # fmt: skip
    names: dict[str, set[str]] = {name: set(LABELS) for name in GPU_MEMORY_METRICS}  # a CUDA peer's extra series
    for registry in (peer.registry, boot.registry, swarm.registry):
        for family in registry.collect():
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


def targets() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, the variable's query included."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def children(expr: object) -> list[object]:
    """The sub-expressions of a parsed PromQL node (none for a selector or a literal)."""
    if isinstance(expr, pq.BinaryExpr):
        return [expr.lhs, expr.rhs]
    if isinstance(expr, pq.Call):
        return list(expr.args)
    if isinstance(expr, (pq.AggregateExpr, pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
        return [expr.expr]
    return []


def selectors(expr: object) -> Iterator[pq.VectorSelector]:
    """Every vector selector in a parsed expression (walks the AST)."""
    if isinstance(expr, pq.VectorSelector):
        yield expr
    elif isinstance(expr, pq.MatrixSelector):
        yield expr.vector_selector
    for child in children(expr):
        yield from selectors(child)


def grouping(expr: object) -> Iterator[str]:
    """The labels every `by (...)` in the expression groups by."""
    if isinstance(expr, pq.AggregateExpr) and expr.modifier is not None:
        yield from expr.modifier.labels
    for child in children(expr):
        yield from grouping(child)


def parse(expr: str) -> object:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return pq.parse(expr)


def test_every_dashboard_query_parses_and_selects_series_murmur_exports_with_their_labels() -> None:
    names = exported()
    queries = list(targets())
    assert len(queries) >= 20
    selected = set()
    for title, expr in queries:
        parsed = parse(expr)
        found = list(selectors(parsed))
        assert found, f"{title}: {expr} selects nothing"
        labels = set(ADDED_BY_PROMETHEUS)
        for selector in found:
            assert selector.name in names, f"{title}: {selector.name} is not a metric murmur exports"
            selected.add(selector.name)
            has = names[selector.name] | ADDED_BY_PROMETHEUS
            labels |= has
            for matcher in selector.matchers.matchers:
                assert matcher.name in has, f"{title}: {selector.name} has no label {matcher.name}"
        for label in grouping(parsed):
            assert label in labels | {"le"}, f"{title}: groups by {label}, which none of its series carry"
    # the dashboard shows each kind: swarm view, own peers, bootstrap nodes, process
    for name in ("murmur_swarm_peer_train_loss", "murmur_validation_loss", "murmur_round_duration_seconds_bucket",
                 "murmur_exchange_duration_seconds_bucket", "murmur_bootstrap_announced_peers",
                 "murmur_gpu_memory_peak_bytes", "process_cpu_seconds_total"):  # fmt: skip
        assert name in selected, f"the dashboard does not show {name}"


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "murmur-swarm" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    swarm_query = variables["swarm"]["query"]["query"]
    metric_names = re.findall(r"murmur_\w+", swarm_query)
    assert metric_names and all(n in exported() for n in metric_names), swarm_query
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_prometheus_scrapes_the_compose_services_where_they_serve_metrics() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    in_dashboard = {m for _, expr in targets() for m in re.findall(r'job="([^"]+)"', expr)}
    assert in_dashboard <= set(jobs), f"the dashboard names jobs Prometheus does not have: {in_dashboard - set(jobs)}"

    def metrics_port(service: dict) -> int:
        flags = [f for f in service["command"] if f.startswith("--metrics-port=")]
        assert "--metrics-host=0.0.0.0" in service["command"], service
        return int(flags[0].split("=", 1)[1])

    scraped = [t for job in jobs.values() for c in job.get("static_configs", []) for t in c["targets"]]
    for target in scraped:
        host, port = target.split(":")
        assert host in services and int(port) == metrics_port(services[host]), target
    for job in jobs.values():
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                assert name in services and sd["port"] == metrics_port(services[name]), sd
    assert {"boot1", "boot2", "swarm-watch", "peer"} <= {t.split(":")[0] for t in scraped} | {
        n for job in jobs.values() for sd in job.get("dns_sd_configs", []) for n in sd["names"]}


def test_grafana_is_provisioned_with_the_prometheus_and_the_dashboard() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: DOCKER / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    for outside in mounts.values():
        assert outside.exists(), f"grafana mounts {outside}, which is not there"
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "murmur.yaml").read_text())["providers"][0]
    assert (mounts[provider["options"]["path"]] / DASHBOARD.name).exists()
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].endswith("/murmur.json")
    prometheus = compose["services"]["prometheus"]
    assert any(v.startswith("./monitoring/prometheus.yml:") for v in prometheus["volumes"])


@pytest.mark.parametrize("service", ["boot1", "boot2", "swarm-watch", "peer"])
def test_each_murmur_command_in_compose_parses_with_the_real_cli(service: str) -> None:
    """click checks every option and value (types, ranges, choices) without running the command."""
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"][service]
    entry = spec.get("entrypoint")
    if entry is None:
        name, args = "bootstrap", list(spec["command"])  # the bootstrap image's ENTRYPOINT is `murmur bootstrap`
    else:
        words = entry[2].split()  # sh -c "exec murmur NAME --initial-peers "$(cat ...)" "$@""
        assert words[:2] == ["exec", "murmur"] and "--initial-peers" in words, entry
        name = words[2]
        args = ["--initial-peers", "/ip4/10.0.0.2/tcp/31337/p2p/QmSomePeer", *spec["command"]]
    args = [a.replace("${SWARM:-demo}", "demo").replace("${RUN_KEY:-}", "ab" * 32) for a in args]
    command = main.get_command(click.Context(main), name)
    assert command is not None, name
    command.make_context(name, args)  # raises click.UsageError/BadParameter on a bad flag or value
