"""`make run`: the service and its Envoy sidecar, on the default ports unless
told otherwise (the ports of gateway/envoy.yaml; `make run ARGS="--gateway-port
N ..."`).

The service gets the user's environment, AGENTLAB_* settings included, as
`python -m agentlab` would. Before anything starts they are checked (the
files they name read as the service reads them) and printed, secrets left
out; a setting that cannot be honoured stops here with exit code 2.

Ctrl-C (or SIGTERM) drains the service and stops Envoy; nothing is left
running.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import replace

from agentlab import preflight
from agentlab.config import ConfigError, Settings
from agentlab.devstack import DEFAULT_PORTS, EnvoyProcess, Ports, ServiceProcess
from agentlab.metrics.exposition import OFF, split_address

# Hosts a service can listen on and still be reached by Envoy, which sends
# to 127.0.0.1 (gateway/envoy.yaml).
_REACHABLE_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "::")

CURL = (
    "curl -X POST http://localhost:{port}/api/v1/execute -H 'Content-Type: application/json' "
    "{auth}\\\n"
    '     -d \'{{"prompt": "Dime 3 números primos", "model": "mistral7b"}}\''
)


def parse_ports(argv: list[str] | None) -> Ports:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway-port", type=int, default=DEFAULT_PORTS.gateway)
    parser.add_argument("--service-port", type=int, default=DEFAULT_PORTS.service)
    parser.add_argument("--admin-port", type=int, default=DEFAULT_PORTS.admin)
    # Where the service serves metrics unless AGENTLAB_METRICS_ADDRESS says.
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS.metrics)
    args = parser.parse_args(argv)
    return Ports(
        gateway=args.gateway_port,
        service=args.service_port,
        admin=args.admin_port,
        metrics=args.metrics_port,
    )


def service_env(environ: Mapping[str, str], port: int) -> dict[str, str]:
    """The user's environment with the service's address where Envoy sends;
    an AGENTLAB_GRPC_ADDRESS elsewhere cannot be honoured."""
    address = f"127.0.0.1:{port}"
    given = environ.get("AGENTLAB_GRPC_ADDRESS", "").strip()
    if given:
        host, _, given_port = given.rpartition(":")
        if given_port != str(port) or host.strip("[]") not in _REACHABLE_HOSTS:
            raise ConfigError(
                f"AGENTLAB_GRPC_ADDRESS={given}: under make run the service listens where "
                f"Envoy sends, {address}; unset it, or move both with "
                "make run ARGS='--service-port N'"
            )
        address = given
    return {**environ, "AGENTLAB_GRPC_ADDRESS": address}


def metrics_env(environ: Mapping[str, str], port: int) -> dict[str, str]:
    """``environ`` with the service's metrics on ``port`` unless
    AGENTLAB_METRICS_ADDRESS says where: set before the configuration is
    read, so that what make run prints is where they are served."""
    if environ.get("AGENTLAB_METRICS_ADDRESS", "").strip():
        return dict(environ)
    return {**environ, "AGENTLAB_METRICS_ADDRESS": f"127.0.0.1:{port}"}


def main(argv: list[str] | None = None) -> int:
    ports = parse_ports(argv)
    try:
        env = metrics_env(service_env(os.environ, ports.service), ports.metrics)
        settings = Settings.from_env(env)
        applied = preflight.check(settings, env)
    except ConfigError as error:
        print(f"make run: configuration error: {error}", file=sys.stderr)
        return 2
    print("configuration (README.md, Configuration):", flush=True)
    for line in applied.lines():
        print(f"  {line}", flush=True)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    # With keys, the example call needs one too.
    auth = '-H "Authorization: Bearer $KEY" ' if settings.api_keys_file else ""
    if settings.metrics_address != OFF:
        # Envoy's GET /metrics goes where the service serves them.
        ports = replace(ports, metrics=split_address(settings.metrics_address)[1])
    service = ServiceProcess(
        port=ports.service,
        environ=env,
        env={"AGENTLAB_GRPC_ADDRESS": env["AGENTLAB_GRPC_ADDRESS"]},
        metrics_port=ports.metrics,
    )
    envoy = EnvoyProcess(ports=ports, rate_limit=settings.rate_limit)
    metrics = (
        "off (AGENTLAB_METRICS_ADDRESS=off)"
        if settings.metrics_address == OFF
        else f"{envoy.url}/metrics, the service's own http://{settings.metrics_address}/metrics"
    )
    try:
        print(f"starting the service on {service.address} ...", flush=True)
        service.start()
        if not service.serving():
            print(
                "warning: no backend of a model is reachable: the service answers, "
                "NOT_SERVING, until one is (GET /api/v1/health says which)",
                file=sys.stderr,
                flush=True,
            )
        print(f"starting envoy on {envoy.url} ...", flush=True)
        envoy.start()
        print(
            f"\nready:\n"
            f"  REST (Envoy)   {envoy.url}/api/v1/...\n"
            f"  gRPC (Envoy)   127.0.0.1:{ports.gateway}\n"
            f"  gRPC (direct)  {service.address}\n"
            f"  Envoy admin    http://127.0.0.1:{ports.admin} (metrics: /stats/prometheus)\n"
            f"  metrics        {metrics}\n\n"
            f"try:\n  {CURL.format(port=ports.gateway, auth=auth)}\n\n"
            "Ctrl-C stops both.",
            flush=True,
        )
        while not stop.wait(0.5):
            if service.proc and service.proc.poll() is not None:
                print("the service exited", file=sys.stderr)
                return 1
            if envoy.proc and envoy.proc.poll() is not None:
                print("envoy exited", file=sys.stderr)
                return 1
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as error:
        print(f"make run: {error}", file=sys.stderr)
        return 1
    finally:
        # The service drains first (NOT_SERVING, in-flight calls finish) while
        # Envoy still carries their responses; then Envoy goes.
        code = service.stop()
        envoy.stop()
        print(f"stopped (service exit code {code})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
