"""The `memsave` command.

    memsave demo                              the built-in decoder under the default recipe
    memsave demo --nproc 2                    ... as a 2-stage pipeline on 2 local ranks (gloo)
    memsave explain decoder-tiny --train      per-pass report for a built-in model
    memsave explain path/to/model.py:factory  ... or for your own model
    memsave explain hf-gpt2-tiny -o recompute=none -o codegen=fx
    memsave models                            list the built-in models
    memsave lm [--rebuild]                    the small causal LM trained on Python's docstrings

A factory is a function with no arguments returning either `(model, example_inputs)` or a
model with an `example_inputs()` method.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

import torch

from memsave.config import DEFAULT_RECIPE, Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memsave", description="A PyTorch 2 compiler that makes models need less memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile the built-in decoder with the default recipe and report")
    demo.add_argument("--model", default="decoder-small", help="built-in model (default: decoder-small)")
    demo.add_argument("--nproc", type=int, default=0, help="run as an N-stage pipeline on N local ranks (gloo)")
    _add_run_arguments(demo)

    explain = sub.add_parser("explain", help="per-pass report for a built-in model or path/to/file.py:factory")
    explain.add_argument("model", help="a built-in model name (see `memsave models`) or path/to/file.py:factory")
    _add_run_arguments(explain)

    sub.add_parser("models", help="list the built-in models")

    lm = sub.add_parser("lm", help="train (once, cached) the small causal LM of Python's docstrings; print its perplexity")
    lm.add_argument("--rebuild", action="store_true", help="train again even if cached")

    args = parser.parse_args(argv)
    if args.command == "lm":
        return _lm(args.rebuild)
    if args.command == "models":
        from memsave.models import MODELS

        for name, spec in MODELS.items():
            print(f"{name:16s} {spec.description}")
        return 0
    try:
        options = _parse_options(args.option)
        Config.from_options(options)  # validate before building anything
    except ValueError as e:
        parser.error(str(e))
    if args.command == "demo" and args.nproc:
        from memsave.distributed.demo import run_demo

        try:
            return run_demo(args.model, args.nproc, options)
        except ValueError as e:  # bad options or plan: reported before any rank started
            parser.error(str(e))
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs = load_model(args.model)
    if args.command == "demo":
        print(f"memsave demo: {args.model}, default recipe {DEFAULT_RECIPE} + {options or '{}'}\n")
    start = time.perf_counter()
    from memsave.explain import explain as run_explain

    report = run_explain(model, *inputs, train=args.train, **options)
    print(report)
    print(f"\n(compiled and measured in {time.perf_counter() - start:.1f} s)")
    if args.command == "demo" and not options:
        print("try a lossy recipe: memsave demo -o quantize=int8   (or int4, int4-g128-asym, ...; -o prune=2:4, -o factorize=svd-20)")
    return 0


def _lm(rebuild: bool) -> int:
    import logging

    from memsave.models import docs_lm

    # transformers imports torchao where installed, whose enum registration makes torch log a
    # deprecation warning per enum: noise about neither this command nor the user's code.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

    folder = docs_lm.path_for()
    if rebuild or not (folder / "model.safetensors").exists():
        print(f"training the docs LM ({docs_lm.DEFAULT_RECIPE.steps} steps, a few minutes on 2 cores) ...", flush=True)
    _, meta = docs_lm.load(rebuild=rebuild, log=lambda line: print("  " + line, flush=True))
    print(f"docs LM: {meta['parameters'] / 1e6:.1f}M parameters, trained {meta['recipe']['steps']} steps on "
          f"{meta['train_bytes'] / 1e6:.1f} MB of Python {meta['python']} docstrings in {meta['train_seconds']:.0f} s")
    print(f"held-out perplexity {meta['held_out_perplexity']:.3f} per byte "
          f"({meta['held_out_bits_per_byte']:.3f} bits per byte) on modules it never saw")
    print(f"cached in {folder}")
    return 0


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", action="store_true", help="measure a training step (forward + backward)")
    parser.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a memsave option, e.g. -o recompute=none or -o 'recompute={\"policy\": \"min-cut\"}' (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"option {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def load_model(spec: str) -> tuple[torch.nn.Module, tuple]:
    """A built-in model name, or `path/to/file.py:factory`."""
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, factory_name = spec.split(":", 1)
        if not os.path.exists(path):
            raise SystemExit(f"memsave: no such file {path!r}")
        module_spec = importlib.util.spec_from_file_location("_memsave_user_model", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules["_memsave_user_model"] = module
        module_spec.loader.exec_module(module)
        factory = getattr(module, factory_name, None)
        if factory is None:
            raise SystemExit(f"memsave: {path!r} has no function {factory_name!r}")
        made = factory()
        if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
            model, inputs = made
        elif isinstance(made, torch.nn.Module) and hasattr(made, "example_inputs"):
            model, inputs = made, made.example_inputs()
        else:
            raise SystemExit(
                f"memsave: {spec} must return (model, example_inputs) or a model with an example_inputs() method"
            )
        return model, tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    from memsave.models import get_model

    try:
        model_spec = get_model(spec)
    except ValueError as e:
        raise SystemExit(f"memsave: {e}")
    model = model_spec.build()
    return model, tuple(model_spec.example_inputs(model))


if __name__ == "__main__":
    sys.exit(main())
