"""Data for the demo, the examples and the benchmarks: apart from the method, never imported by it.

``synthetic``: the from-scratch token-sequence mixture of the earlier benchmarks.
``tasks``: the string tasks of the fine-tuning benchmark (pretraining corpus, 7-source mixture,
held-out tasks with a target split). ``evaluation``: exact match and answer loss per source,
mixture-weighted and macro averages. ``base_model``: the committed pretrained base (``base_model/``)
and the script that rebuilds it.
"""
