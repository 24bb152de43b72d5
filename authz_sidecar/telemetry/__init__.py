"""Where telemetry goes: Prometheus metrics, OTLP spans (encoded and exported off the request path),
JSON logs, and the shadow-report tally each sidecar keeps. Never blocks an answer."""
