"""The LaMP-7 evaluation: baselines, Chameleon at user / group / unseen-user level, ablations, report.

    from chameleon.evaluation import EvalSettings, run_evaluation, write_report

The names load on attribute access, so importing the package (as the command-line parser does)
imports neither torch nor numpy.

Modules: `names` (methods, ablations, defaults), `lamp` (LaMP-7 data), `split` (the split rule),
`baselines`, `metrics`, `retrieval`, `cache` (prediction cache), `scoring`, `runs` (synthesis and
derived runs), `ablations`, `runner` (the orchestrator), `report`, `cli`; metrics that see
personalization: `attribution`, `personalization` (marker transfer, closeness-adjusted gain, the
`per_user` block), `style_goals` (issue 18's goals), `capacity` (the model's style capacity),
`recompute` (figures from results.json alone), `report_style` (their report section).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalSettings": "chameleon.evaluation.settings",
    "run_evaluation": "chameleon.evaluation.runner",
    "write_report": "chameleon.evaluation.report",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chameleon.evaluation' has no attribute {name!r}")
