"""`make run`: the service and its Envoy sidecar, on the default ports unless
told otherwise (the ports of gateway/envoy.yaml).

Ctrl-C (or SIGTERM) drains the service and stops Envoy; nothing is left
running.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from agentlab.devstack import DEFAULT_PORTS, EnvoyProcess, Ports, ServiceProcess

CURL = (
    "curl -X POST http://localhost:{port}/api/v1/execute -H 'Content-Type: application/json' \\\n"
    '     -d \'{{"prompt": "Dime 3 números primos", "model": "mistral7b"}}\''
)


def parse_ports(argv: list[str] | None) -> Ports:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway-port", type=int, default=DEFAULT_PORTS.gateway)
    parser.add_argument("--service-port", type=int, default=DEFAULT_PORTS.service)
    parser.add_argument("--admin-port", type=int, default=DEFAULT_PORTS.admin)
    args = parser.parse_args(argv)
    return Ports(gateway=args.gateway_port, service=args.service_port, admin=args.admin_port)


def main(argv: list[str] | None = None) -> int:
    ports = parse_ports(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    service = ServiceProcess(port=ports.service)
    envoy = EnvoyProcess(ports=ports)
    try:
        print(f"starting the service on {service.address} ...", flush=True)
        service.start()
        print(f"starting envoy on {envoy.url} ...", flush=True)
        envoy.start()
        print(
            f"\nready:\n"
            f"  REST (Envoy)   {envoy.url}/api/v1/...\n"
            f"  gRPC (Envoy)   127.0.0.1:{ports.gateway}\n"
            f"  gRPC (direct)  {service.address}\n"
            f"  Envoy admin    http://127.0.0.1:{ports.admin}\n\n"
            f"try:\n  {CURL.format(port=ports.gateway)}\n\n"
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
