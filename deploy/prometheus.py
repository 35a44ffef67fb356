"""A real Prometheus beside the local cluster, finding every process through Consul.

Every process's metrics listener is registered in Consul's catalog as an instance of
the `boxoffice-metrics` service (`register_endpoints`: its own address and port, and
Meta `process` (the instance's name, e.g. `gateway-east`), `component` (gateway,
booking-service, node-agent, controller) and `host` (the host key, or the region of a
gateway or controller)). Whatever registers there is scraped, labelled `instance`=process,
`component`, `host` (never `process`, `kind` or `region`: metrics carry those labels).

Debian's `prometheus` 2.42 (installed by scripts/install.sh) is built without Consul
service discovery ("disabled until its Debian package is back in shape"), so the catalog
reaches it through HTTP service discovery: `python -m deploy.prometheus sd` is a small
adapter that answers Prometheus's `http_sd_configs` poll (every second) with the
catalog's `boxoffice-metrics` instances, read from the local Consul agent at each poll.
An upstream Prometheus could use `consul_sd_configs` on the same service instead (with
a token that reads services and nodes, as the adapter's: deploy/consul_acl.py
`prometheus`). The adapter gets that token in `$BOXOFFICE_CONSUL_TOKEN`.

Scrapes and rule evaluations every second (a local cluster: a stopped replica shows
within seconds), with deploy/prometheus/rules.yml loaded. Its data lives in the
cluster's state directory and goes with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from deploy.procs import ManagedProcess, port_open, wait_until
from region_map import CONSUL_TOKEN_ENV, ConsulMapStore, MapError, MapStore, ServiceInstance

if TYPE_CHECKING:
    from deploy.cluster import ClusterPlan

RULES_DIR = Path(__file__).with_name("prometheus")
RULES = RULES_DIR / "rules.yml"
METRICS_SERVICE = "boxoffice-metrics"
LOCAL = "127.0.0.1"
INTERVAL = "1s"


def find_tool(name: str) -> str:
    """`prometheus` or `promtool` from Debian's package (scripts/install.sh installs it)."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if not found:
        raise FileNotFoundError(f"{name} not found: run scripts/install.sh (Debian's prometheus)")
    return found


@dataclass(frozen=True)
class MetricsEndpoint:
    """One process's metrics listener."""

    process: str  # the `instance` label: gateway-east, node_agent-east-b, ...
    component: str  # gateway | booking-service | node-agent | controller
    host: str  # host key (east, east/b) or, for a gateway or controller, its region
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}/metrics"

    @property
    def service_id(self) -> str:
        return f"{METRICS_SERVICE}-{self.process}"


def endpoints(plan: ClusterPlan, controllers: Iterable[str] = ()) -> list[MetricsEndpoint]:
    """Every process of a cluster with a metrics listener: gateways, booking services and
    node agents (one per host), and the failover controllers of `controllers` (regions)."""
    found = [MetricsEndpoint(f"gateway-{r}", "gateway", r, p)
             for r, p in plan.gateway_metrics_ports.items()]
    found += [MetricsEndpoint(f"shard_service-{h.replace('/', '-')}", "booking-service", h, p)
              for h, p in plan.service_metrics_ports.items()]
    found += [MetricsEndpoint(f"node_agent-{h.replace('/', '-')}", "node-agent", h, p)
              for h, p in plan.agent_metrics_ports.items()]
    found += [MetricsEndpoint(f"controller-{r}", "controller", r, plan.controller_ports[r])
              for r in controllers]
    return found


async def register_endpoints(store: MapStore, found: Iterable[MetricsEndpoint]) -> None:
    """Register each endpoint in the registry (`boxoffice-metrics`, no health check: the
    scrape says whether it is up; idempotent)."""
    for e in found:
        await store.register_service(
            METRICS_SERVICE, e.service_id, LOCAL, e.port, [e.component], None,
            meta={"process": e.process, "component": e.component, "host": e.host,
                  "metrics_url": e.url})


