"""loopscope.probes — per-iteration probes, controls, transfer, causal checks, inductive bias.

* :func:`collect` / :class:`ActivationSet` / :class:`ActivationStore`: activations keyed by
  (iteration, site, position), in memory or on disk (safetensors shards + JSON index).
* :func:`fit_probes`: ridge / L2-logistic / low-rank / MLP probes for all iterations and sites in
  one batched solve (also ``fit_probes(trace, targets)``); :class:`LinearProbe` estimator.
* :func:`control_task`, :func:`type_keys`, :func:`selectivity` (Hewitt & Liang).
* :func:`transfer_matrix`, :func:`onset`, :func:`onset_regression`, :func:`logit_lens`.
* :func:`steer`, :func:`dose_response`, :func:`intervene`, :func:`erase` (LEACE / INLP),
  :func:`interchange_intervention_accuracy`.
* :func:`inductive_bias`, :func:`inductive_bias_probe` (Vafa et al.).

Every fit and measurement returns a :class:`loopscope.Result` (``meta``, a tidy ``to_frame()``,
``summary()`` of floats); every option is an explicit keyword parameter.
"""

from loopscope.probes.activations import ActivationSet, collect
from loopscope.probes.controls import SelectivityResult, control_task, selectivity, type_keys
from loopscope.probes.fit import LinearProbe, ProbeResult, fit_probes
from loopscope.probes.inductive_bias import (
    InductiveBiasResult,
    inductive_bias,
    inductive_bias_probe,
    linear_head,
    white_noise,
)
from loopscope.probes.splits import make_folds
from loopscope.probes.steer import (
    DoseResponse,
    EditResult,
    Eraser,
    IIAResult,
    add_direction,
    dose_response,
    erase,
    interchange_intervention_accuracy,
    intervene,
    project_out,
    set_projection,
    steer,
)
from loopscope.probes.store import ActivationStore
from loopscope.probes.trace_fit import TraceProbeResult, fit_trace, probe_trace
from loopscope.probes.transfer import (
    LensResult,
    OnsetRegression,
    OnsetResult,
    TransferResult,
    logit_lens,
    onset,
    onset_regression,
    transfer_matrix,
)

__all__ = [
    "ActivationSet",
    "ActivationStore",
    "DoseResponse",
    "EditResult",
    "Eraser",
    "IIAResult",
    "InductiveBiasResult",
    "LensResult",
    "LinearProbe",
    "OnsetRegression",
    "OnsetResult",
    "ProbeResult",
    "SelectivityResult",
    "TraceProbeResult",
    "TransferResult",
    "add_direction",
    "collect",
    "control_task",
    "dose_response",
    "erase",
    "fit_probes",
    "fit_trace",
    "inductive_bias",
    "inductive_bias_probe",
    "interchange_intervention_accuracy",
    "intervene",
    "linear_head",
    "logit_lens",
    "make_folds",
    "onset",
    "onset_regression",
    "probe_trace",
    "project_out",
    "selectivity",
    "set_projection",
    "steer",
    "transfer_matrix",
    "type_keys",
    "white_noise",
]
