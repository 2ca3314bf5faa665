"""Use cases and domain types. Nothing here knows about gRPC or protobuf."""
