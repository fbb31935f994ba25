"""Loading, converting, adapting (LoRA, 4-bit) and merging models: :mod:`alignkit.modeling.models`."""
