"""Hyperparameter sweeps: many runs of one job over a search space, on Optuna.

- ``space``: parameters (choice, uniform, loguniform, quniform, randint)
- ``policy``: samplers (grid, random, tpe) and early termination (median, truncation,
  bandit, hyperband)
- ``packing``: concurrent trials on the hosts' slots, never two on one slot
- ``study``: ``Sweep``, the loop that starts, follows, prunes and records trials
- ``report``: the trials table and the plot of ``distlaunch sweep show``
"""
