"""Runnable jobs: the demo (``make run``), the ``distopt`` command and Ray cluster configs."""
