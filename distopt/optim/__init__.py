"""Update rules, the sharding plan, and the sharded (ZeRO stage 0/1/2) optimizer."""
from distopt.optim.plan import ALIGN, ShardPlan, plan
from distopt.optim.rules import SGD, Adam, AdamState, SGDState, adam, sgd
from distopt.optim.schedules import Constant, WarmupCosine, constant, make_schedule, warmup_cosine
from distopt.optim.sharded import ShardedOptimizer, StepInfo

__all__ = ["sgd", "adam", "SGD", "Adam", "SGDState", "AdamState", "plan", "ShardPlan", "ALIGN",
           "ShardedOptimizer", "StepInfo", "Constant", "WarmupCosine", "constant", "make_schedule",
           "warmup_cosine"]
