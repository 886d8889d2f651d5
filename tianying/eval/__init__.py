"""Evaluation: benchmark tasks (`harness`), log-likelihood scoring (`scoring`), metrics, and the code sandbox.

Heavy modules (torch) load only when a task runs, so `tianying eval --help` stays fast.
"""
