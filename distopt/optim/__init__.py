"""Update rules, the sharding plan, and the sharded (ZeRO stage 0/1/2) torch optimizer."""
from distopt.optim.hooks import StepHooks
from distopt.optim.plan import ALIGN, Arrangement, ShardPlan, arrange, plan
from distopt.optim.recipes import decay_groups, hidden_matrices, muon_groups
from distopt.optim.rules import SGD, Adam, AdamState, Muon, MuonState, SGDState, adam, muon, sgd
from distopt.optim.schedules import Constant, WarmupCosine, constant, make_schedule, warmup_cosine
from distopt.optim.sharded import ShardedOptimizer
from distopt.optim.step_info import StepInfo

__all__ = ["sgd", "adam", "muon", "SGD", "Adam", "Muon", "SGDState", "AdamState", "MuonState", "decay_groups",
           "muon_groups", "hidden_matrices", "plan", "arrange", "ShardPlan", "Arrangement", "ALIGN",
           "ShardedOptimizer", "StepInfo", "StepHooks", "Constant", "WarmupCosine", "constant", "make_schedule",
           "warmup_cosine"]
