"""loopscope.circuits — per-iteration patching (batched), path patching across iterations, state
transplant, attribution, unrolled circuit graphs, computation-graph memorization statistics and
heuristic neurons.

>>> from loopscope.circuits import patch_sweep, path_patch, state_transplant, attribution, circuit_graph
"""

from loopscope.circuits import heuristics, toys
from loopscope.circuits.attribution import AttributionResult, attribution
from loopscope.circuits.compgraph import (
    NullModel,
    SubgraphIndex,
    digit_df,
    document_frequency,
    graph_metrics,
    logistic_slope,
    node_taxonomy,
    null_model,
    num_hit,
    relative_ig,
    relative_ig_table,
    subgraph_keys,
    taxonomy_by_layer,
    taxonomy_frame,
)
from loopscope.circuits.corruptions import (
    Corruption,
    STRPairs,
    gaussian_noise,
    mean_ablation,
    resample,
    str_pairs,
    zero_ablation,
)
from loopscope.circuits.graph import CircuitGraph, circuit_graph, jaccard_by_iteration
from loopscope.circuits.metrics import AnswerMetric, logit_diff_metric
from loopscope.circuits.patching import SweepResult, patch_sweep, state_transplant
from loopscope.circuits.path_patching import (
    PathNode,
    PathTraces,
    path_patch,
    path_patch_sweep,
    path_traces,
)

__all__ = [
    "patch_sweep",
    "state_transplant",
    "SweepResult",
    "path_patch",
    "path_patch_sweep",
    "path_traces",
    "PathNode",
    "PathTraces",
    "attribution",
    "AttributionResult",
    "circuit_graph",
    "CircuitGraph",
    "jaccard_by_iteration",
    "logit_diff_metric",
    "AnswerMetric",
    "Corruption",
    "STRPairs",
    "str_pairs",
    "resample",
    "mean_ablation",
    "zero_ablation",
    "gaussian_noise",
    "subgraph_keys",
    "SubgraphIndex",
    "num_hit",
    "node_taxonomy",
    "taxonomy_frame",
    "taxonomy_by_layer",
    "relative_ig",
    "relative_ig_table",
    "null_model",
    "NullModel",
    "document_frequency",
    "digit_df",
    "graph_metrics",
    "logistic_slope",
    "heuristics",
    "toys",
]
