"""gmem inside other continual-learning frameworks. Each submodule imports its framework (an optional
dependency); importing this package imports none of them.

* :mod:`gmem.integrations.avalanche`: generative replay for Avalanche strategies (``avalanche-lib``).
"""
