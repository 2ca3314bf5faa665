"""The gRPC edge: request checks, servicers, proto conversion, and sending
error statuses (built by ``agentlab.executions.codec.rpc_status``)."""
