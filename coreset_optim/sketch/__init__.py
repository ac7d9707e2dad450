"""The pass over the large batch: per-example gradients of the sketch layers from hooks
(:mod:`.capture`), folded block by block into a compressed sketch (:mod:`.streaming`, with
:mod:`.compress`'s top coordinates or :mod:`.projection`'s CountSketch), or CoLM's zeroth-order
estimate (:mod:`.zeroth_order`)."""
