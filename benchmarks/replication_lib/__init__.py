"""The paper replication's parts (benchmarks/replicate.py is the command):

    setup.py    the task, the methods, the per-model settings, the models
    runs.py     one run (train, evaluate, result.json) and the runner that caches them
    plan.py     the base model, the probe, the run specs at equal policy tokens, the sweep
    report.py   tables per split and method, the claims checked, REPLICATION.md
    figures.py  the curves
    text.py     the fixed text of REPLICATION.md (how to run, what it does, limits)
"""
