"""explainserve: explanations and anomaly verdicts for CNN image and video classifiers."""

import os

# MKL's matrix products may round differently with the memory alignment of their operands (seen
# with AVX-512), so one sample's alpha could differ in the last bit between two builds of a store
# and a sharded build would not merge into the bytes of an unsharded one. Conditional numerical
# reproducibility on the CPU's own code path ("AUTO") makes them alignment-independent. MKL reads
# it when it first runs, so it is set on import, before any product; a user's setting is kept.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
