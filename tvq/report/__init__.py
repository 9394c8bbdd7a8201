"""Load and check the pipeline's result files for the notebooks in workflow/notebooks/.

The notebooks only read what other stages wrote: result JSONs from `tvq evaluate`, a
run's metrics.jsonl and curves from `tvq train`, and the tables from `tvq bench
throughput`. Every loader raises ReportError, naming the file and the problem, when a
file is missing or malformed. tvq.report.render runs a notebook with papermill.
"""

from tvq.report.errors import ReportError

__all__ = ["ReportError"]
