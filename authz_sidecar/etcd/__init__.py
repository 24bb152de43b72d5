"""etcd as the source of truth: the key layout, the client, and the control plane's reads and writes."""
