"""Which traces are recorded: the ``OTEL_TRACES_SAMPLER`` choices, with the specification's trace id
ratio rule (the trace id's low 64 bits under ratio * 2^64), so every process of a trace agrees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from authz_sidecar.telemetry.tracecontext import Parent

log = structlog.get_logger("authz_sidecar.telemetry.sampling")
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Sampler:
    """The OTEL_TRACES_SAMPLER choices, with the spec's trace id ratio rule (the trace id's low
    64 bits under ratio * 2^64), so every process of a trace agrees."""

    name: str = "parentbased_always_on"
    ratio: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Sampler:
        name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        if name not in _SAMPLERS:
            log.warning("unknown_sampler", sampler=name, using="parentbased_always_on")
            name = "parentbased_always_on"
        ratio = 1.0
        if name.endswith("traceidratio"):
            try:
                ratio = min(1.0, max(0.0, float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
            except ValueError:
                log.warning("bad_sampler_arg", value=environ.get("OTEL_TRACES_SAMPLER_ARG"))
        return cls(name, ratio)

    def sampled(self, trace_id: int, parent: Parent | None) -> bool:
        if parent is not None and self.name.startswith("parentbased"):
            return parent.sampled
        base = self.name.removeprefix("parentbased_")
        if base == "always_on":
            return True
        if base == "always_off":
            return False
        return (trace_id & _MASK64) < self.ratio * 2**64
