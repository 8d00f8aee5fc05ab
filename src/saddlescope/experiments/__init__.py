"""Studies built on the layers below: the optimizer escape race (:mod:`.race`, :mod:`.race_problems`);
the min-ratio study (:mod:`.min_ratio`) with its critical-point search (:mod:`.critical_search`) and
resumable record store (:mod:`.records`); the saddle-prevalence study (:mod:`.prevalence`)."""

from saddlescope.experiments.critical_search import SearchResult, find_critical_point
from saddlescope.experiments.min_ratio import (
    MinRatioConfig,
    MinRatioStudy,
    MinRatioSummary,
    NetworkConfig,
    min_ratio,
    run_network,
)
from saddlescope.experiments.prevalence import (
    PrevalenceConfig,
    PrevalenceStudy,
    grf_minimum_fraction,
    prevalence_study,
)
from saddlescope.experiments.race import (
    BEST_LR_RULE,
    OPTIMIZERS,
    LrRow,
    RaceOptimizer,
    RaceResult,
    RaceSummary,
    RunRecord,
    get_optimizer,
    race,
    read_records,
    run_one,
)
from saddlescope.experiments.race_problems import (
    PROBLEMS,
    DuChain,
    RaceInstance,
    RaceProblem,
    du_chain_problem,
    get_problem,
)
from saddlescope.experiments.records import RecordStore

__all__ = [
    "MinRatioConfig",
    "MinRatioStudy",
    "MinRatioSummary",
    "NetworkConfig",
    "PrevalenceConfig",
    "PrevalenceStudy",
    "RecordStore",
    "SearchResult",
    "find_critical_point",
    "grf_minimum_fraction",
    "min_ratio",
    "prevalence_study",
    "run_network",
    "BEST_LR_RULE",
    "OPTIMIZERS",
    "PROBLEMS",
    "DuChain",
    "LrRow",
    "RaceInstance",
    "RaceOptimizer",
    "RaceProblem",
    "RaceResult",
    "RaceSummary",
    "RunRecord",
    "du_chain_problem",
    "get_optimizer",
    "get_problem",
    "race",
    "read_records",
    "run_one",
]
