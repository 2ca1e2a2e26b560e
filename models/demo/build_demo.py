"""Builds the model bundled with `pyedge demo` (workstation; needs torch).

    python models/demo/build_demo.py [--out pyedge/demo_assets]

Trains the sensor MLP defined in pyedge/demo.py (8 channels -> 64 -> 64 -> 4 activities) on
the synthetic *source* task, then writes

* sensor_mlp.onnx         the model pyedge fine-tunes (TorchScript exporter, opset 17, weights
                          under their PyTorch names, dynamic batch)
* sensor_mlp.safetensors  the same weights for PyTorch (the demo's PEFT round-trip check)
* sensor_mlp.json         how it was made, and its accuracy on both tasks

Deterministic: rerunning produces the same weights (CPU, fixed seeds, one thread).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "pyedge" / "demo_assets"))
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)

    import numpy as np
    import onnx
    import torch
    from safetensors.torch import save_file

    from pyedge import demo

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = demo.torch_model()
    xs, ys = demo.make_sensor_data(4000, seed=1)
    X, Y = torch.from_numpy(xs), torch.from_numpy(ys)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def acc(x, y):
        with torch.no_grad():
            return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())

    source_acc = acc(*demo.make_sensor_data(2000, seed=2))
    target_acc = acc(*demo.make_sensor_data(2000, seed=3, target=True))
    print(f"source-task accuracy {source_acc:.3f}, target-task accuracy {target_acc:.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"{demo.MODEL_NAME}.onnx"
    torch.onnx.export(model, (torch.zeros(2, demo.N_FEATURES),), str(onnx_path),
                      input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamo=False, do_constant_folding=False,
                      keep_initializers_as_inputs=False,
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load(str(onnx_path))
    m.producer_name, m.producer_version = "pyedge models/demo/build_demo.py", "1"
    m.doc_string = ("pyedge demo: sensor-activity MLP (8 -> 64 -> 64 -> 4), pretrained on a "
                    "synthetic source task")
    onnx.save(m, str(onnx_path))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / f"{demo.MODEL_NAME}.safetensors"))
    meta = {"classes": list(demo.CLASSES), "features": demo.N_FEATURES, "hidden": demo.HIDDEN,
            "source_accuracy": source_acc, "target_accuracy_before": target_acc,
            "train": {"records": 4000, "seed": 1, "epochs": args.epochs, "optimizer": "Adam 3e-3",
                      "batch": 64},
            "torch": torch.__version__, "onnx": onnx.__version__}
    (out / f"{demo.MODEL_NAME}.json").write_text(json.dumps(meta, indent=1) + "\n")
    for p in sorted(out.glob(f"{demo.MODEL_NAME}.*")):
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")
    # The ONNX file must reproduce the PyTorch model.
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    xv = demo.make_sensor_data(64, seed=5)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(xv)).numpy()
    err = float(np.abs(sess.run(None, {"x": xv})[0] - ref).max())
    print(f"onnxruntime vs torch: max abs diff {err:.2e}")
    assert err < 1e-4


if __name__ == "__main__":
    main()
