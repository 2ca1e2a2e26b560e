"""Times one pyedge.Attention node, forward and backward, in a training plan built once.

    taskset -c 1 env OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYEDGE_NUM_THREADS=1 \\
        python -m bench.attention_micro [--shape 16,128,12,32] [--steps 200] [--layout blhd]
        [--pad random|w1|none] [--causal] [--window W]

The graph is the node alone (Q, K, V trainable, an additive key mask [B,1,1,L] as input, MSE
loss); the core's per-op profile gives the op's own time per step, and the medians over
--steps steps are reported with GFLOP/s counting 4·B·H·L²·D forward and 10·B·H·L²·D backward
(the score recompute plus four products). Defaults: MiniLM's shape at batch 16.
--causal (no mask input, the causal flag) and --window W (causal with a sliding window of W
keys) time a decoder's attention; their GFLOP/s count the full L² work, so they compare with
each other as speed-ups: e.g. --shape 1,1024,8,64 --causal, then --window 256.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def model(B, L, H, D, layout, causal=False, window=0):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    shp = [B, L, H, D] if layout == "blhd" else [B, H, L, D]
    inits = [numpy_helper.from_array(rng.standard_normal(shp).astype(np.float32), n)
             for n in ("q", "k", "v")]
    flags = {"causal": 1, "window": window} if causal or window else {}
    node = helper.make_node("Attention", ["q", "k", "v"] + ([] if flags else ["mask"]), ["o"],
                            domain="pyedge", scale=1.0 / D ** 0.5, layout=layout, **flags)
    inputs = [] if flags else [helper.make_tensor_value_info("mask", TensorProto.FLOAT,
                                                             [B, 1, 1, L])]
    g = helper.make_graph([node], "attn", inputs,
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, shp)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("pyedge", 1)]), shp


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.attention_micro",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16,128,12,32", help="B,L,H,D")
    ap.add_argument("--layout", default="blhd", choices=["blhd", "bhld"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pad", default="random", choices=["random", "w1", "none"],
                    help="padded keys per sequence: random (0 to L/2 - 1), w1 (bench workload "
                         "1's (7·b) mod L/4), none")
    ap.add_argument("--causal", action="store_true", help="the causal flag, no mask input")
    ap.add_argument("--window", type=int, default=0,
                    help="causal with a sliding window of this many keys (0: none)")
    a = ap.parse_args(argv)
    import numpy as np
    import pyedge
    B, L, H, D = (int(x) for x in a.shape.split(","))
    m, shp = model(B, L, H, D, a.layout, a.causal, a.window)
    flagged = a.causal or a.window > 0
    sess = pyedge.TrainingSession(m, train=["q", "k", "v"], loss="mse",
                                  optimizer=pyedge.SGD(lr=1e-6), fuse=False)
    rng = np.random.default_rng(1)
    mask = np.zeros((B, 1, 1, L), np.float32)
    for b in range(B):  # padded batches: the last keys of most sequences masked
        pad = {"random": int(rng.integers(0, L // 2)), "w1": (7 * b) % (L // 4), "none": 0}[a.pad]
        if pad:
            mask[b, ..., L - pad:] = -3.4e38
    target = rng.standard_normal(shp).astype(np.float32)
    feeds = {} if flagged else {"mask": mask}
    for _ in range(3):
        sess.step(feeds, target)
    sess._sess.profiling = True
    sess.step(feeds, target)

    def totals():
        t = {}
        for _node, op, bwd, sec, calls in sess._sess.last_profile():
            if op.endswith("Attention"):
                t[bwd] = (sec, calls)
        return t

    fwd, bwd = [], []
    prev = totals()
    for _ in range(a.steps):
        sess.step(feeds, target)
        cur = totals()
        fwd.append((cur[False][0] - prev[False][0]) / (cur[False][1] - prev[False][1]))
        bwd.append((cur[True][0] - prev[True][0]) / (cur[True][1] - prev[True][1]))
        prev = cur
    f, b = statistics.median(fwd), statistics.median(bwd)
    work = B * H * L * L * D
    what = (f"window={a.window}" if a.window else "causal") if flagged else f"pad={a.pad}"
    print(f"Attention {a.layout} B={B} L={L} H={H} D={D} {what}, "
          f"{pyedge._core.num_threads()} thread(s), "
          f"median of {a.steps}: forward {f * 1e3:.3f} ms ({4 * work / f / 1e9:.0f} GFLOP/s), "
          f"backward {b * 1e3:.3f} ms ({10 * work / b / 1e9:.0f} GFLOP/s), "
          f"total {(f + b) * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
