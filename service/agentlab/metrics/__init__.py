"""Prometheus metrics: GenAI conventions per execution, per graph node, and
the gateway's own (executions, limits, store, bus, backends).

Layered between the executions and labs (which report here) and the core
(whose events and types are what is reported). ``instruments`` names every
series; ``record`` is what the hooks call; ``exposition`` serves them.
"""
