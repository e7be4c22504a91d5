"""Update rules, the sharding plan, and the sharded (ZeRO stage 0/1/2) torch optimizer."""
from distopt.optim.hooks import StepHooks
from distopt.optim.plan import ALIGN, Arrangement, ShardPlan, arrange, plan
from distopt.optim.rules import SGD, Adam, AdamState, SGDState, adam, sgd
from distopt.optim.schedules import Constant, WarmupCosine, constant, make_schedule, warmup_cosine
from distopt.optim.sharded import ShardedOptimizer, StepInfo

__all__ = ["sgd", "adam", "SGD", "Adam", "SGDState", "AdamState", "plan", "arrange", "ShardPlan", "Arrangement",
           "ALIGN", "ShardedOptimizer", "StepInfo", "StepHooks", "Constant", "WarmupCosine", "constant",
           "make_schedule", "warmup_cosine"]
