"""``rankwise generate MODEL --prompt "..."``: sample a continuation from a trained or fine-tuned model (a
``rankwise train --out`` folder, a transformers folder or a hub name), tokenized and decoded with its own tokenizer."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a model", description=__doc__)
    p.add_argument("model", metavar="MODEL", help="a `rankwise train --out` folder, transformers folder or hub name")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, a new document)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, 0 = greedy (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--json", action="store_true", help="machine-readable output (prompt, ids, text)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..generation import generate
    from ..models import is_run, load_pretrained, model_tokenizer
    from ..train import load_run, resolve_device

    device = resolve_device(args.device)
    if is_run(args.model):
        loaded = load_run(args.model, device)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        tokenizer = model_tokenizer(args.model)
        if tokenizer is None:
            from ..errors import RankwiseError

            raise RankwiseError(f"{args.model!r} has no tokenizer (a preset or a config-only folder); generate "
                                "from a trained run folder or a model folder with its tokenizer")
        model = load_pretrained(args.model, device)
    result = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "prompt_ids": result.prompt_ids, "new_ids": result.new_ids,
                          "text": result.text}))
    else:
        print(args.prompt + result.text)
    return 0
