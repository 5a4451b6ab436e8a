"""Discrete-event simulation of the serving engine: the real schedulers and block manager,
a fitted cost model in place of the model. No torch, no Triton."""