def config(sd_port: int, rules: Iterable[Path] = (RULES,), interval: str = INTERVAL,
           credentials_file: Path | None = None) -> dict[str, Any]:
    """prometheus.yml: every `boxoffice-metrics` instance Consul knows (through the
    adapter on `sd_port`), scraped; with the scrape token in `credentials_file` sent as
    `Authorization: Bearer` (common/internal_auth.py `METRICS_TOKEN_ENV`)."""
    meta = "__meta_consul_service_metadata_"
    scrape: dict[str, Any] = ({"authorization": {"type": "Bearer", "credentials_file": str(credentials_file)}}
                              if credentials_file is not None else {})
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": interval},
        "rule_files": [str(path) for path in rules],
        "scrape_configs": [{
            "job_name": "boxoffice",
            **scrape,
            "http_sd_configs": [{"url": f"http://{LOCAL}:{sd_port}/targets",
                                 "refresh_interval": interval}],
            "relabel_configs": [
                {"source_labels": [f"{meta}process"], "target_label": "instance"},
                {"source_labels": [f"{meta}component"], "target_label": "component"},
                {"source_labels": [f"{meta}host"], "target_label": "host"},
            ],
        }],
    }


def targets(instances: Iterable[ServiceInstance]) -> list[dict[str, Any]]:
    """Registered `boxoffice-metrics` instances as HTTP service discovery target groups
    (one per instance, its Meta as `__meta_consul_service_metadata_*` labels)."""
    return [{"targets": [f"{i.address or LOCAL}:{i.port}"],
             "labels": {f"__meta_consul_service_metadata_{k}": v
                        for k, v in i.meta.items() if k.replace("_", "").isalnum()}}
            for i in instances]


def sd_app(store: MapStore) -> web.Application:
    """The adapter: `GET /targets`, the registry's metrics endpoints (HTTP SD format)."""
    async def handler(_: web.Request) -> web.Response:
        try:
            _, instances = await store.watch_instances(METRICS_SERVICE, 0)
        except MapError:
            raise web.HTTPServiceUnavailable() from None  # Prometheus keeps its last targets
        return web.json_response(targets(instances))

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        yield
        await store.close()

    app = web.Application()
    app.router.add_get("/targets", handler)
    app.cleanup_ctx.append(lifecycle)
    return app


class Prometheus:
    """One Prometheus server and its discovery adapter: configuration and data under
    `directory`."""

    def __init__(self, directory: Path, port: int, sd_port: int, consul_port: int,
                 consul_token: str | None = None, scrape_token: str | None = None) -> None:
        self.directory = directory
        self.scrape_token = scrape_token  # sent to the metrics listeners (a file of its own)
        self.consul_token = consul_token  # the adapter's: reads the registry
        self.port = port
        self.sd_port = sd_port
        self.consul_port = consul_port
        self.adapter: ManagedProcess | None = None
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        from deploy.services import python_process

        self.directory.mkdir(parents=True, exist_ok=True)
        self.adapter = python_process(
            "prometheus-sd", "deploy.prometheus",
            ["sd", "--consul-port", str(self.consul_port), "--port", str(self.sd_port)],
            self.directory / "sd.log",
            env={CONSUL_TOKEN_ENV: self.consul_token, "CONSUL_HTTP_TOKEN": ""} if self.consul_token else None)
        self.adapter.start()
        wait_until(lambda: port_open(LOCAL, self.sd_port), "prometheus discovery adapter", timeout,
                   alive=self.adapter.running)
        config_file = self.directory / "prometheus.yml"
        credentials = None
        if self.scrape_token:
            credentials = self.directory / "scrape-token"
            fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(self.scrape_token)
        config_file.write_text(yaml.safe_dump(config(self.sd_port, credentials_file=credentials),
                                              sort_keys=False))
        self.process = ManagedProcess("prometheus", [
            find_tool("prometheus"), f"--config.file={config_file}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address={LOCAL}:{self.port}",
            "--storage.tsdb.retention.time=1d", "--log.level=warn",
        ], self.directory / "prometheus.log")
        self.process.start()
        try:
            wait_until(self.ready, "prometheus ready", timeout, interval=0.1, alive=self.process.running)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.process.log_tail(5)}") from None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.prometheus")
    sub = parser.add_subparsers(dest="command", required=True)
    sd = sub.add_parser("sd", help="serve Consul's metrics endpoints to Prometheus (HTTP SD)")
    sd.add_argument("--consul-port", type=int, required=True)
    sd.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    store = ConsulMapStore(host=LOCAL, port=args.consul_port)
    web.run_app(sd_app(store), host=LOCAL, port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
