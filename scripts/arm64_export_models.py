"""Export reference models to ONNX on the (x86) host for the aarch64 parity test.

    python scripts/arm64_export_models.py OUT_DIR [names...]   # default: mlp cnn gpt2 minilm decoder

Writes OUT_DIR/<name>.onnx and OUT_DIR/<name>.npz (inputs for another batch size / sequence
length than the export example). tests/test_arm64_parity.py runs each pair through pyedge and
onnxruntime (PYEDGE_PARITY_MODELS=OUT_DIR).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
    out = argv[0]
    names = argv[1:] or ["mlp", "cnn", "gpt2", "minilm", "decoder"]
    os.makedirs(out, exist_ok=True)
    from models import reference
    from models.export_reference import export

    rng = np.random.default_rng(7)
    for name in names:
        try:
            model, inputs, in_names, out_names, dyn = reference.FACTORIES[name]()
            path = os.path.join(out, f"{name}.onnx")
            export(model, inputs, path, exporter="torchscript", input_names=in_names,
                   output_names=out_names, dynamic_axes=dyn)
            feed = reference.unseen_inputs(name, inputs, rng)
            np.savez(os.path.join(out, f"{name}.npz"), **feed)
            print("exported", name, path)
        except Exception as e:  # one model failing must not stop the others
            print("FAILED", name, type(e).__name__, e)


if __name__ == "__main__":
    main(sys.argv[1:])
