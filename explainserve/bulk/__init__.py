"""Bulk explanations: ``explainserve explain DIR|MANIFEST --out OUTDIR``.

:func:`list_inputs` finds the inputs, :func:`run_bulk` sends them through Explain with a
bound on concurrent calls and retries, writing ``results.jsonl`` (one line per input) and the
pictures, and :func:`write_report` turns the folder into a self-contained ``report.html``.
"""

from explainserve.bulk.inputs import BulkInput, list_inputs
from explainserve.bulk.report import write_report
from explainserve.bulk.runner import BulkOptions, run_bulk

__all__ = ["BulkInput", "BulkOptions", "list_inputs", "run_bulk", "write_report"]
