"""The benchmark harness behind ``csd bench``: our methods side by side with transformers'.

* ``suite``: methods and suites as data (``benchmarks/suite.json``);
* ``runner``: the interleaved, warmed-up benchmark loop writing one JSON line per generation;
* ``report``: markdown table and PNG plots from those lines;
* ``profile``: per-forward overhead of the runner beside raw model forwards;
* ``cli``: the ``csd bench`` subcommand (``report``, ``profile``).
"""
