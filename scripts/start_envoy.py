"""Envoy on gateway/envoy.yaml rendered for the settings: docker-compose's
envoy container (`python scripts/start_envoy.py`, from the image's /app).

The file itself is never run as it is: the per-client rate limit
(AGENTLAB_RATE_LIMIT) is rendered into it here, by the same function as for
`make run` and the tests (agentlab.devstack.render_envoy_config). A bad
value stops the container with the reason and exit code 2.

  --print   write the rendered configuration to stdout instead of starting Envoy
  --replica-port PORT   another service process on 127.0.0.1:PORT behind the
            same cluster (repeatable; compose's second replica)
Other arguments go to Envoy (e.g. --log-level warn).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from agentlab.config import ConfigError, Settings
from agentlab.devstack import DEFAULT_PORTS, envoy_binary, render_envoy_config

# Relative to the working directory (the image's /app, or a checkout), not to
# the installed package: in the image agentlab lives in site-packages.
SOURCE = Path("gateway/envoy.yaml")
DESCRIPTOR = Path("build/agentlab.pb")


def replica_ports(argv: list[str]) -> tuple[tuple[int, ...], list[str]]:
    """The ports of each ``--replica-port PORT`` in ``argv``, and the rest.
    Raises ValueError for a port that is not a number from 1 to 65535."""
    ports: list[int] = []
    rest: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        if argument != "--replica-port":
            rest.append(argument)
            continue
        value = next(arguments, "")
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ValueError(f"--replica-port needs a port number, not {value!r}")
        ports.append(int(value))
    return tuple(ports), rest


def main(argv: list[str]) -> int:
    try:
        settings = Settings.from_env()
        replicas, argv = replica_ports(argv)
    except (ConfigError, ValueError) as error:
        print(f"envoy: configuration error: {error}", file=sys.stderr)
        return 2
    config = render_envoy_config(
        dataclasses.replace(DEFAULT_PORTS, replicas=replicas),
        descriptor=DESCRIPTOR.resolve(),
        rate_limit=settings.rate_limit,
        source=SOURCE,
    )
    if argv[:1] == ["--print"]:
        sys.stdout.write(config)
        return 0
    print(f"envoy: AGENTLAB_RATE_LIMIT={settings.rate_limit}", file=sys.stderr, flush=True)
    fd, path = tempfile.mkstemp(prefix="envoy-", suffix=".yaml")
    with os.fdopen(fd, "w") as out:
        out.write(config)
    envoy = envoy_binary()
    # exec: Envoy becomes the container's main process and gets its signals.
    os.execv(envoy, [envoy, "-c", path, "--disable-hot-restart", *argv])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
