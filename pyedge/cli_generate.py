"""`pyedge generate`: text from a causal LM on the device (pyedge/generate.py).

    pyedge generate MODEL [--adapters DIR] --prompt TEXT [--chat] --max-new-tokens N
                    [--temperature T --top-p P --seed S] [--tokenizer PATH] [--threads N]

Only the continuation goes to stdout, streamed as it is decoded (so it pipes cleanly);
warnings and the --stats line go to stderr.
"""
from __future__ import annotations

import sys
import warnings


def add_commands(sub, common) -> None:
    g = sub.add_parser("generate", parents=[common], help="generate text with a causal LM "
                       "(+ adapters), key/value cached",
                       description="Continue a prompt with a causal LM exported by pyedge "
                                   "export --hf, adapters applied; greedy unless --temperature. "
                                   "Only the continuation is printed.")
    g.add_argument("model", help="the export folder (model.onnx + tokenizer) or its model.onnx")
    g.add_argument("--adapters", help="adapters directory (a run's adapters/ or PEFT format)")
    g.add_argument("--prompt", required=True, help="the text to continue ('-': read stdin)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--tokenizer", help="tokenizer.json or its folder (default: next to the model)")
    g.add_argument("--threads", type=int)
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="recompute the whole sequence each token (reference path)")
    g.add_argument("--stats", action="store_true", help="tokens/s on stderr at the end")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from pyedge.generate import Generator, print_piece
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = Generator(args.model, adapters=args.adapters, tokenizer=args.tokenizer,
                        threads=args.threads, cache=args.cache)
    for w in caught:  # one line each (the no-cache fallback says why)
        sys.stderr.write(f"pyedge: warning: {w.message}\n")
    res = gen.generate(prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       stream=print_piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if res.stop == "positions":
        sys.stderr.write(f"pyedge: stopped at the model's {gen.max_positions} positions\n")
    if args.stats:
        n = len(res.ids)
        decode = sum(res.times)
        rate = (len(res.times) / decode) if decode > 0 else float("nan")
        sys.stderr.write(f"{len(res.prompt_ids)} prompt tokens in {res.prefill_seconds:.3f} s; "
                         f"{n} new tokens, {rate:.1f} tokens/s decoding "
                         f"({'cached' if res.cached else 'no cache'}); stop: {res.stop}\n")
    return 0
