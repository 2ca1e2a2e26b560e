"""Float SGEMM against the quantized GEMM (csrc/ops/quant_gemm.cpp) on an LLM step's shapes.

    python -m bench.quant_micro [--M 1024] [--reps 7] [--formats int4,int8,nf4] [--threads 2]
        [--out-tile T --red-tile R]

For each projection shape of a Qwen2.5-0.5B layer (K -> N: q/o 896 -> 896, k/v 896 -> 128,
gate/up 896 -> 4864, down 4864 -> 896) it times the forward Y = X·Wᵀ [M, N] and the backward
dX = dY·W [M, K] (what a LoRA step runs on a frozen weight: no weight gradient) with W in
float32 (the core's sgemm) and with W quantized (panels dequantized into a cache-sized buffer
feeding the same sgemm). M = 1024 is an LLM step of 4 x 256 tokens; M = 1 is generation.
Each rep runs the two back to back (medians over --reps), so load from other processes hits
both alike. `dequant` is the time to dequantize all of W once on one thread: the cost the
quantized GEMM adds, before it is split over the threads.

The last lines sum one layer's seven projections (forward + backward): the quantized share of
a step is at most that ratio (attention, norms and the adapter itself are the same in both).
Target (issue "LLMs on small boards"): quantized step <= 1.1x the float step.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (name, K, N, count per layer)
SHAPES = [("q/o", 896, 896, 2), ("k/v", 896, 128, 2), ("gate/up", 896, 4864, 2),
          ("down", 4864, 896, 1)]
# name -> (format, bits, block_size)
FORMATS = {"int4": ("nbits", 4, 32), "int8": ("nbits", 8, 32), "int4-b128": ("nbits", 4, 128),
           "nf4": ("bnb4", 4, 64)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.quant_micro",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, nargs="+", default=[1024], help="rows of X (tokens)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--formats", default="int4,int8,nf4", help=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=0, help="core threads (0: the default)")
    ap.add_argument("--out-tile", type=int, default=0, help="override the panel's output extent")
    ap.add_argument("--red-tile", type=int, default=0,
                    help="override the panel's reduction extent")
    a = ap.parse_args(argv)
    from pyedge import _core
    if a.threads:
        _core.set_num_threads(a.threads)
    info = _core.simd_info()
    print(f"threads {_core.num_threads()}, OpenBLAS {_core.blas_core()}, core {info['target']} "
          f"({info['backend']}), dequant paths {_core.quant_paths()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for M in a.M:
        for fmt in a.formats.split(","):
            kind, bits, block = FORMATS[fmt]
            print(f"\n{fmt} ({kind}, {bits}-bit, block {block}), M = {M}")
            print(f"{'shape':>8} {'K':>5} {'N':>5} {'pass':>4} {'float ms':>9} {'quant ms':>9} "
                  f"{'ratio':>6} {'dequant ms':>10} {'tiles':>9}")
            tot_f = tot_q = 0.0
            for name, K, N, count in SHAPES:
                for bwd in (False, True):
                    d = _core.quant_gemm_time(kind, M, K, N, bits=bits, block_size=block,
                                              reps=a.reps, backward=bwd, out_tile=a.out_tile,
                                              red_tile=a.red_tile)
                    tot_f += count * d["float_s"]
                    tot_q += count * d["quant_s"]
                    print(f"{name:>8} {K:>5} {N:>5} {'bwd' if bwd else 'fwd':>4} "
                          f"{d['float_s'] * 1e3:9.2f} {d['quant_s'] * 1e3:9.2f} "
                          f"{d['quant_s'] / d['float_s']:6.3f} "
                          f"{d['dequant_1thread_s'] * 1e3:10.2f} "
                          f"{d['out_tile']:>4}x{d['red_tile']:<4}")
            print(f"  one layer's projections (fwd + bwd): float {tot_f * 1e3:.1f} ms, "
                  f"quantized {tot_q * 1e3:.1f} ms, ratio {tot_q / tot_f:.3f}")


if __name__ == "__main__":
    main()
