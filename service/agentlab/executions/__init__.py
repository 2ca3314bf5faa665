"""Executions as durable resources: records, their events, live fan-out."""
