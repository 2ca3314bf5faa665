"""What the service tells its operators beyond its answers: traces
(OpenTelemetry, ``tracing``) and log lines that say which request caused
them (``logs``). Both cost nothing measurable while they are off."""
