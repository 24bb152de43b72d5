"""The control plane: ``authz-sidecar ctl`` (propose, canary, status, report, registry), with the
change lifecycle (promotion, rollback, analysis, dead-letter queue, audit) to come."""
