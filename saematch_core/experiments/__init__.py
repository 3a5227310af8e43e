"""The study of the paper: experiments on SAEs, their measures, and the claims they test.

Layered inside (a module imports only from its own layer or below; ``docs/ARCHITECTURE.md``):

1. **base**: :mod:`~.inputs` (:class:`~.inputs.Inputs`, what every experiment takes) and
   :mod:`~.results` (typed JSON results, the content-keyed result cache, shared matchings);
2. **measures**: :mod:`~.measures` (co-activation, Matching Score, the calibrated verdict, links,
   scales, ...): the primitives several experiments share;
3. **experiments**, one per module, each ``run(inputs, config) -> Result`` with a frozen config
   dataclass: :mod:`~.scale` (Fig. 1), :mod:`~.parameter_mse` (Figs. 3/12),
   :mod:`~.matching_score` (Figs. 4/7), :mod:`~.agreement` (Figs. 5/6), :mod:`~.persistence`
   (Fig. 8), :mod:`~.approximate` (Figs. 10–17), :mod:`~.objective` (the objective ablation and
   Fig. 15), :mod:`~.decision`, :mod:`~.splits`,
   :mod:`~.family_fold`, :mod:`~.theta_scale`, :mod:`~.circularity`, :mod:`~.databased`,
   :mod:`~.ceiling` (beyond the paper). An experiment never imports another experiment. Beside
   them, the views the notebooks show: :mod:`~.study` (a profile loaded for the book) and
   :mod:`~.appendix` (benchmarks, environment);
4. **claims**: :mod:`~.claims`, every tested claim with its measurement and verdict rule.

Import from the modules; this package re-exports nothing (importing it loads no experiment).
"""

__all__: list[str] = []
