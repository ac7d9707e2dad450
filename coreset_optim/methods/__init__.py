"""Selection methods: the protocol every method follows (:mod:`.base`), the registry that maps
``selection="name"`` to a class (:mod:`.registry`), and one module per built-in method (the target
method with its streamed passes in :mod:`.target` and :mod:`.target_passes`).

Methods import the sketch pass, the preconditioner and the shared records, never the optimizer.
"""
