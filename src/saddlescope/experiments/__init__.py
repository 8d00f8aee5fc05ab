"""Studies built on the layers below: the optimizer escape race (:mod:`.race`, :mod:`.race_problems`);
the min-ratio study (:mod:`.min_ratio`) with its critical-point search (:mod:`.critical_search`) and
resumable record store (:mod:`.records`)."""

from saddlescope.experiments.critical_search import SearchResult, find_critical_point
from saddlescope.experiments.min_ratio import (
    MinRatioConfig,
    MinRatioStudy,
    MinRatioSummary,
    NetworkConfig,
    min_ratio,
    run_network,
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
    "RecordStore",
    "SearchResult",
    "find_critical_point",
    "min_ratio",
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
