"""loopscope.circuits — per-iteration patching (batched), state transplant, computation-graph
memorization statistics."""

from loopscope.circuits.compgraph import (
    digit_df,
    document_frequency,
    graph_metrics,
    logistic_slope,
    subgraph_keys,
)
from loopscope.circuits.patching import logit_diff_metric, patch_sweep, state_transplant

__all__ = [
    "patch_sweep",
    "state_transplant",
    "logit_diff_metric",
    "subgraph_keys",
    "document_frequency",
    "digit_df",
    "graph_metrics",
    "logistic_slope",
]
