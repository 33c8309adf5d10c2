"""The batch-norm doctor: find the mistakes that silently cost accuracy, in any PyTorch model.

- :func:`diagnose` looks at a model (and, given data, at its statistics);
- :func:`watch` looks at what a block of code does (training steps, evaluation);

both return :class:`Finding` objects (``code``, ``layer``, ``message``, ``fix``), one per
(code, layer); :data:`CODES` lists the codes and :func:`format_findings` prints a table.
"""

from ._diagnose import diagnose
from ._finding import CODES, Finding, format_findings
from ._watch import Watch, watch

__all__ = ["CODES", "Finding", "Watch", "diagnose", "format_findings", "watch"]
