"""The sketch pass over a large batch against a no-grad forward of the same batch.

Tiny Llama + LoRA r=8 on q/v, B = 128 sequences of 64 tokens, the default sketch module (the last
layer's v_proj LoRA-B), sketched in chunks of k = 32 as select() does. The pass costs a forward
with autograd from the sketch module up plus a backward through the layers above it: about one
layer's worth, so its excess over a no-grad forward shrinks like 1/depth (compare l4 and l8).

``sketch`` is the path select() takes (:func:`coreset_optim.sketch.streaming.compressed_sketches`: blocks of
output rows, normalized and compressed as they come); ``whole`` is the whole-gradient
:func:`~coreset_optim.sketch.capture.exact_sketches`, kept as the tests' reference, timed beside it.
"""

from __future__ import annotations

import pytest
import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.sketch.capture import exact_sketches, BatchPass
from coreset_optim.sketch.streaming import compressed_sketches
from lib.data import token_batch
from lib.models import tiny_lora_llama
from lib.timing import interleave

B, K, T = 128, 32, 64


@pytest.mark.parametrize("size", ["h128-l4", "h128-l8"])
def test_sketch_pass_vs_nograd_forward(benchmark, record, size):
    model, loss_fn = tiny_lora_llama(size, seq_len=T)
    opt = CoresetOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, coreset_size=K)
    batch = token_batch(B, T)

    def nograd_forward():
        with torch.no_grad():
            loss_fn(batch)

    def nograd_forward_chunked():
        with torch.no_grad():
            for start in range(0, B, K):
                loss_fn({"input_ids": batch["input_ids"][start : start + K]})

    c, method = opt.config, opt.selection

    def bounded(chunk):
        compressed_sketches(
            BatchPass(model, opt.sketch_layers, batch, loss_fn, B, chunk),
            optimizer=opt.optimizer,
            normalize=method.normalize,
            sketch=method.sketch,
            dim=method.sketch_dim,
            seed=c.seed,
            source_codes=torch.zeros(B, dtype=torch.long),
            num_sources=1,
            block_bytes=method.sketch_block_bytes,
        )

    def sketch_pass():
        bounded(K)

    def sketch_pass_one_chunk():
        bounded(None)

    def whole_gradient_pass():
        exact_sketches(model, opt.sketch_layers, batch, loss_fn, B, K)

    m = interleave(
        {
            "nograd": nograd_forward,
            "nograd_chunked": nograd_forward_chunked,
            "sketch": sketch_pass,
            "sketch_1chunk": sketch_pass_one_chunk,
            "whole": whole_gradient_pass,
        },
        reps=7,
    )
    row = {
        "model": size,
        "sketch_dims": sum(t.numel for t in opt.sketch_layers),
        "nograd_fwd_s": m["nograd"],
        "sketch_s": m["sketch"],
        "sketch/nograd": m["sketch"] / m["nograd"],
        "sketch_unchunked/nograd": m["sketch_1chunk"] / m["nograd"],
        "sketch/nograd_in_chunks_of_k": m["sketch"] / m["nograd_chunked"],
        "whole_gradient/nograd": m["whole"] / m["nograd"],
        "target": "<= 1.15",
    }
    record("sketch pass vs no-grad forward of B = 128", size, **row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(sketch_pass, rounds=3, iterations=1)
