"""Train the built-in decoder with tensor parallelism on N ranks (CPU, gloo):

    torchrun --nproc-per-node 2 examples/tensor_parallel.py [--vocab-parallel] [--steps 3]

Every rank builds the same seeded model; memsave splits its linears (and with --vocab-parallel
the embedding and LM head) on the first compiled call. The optimizer is built after that call,
over `memsave.sharded_parameters(model)`: this rank's shards plus the replicated weights.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import memsave
from memsave.models.decoder import build_decoder, decoder_inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab-parallel", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = build_decoder(args.size).train()
    # Fails here, on every rank alike, if heads or features do not divide by the world size.
    memsave.check_tensor_parallel(model, decoder_inputs(model)[0], world_size=world)
    torch._dynamo.reset()
    options = {"tensor_parallel": {"vocab_parallel": args.vocab_parallel}, "codegen": "fx"}
    compiled = torch.compile(model, backend="memsave", options=options)
    ids, labels = decoder_inputs(model, batch=2, seq=32, labels=True)
    optimizer = None
    for step in range(args.steps):
        loss = compiled(ids, labels)
        loss.backward()
        if optimizer is None:  # the shards exist once the first call has compiled
            optimizer = torch.optim.AdamW(memsave.sharded_parameters(model), lr=1e-3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    held = memsave.tp_parameter_bytes(model)
    print(f"rank {rank}/{world}: holds {held['held'] / 2**20:.2f} MiB of parameters "
          f"({held['sharded'] / 2**20:.2f} MiB shards, {held['replicated'] / 2**20:.2f} MiB replicated)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
