"""Ray orchestration of fit and score (see DESIGN.md's data flow): runtime, fit, score, layout and resume."""

from spade_batch.pipeline.fit import FitSummary, RetryableInputError, run_fit
from spade_batch.pipeline.layout import Outputs
from spade_batch.pipeline.runtime import init_ray
from spade_batch.pipeline.score import ScoreSummary, run_score

__all__ = ["FitSummary", "Outputs", "RetryableInputError", "ScoreSummary", "init_ray", "run_fit", "run_score"]
