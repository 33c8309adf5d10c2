"""The batch-norm doctor: find the mistakes that silently cost accuracy, in any PyTorch model.

- `diagnose` looks at a model (and, given data, at its statistics);
- `watch` looks at what a block of code does (training steps, evaluation);

both return `Finding` objects (``code``, ``layer``, ``message``, ``fix``), one per
(code, layer); `CODES` lists the codes and `format_findings` prints a table.
"""

from ._diagnose import diagnose
from ._finding import CODES, Finding, format_findings
from ._watch import Watch, watch

__all__ = ["CODES", "Finding", "Watch", "diagnose", "format_findings", "watch"]
