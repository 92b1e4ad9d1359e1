"""A budgeted recipe search for one task of a registry (Optuna: TPE sampling, successive halving).

``space``: the searched keys and the budget; ``setup``: the trial registries and every check made
before a trial runs; ``search``: the Optuna loop; ``report``: the trials table, the plot and the
recipe a user keeps. Above ``waterdrop.engine``: it trains through the engine, never the reverse.
"""

from waterdrop.tuning.search import run_search
from waterdrop.tuning.space import TuneError, parse_budget

__all__ = ["TuneError", "parse_budget", "run_search"]
