"""Evaluation: the greedy accuracy check every training stage runs (:mod:`~alignkit.evaluation.accuracy`),
eval suites and their selection methods (:mod:`~alignkit.evaluation.suite`) and reports
(:mod:`~alignkit.evaluation.report`)."""
