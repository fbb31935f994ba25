"""Constitutional AI and RLAIF: constitutions (:mod:`~alignkit.cai.constitution`) and AI judges
(:mod:`~alignkit.cai.judges`)."""
