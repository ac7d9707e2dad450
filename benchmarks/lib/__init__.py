"""What the benchmark scripts share (not benchmarks themselves), one module per kind of thing:

* :mod:`.results`: where results go, who wrote them (provenance), the machine they ran on;
* :mod:`.options`: command-line options several scripts take;
* :mod:`.models`: model builders (Llama, GPT-2, LoRA) and the per-example next-token loss;
* :mod:`.data`: token batches made in code;
* :mod:`.steps`: a plain step, a coreset step, accumulation and CoLM's ideal, as the step benchmarks compare them;
* :mod:`.memory`: peak memory of a step (host RSS or CUDA allocator) and activation bytes;
* :mod:`.timing`: side-by-side (interleaved) timing, per-round ratios, the torch thread count;
* :mod:`.workers`: a script's worker in a fresh process; runs in parallel, collected;
* :mod:`.training`: training runs on a pool (batch stream, trainer, round-robin step costs);
* :mod:`.summary`: curves read at a step or a time, means, spreads and paired differences;
* :mod:`.samplers`: baseline samplers (k rows of a batch with per-source budgets);
* :mod:`.experiments`: experimental selection methods, registered with ``register_method``;
* :mod:`.whole_rows`: the former whole-row sketch paths, as selection methods;
* :mod:`.synthetic`: the synthetic-mixture set-up and the report of its training runs;
* :mod:`.gradient_error`: the gradient-matching measurement (gradient_matching*.py);
* :mod:`.finetune`: the fine-tuning set-up (finetune.py, finetune_slice.py, target_curvature.py).

Scripts import it as ``lib`` (``benchmarks/`` is first on ``sys.path`` when a script runs); no
script imports another script.
"""
