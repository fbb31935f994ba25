"""alignkit's data layer: one call, :func:`load_dataset`, turns a :class:`~alignkit.core.config.DataSpec` into a
``datasets.Dataset`` in one of the canonical formats (``sft``, ``problems``, ``preference``, ``stepwise``,
``text``; see :mod:`alignkit.data.formats`).

>>> from alignkit.core.config import DataSpec
>>> ds = load_dataset(DataSpec(source="arith", params={"n": 8}), "problems")
>>> ds.column_names, len(ds)
(['prompt', 'answer', 'steps', 'values'], 8)

``datasets`` is imported lazily: importing this package is cheap.
"""

from alignkit.data.arith import arith_text, check_steps
from alignkit.data.formats import FORMATS, normalise_answer
from alignkit.data.loading import load_dataset, read_file, split_eval

__all__ = [
    "FORMATS", "arith_text", "check_steps", "load_dataset", "normalise_answer", "read_file", "split_eval",
]
