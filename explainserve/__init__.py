"""explainserve: explanations and anomaly verdicts for CNN image and video classifiers."""

__version__ = "0.1.0"
