"""``make bench``: the sidecar measured beside Envoy's floor, Envoy's RBAC filter and bare Python
servers, all in one run on this machine, reported as ratios to those baselines."""
