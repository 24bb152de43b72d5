"""What a platform team deploys beside the sidecar: Envoy configs generated from a service's catalog."""
