"""loopscope.probes — per-iteration linear probes (batched over iterations), transfer, onset,
causal set-projection."""

from loopscope.probes.linear import (
    ProbeResult,
    fit_probes,
    onset,
    probe_trace,
    steer_set_projection,
    transfer_matrix,
)

__all__ = [
    "ProbeResult",
    "fit_probes",
    "onset",
    "probe_trace",
    "steer_set_projection",
    "transfer_matrix",
]
