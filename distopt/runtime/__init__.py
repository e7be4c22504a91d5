"""The runtime: workers, the Ray worker group, the step controller and the Trainer.

The only package that imports Ray, and only in ``group.py`` and when a Trainer starts a
cluster: ``worker``, ``sampling``, ``config`` and ``local`` run without Ray.
"""
