#!/bin/sh
# The compose stack's init step, run once before the sidecars, Envoys and the controller start (and
# again by every `docker compose up`, so each step is one a re-run cannot break):
#  1. the demo issuer's JWKS (for Envoy's jwt_authn) and tokens (for you), from a key kept in the
#     shared volume: a re-run writes the same JWKS, which Envoys already running still hold;
#  2. etcd seeded from examples/policy the way an operator would: the service's catalog, the active
#     set (only when etcd has none yet) and the shadows (a shadow's request id makes a re-run a no-op).
set -eu
DEMO=${DEMO_DIR:-/var/lib/authz-demo}
POLICY=${POLICY_DIR:-/policy}

python -m authz_sidecar.local.tokens --key "$DEMO/issuer.pem" --jwks "$DEMO/jwks.json" --tokens "$DEMO/tokens.env"
echo "init: the demo JWKS is in $DEMO/jwks.json, tokens in $DEMO/tokens.env"

ctl() { authz-sidecar ctl "$@" --etcd "$AUTHZ_ETCD"; }
ctl registry put --file "$POLICY/catalog.yaml"
if ctl status --json | python -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["active"] else 1)'; then
    echo "init: etcd already holds an active set; left as it is"
else
    ctl init --file "$POLICY/active.yaml"
fi
for shadow in "$POLICY"/shadows/*.yaml; do
    [ -e "$shadow" ] || continue
    ctl propose --file "$shadow"
done
ctl status
