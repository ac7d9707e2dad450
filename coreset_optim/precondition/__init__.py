"""What the wrapped optimizer does to a gradient, read from its state: Adam's moments (torch,
bitsandbytes 8-bit, FSDP2, DeepSpeed; :mod:`.moments`) and the normalization of per-example
gradients by them (:mod:`.normalize`). Only ever reads the optimizer's state."""
