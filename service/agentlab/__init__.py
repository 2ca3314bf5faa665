"""Agent Lab Gateway: the gRPC service between the frontend and the LLM lab.

Layers, outermost first: ``api`` (gRPC servicers, proto conversion, statuses)
-> ``core`` (use cases and domain types, no gRPC) -> ``lab`` (backends and
models). ``server`` composes them; ``v1`` holds the stubs generated from
``protos/``.
"""
