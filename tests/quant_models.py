"""Small ONNX models with linear layers in every form the quantizer and the importer meet."""
import json

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def linear_model(K=64, H=48, M=40, form="transpose", bias=False, seed=0, opset=17,
                 with_map=True, final_relu=True):
    """x [b, 5, K] (Gemm: [b, K]) -> fc (K->H) -> Relu -> out (H->M) -> y.

    form: "transpose" = MatMul(x, Transpose(W [out, in])) as pyedge/torch exports write
    nn.Linear; "matmul" = MatMul(x, W [in, out]); "gemm" = Gemm(x, W [out, in], bias, transB=1).
    Weights named like PyTorch parameters; nodes like TorchScript (/layers.0.fc/MatMul)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    weights = {}

    def lin(W, inp, out, mod):
        wn = f"{mod}.weight"
        scope = "/" + mod.replace(".", "/")
        weights[mod] = W
        if form == "transpose":
            inits.append(numpy_helper.from_array(W, wn))
            nodes.append(helper.make_node("Transpose", [wn], [f"{wn}_t"], perm=[1, 0],
                                          name=f"{scope}/Transpose"))
            nodes.append(helper.make_node("MatMul", [inp, f"{wn}_t"], [out],
                                          name=f"{scope}/MatMul"))
        elif form == "matmul":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(W.T), wn))
            nodes.append(helper.make_node("MatMul", [inp, wn], [out], name=f"{scope}/MatMul"))
        else:
            ins = [inp, wn]
            inits.append(numpy_helper.from_array(W, wn))
            if bias:
                b = (rng.standard_normal(W.shape[0]) * 0.1).astype(np.float32)
                inits.append(numpy_helper.from_array(b, f"{mod}.bias"))
                ins.append(f"{mod}.bias")
            nodes.append(helper.make_node("Gemm", ins, [out], transB=1, name=f"{scope}/Gemm"))

    lin((rng.standard_normal((H, K)) * 0.1).astype(np.float32), "x", "h", "layers.0.fc")
    nodes.append(helper.make_node("Relu", ["h"], ["hr"], name="/layers.0/act/Relu"))
    lin((rng.standard_normal((M, H)) * 0.1).astype(np.float32), "hr", "z" if final_relu else "y",
        "layers.1.out")
    if final_relu:  # without it, layers.1.out produces the graph output (an "LM head")
        nodes.append(helper.make_node("Relu", ["z"], ["y"], name="/act/Relu"))
    lead = ["b"] if form == "gemm" else ["b", 5]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     lead + [K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, lead + [M])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if with_map:
        pm = {f"{mod}.weight": {"module": mod, "param": "weight",
                                "transposed": form == "matmul", "kind": "linear"}
              for mod in weights}
        pm.update({f"{mod}.bias": {"module": mod, "param": "bias", "transposed": False,
                                   "kind": "linear"} for mod in weights if bias and form == "gemm"})
        m.metadata_props.add(key="pyedge.param_map", value=json.dumps(pm))
    m.ir_version = 8 if opset < 21 else 10
    return m, weights


def tied_lm(V=96, H=64, seed=0):
    """ids -> Gather(E) -> MatMul(W1ᵀ) -> Relu -> MatMul(Eᵀ) = logits (tied head)."""
    rng = np.random.default_rng(seed)
    E = (rng.standard_normal((V, H)) * 0.1).astype(np.float32)
    W1 = (rng.standard_normal((H, H)) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(E, "embed.weight"), numpy_helper.from_array(W1, "fc.weight")]
    nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["e"], name="/embed/Gather"),
             helper.make_node("Transpose", ["fc.weight"], ["w1t"], perm=[1, 0], name="/fc/T"),
             helper.make_node("MatMul", ["e", "w1t"], ["h"], name="/fc/MatMul"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Transpose", ["embed.weight"], ["et"], perm=[1, 0], name="/lm/T"),
             helper.make_node("MatMul", ["hr", "et"], ["logits"], name="/lm_head/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                     ["b", 7])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                         ["b", 7, V])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    pm = {"embed.weight": {"module": "embed", "param": "weight", "transposed": False,
                           "kind": "embedding", "aliases": ["lm_head.weight"]},
          "fc.weight": {"module": "fc", "param": "weight", "transposed": False, "kind": "linear"}}
    m.metadata_props.add(key="pyedge.param_map", value=json.dumps(pm))
    return m


def run_ort(model, feeds):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def inits_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def tiny_llama(seed=0):
    """transformers Llama, 2 layers, hidden 64, returning logits (names kept for PEFT)."""
    import torch
    import transformers

    class TinyLlama(transformers.LlamaForCausalLM):
        def forward(self, input_ids, attention_mask=None, **_):  # PEFT's CAUSAL_LM passes more
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, attn_implementation="eager")
    return TinyLlama(cfg).eval()
