"""Data for the demo, the examples and the benchmarks: apart from the method, never imported by it.

``synthetic``: the from-scratch token-sequence mixture of the earlier benchmarks.
``tasks``: the string tasks of the fine-tuning benchmark (pretraining corpus, 7-source mixture,
held-out tasks with a target split). ``evaluation``: exact match and answer loss per source,
mixture-weighted and macro averages. ``noise``: label noise for the fine-tuning pool (corrupted
answers and the mask of the rows corrupted). ``base_model``: the committed pretrained base
(``base_model/``) and the script that rebuilds it.
"""
