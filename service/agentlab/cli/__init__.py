"""The `agentlab` command: the gateway from a terminal (agentlab.client
underneath). ``app.py`` declares the commands; ``live.py`` draws an
orchestration as it happens; ``output.py`` holds JSON, errors and exit codes."""
