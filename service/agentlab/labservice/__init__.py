"""The lab service: the embedded lab as its own process, behind the HTTP API
the gateway's http_lab backend calls. Run it with ``python -m agentlab.labservice``."""
