"""The gRPC edge: servicers, proto conversion and error statuses."""
