"""What Envoy and applications talk to: ext_authz over gRPC and over HTTP, the application API,
the Registry service, the gRPC server models, and the ops HTTP endpoint. Each front parses its own
wire format into plain values and renders the decision path's answer back."""
