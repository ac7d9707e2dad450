"""Bridges to PEFT, bitsandbytes and the Hugging Face Trainer.

Each submodule imports its library only when used, so ``import coreset_optim`` needs only torch.
"""
