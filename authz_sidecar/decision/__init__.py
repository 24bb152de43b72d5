"""The decision path: who is asking (identity, tokens and their keys), the serving snapshot's
holder, and the path from a request's plain values to an answer, shared by every front."""
