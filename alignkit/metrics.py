"""``alignkit.metrics``: the selection metrics (pass@k, votes, best-of-N, ranking, bootstrap), kept importable under the name earlier issues and docs use;
the code lives in :mod:`alignkit.maths.selection`."""

from alignkit.maths.selection import (
    Pool,
    SELECTION_METHODS,
    STEP_AGGREGATIONS,
    aggregate_steps,
    best_of_n,
    bootstrap_ci,
    majority_vote,
    pairwise_ranking,
    pass_at_k,
    selection_curve,
    sign_test,
    weighted_vote,
)

__all__ = ['Pool', 'SELECTION_METHODS', 'STEP_AGGREGATIONS', 'aggregate_steps', 'best_of_n', 'bootstrap_ci', 'majority_vote', 'pairwise_ranking', 'pass_at_k', 'selection_curve', 'sign_test', 'weighted_vote']
