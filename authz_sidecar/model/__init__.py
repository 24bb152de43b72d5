"""The permission model and the decision, pure: no I/O, no protobuf, no etcd, no YAML.

Values (sets, grants, rollouts, catalogs), the compiled engine, route tables, selection of the
deciding set, evaluation of the others beside it, the immutable snapshot, and the per-document
assembly that builds one. Everything here is a function of its arguments, so it can be tested and
reasoned about alone.
"""
