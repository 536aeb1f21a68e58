"""``csd tune``: the cascade configures itself.

* ``measure.py``  forward costs of every level and acceptance between every pair of levels, on the
  user's device and prompts; the traces the replay needs
* ``planner.py``  the expected-walltime model of ``step.py`` (formulas in its docstring) and the
  search over K-matrices and lenience
* (tests/simulate.py: a Monte Carlo run of the same algorithm, to check the model)
* ``replay.py``   the real cascade re-run on recorded predictions (greedy): exact step counts
* ``compare.py``  measured speed of several configurations, interleaved
* ``cli.py``      the command
"""
