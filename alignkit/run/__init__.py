"""Running recipes: the recipe file (:mod:`~alignkit.run.recipe`), the pipeline that runs its stages
(:mod:`~alignkit.run.pipeline`), Hub export (:mod:`~alignkit.run.hub`), the shipped files and ``alignkit init``."""
