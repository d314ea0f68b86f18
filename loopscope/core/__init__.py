"""The core: the :class:`~loopscope.core.loop.Loop` protocol (``loop``), ``unroll``, ``trace``,
``interventions``, hook ``capture``, the ``result`` contract, ``errors``, ``targets`` (the -100
convention), ``numerics`` (the divergence guard), safe ``io``, ``wrap`` (hook points on the looped
submodule of any ``nn.Module``) and ``layout`` (a Loop's declared state axes). Nothing here imports
a model, a task or an analysis.

The names users need are re-exported by :mod:`loopscope` itself (``ls.Loop``, ``ls.unroll``,
``ls.Trace``, ``ls.Result`` ...). This package's face imports nothing, so that a light module
(``loopscope.core.errors``, which the CLI needs before it knows the command) does not pay for
torch and TransformerLens.
"""
