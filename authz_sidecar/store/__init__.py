"""Where policy comes from and goes to: the etcd client and key layout, the control plane's writes
(the policy store), the sources a sidecar follows (etcd, a directory), the disk copy, and what a
sidecar writes itself (its registration, its shadow reports)."""
