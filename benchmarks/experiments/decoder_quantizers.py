"""Which ONNX Runtime quantiser keeps a small decoder's choices (issue 38): top-1 agreement with the fp32 graph.

    python benchmarks/experiments/decoder_quantizers.py FP32_BUNDLE

Teacher-forced over the export gate's prompts and 16 greedy steps (pmserve.decoder_export.teacher_forced), so
every variant reads the same tokens. The figures in BENCHMARKS.md ("Decoder deployment") came from these
variants, run one at a time on SmolLM2-135M's fp32 bundle on 2026-12-07.
"""

import logging
import sys
import time

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization import matmul_nbits_quantizer as mq
from transformers import AutoTokenizer

from pmserve.decoder_export import GATE_PROMPTS, teacher_forced
from pmserve.generation import OrtDecoder

logging.getLogger().setLevel(logging.ERROR)
bundle = sys.argv[1]
src = f"{bundle}/model.onnx"
tok = AutoTokenizer.from_pretrained(bundle)
rows = [list(tok(p)["input_ids"]) for p in GATE_PROMPTS]
ref, toks = teacher_forced(OrtDecoder(src), rows, 2, 16)
LM = ["/model/lm_head/MatMul"]


def nbits(dst, **kw):
    q = mq.MatMulNBitsQuantizer(onnx.load(src), **kw)
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=False)


def dynamic(dst, **kw):
    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        **kw,
    )


VARIANTS = {
    "dynamic int8 per-tensor": lambda d: dynamic(d),
    "dynamic int8 per-tensor, lm_head fp32": lambda d: dynamic(d, nodes_to_exclude=LM),
    "dynamic int8 per-channel": lambda d: dynamic(d, per_channel=True),
    "MatMulNBits 8-bit sym b32 acc4": lambda d: nbits(
        d, bits=8, block_size=32, is_symmetric=True, accuracy_level=4
    ),
    "MatMulNBits 4-bit sym b32 acc4": lambda d: nbits(
        d, bits=4, block_size=32, is_symmetric=True, accuracy_level=4
    ),
    "MatMulNBits 4-bit asym b32 acc4": lambda d: nbits(
        d, bits=4, block_size=32, is_symmetric=False, accuracy_level=4
    ),
    "MatMulNBits 4-bit sym b32 acc0": lambda d: nbits(
        d, bits=4, block_size=32, is_symmetric=True, accuracy_level=0
    ),
    "MatMulNBits 4-bit sym b16 acc4": lambda d: nbits(
        d, bits=4, block_size=16, is_symmetric=True, accuracy_level=4
    ),
    "MatMulNBits 4-bit sym b32, lm_head fp32": lambda d: nbits(
        d, bits=4, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_exclude=LM
    ),
    "MatMulNBits 4-bit HQQ b32": lambda d: nbits(
        d, bits=4, block_size=32, algo_config=mq.HQQWeightOnlyQuantConfig(block_size=32, bits=4)
    ),
}
for name, make in VARIANTS.items():
    dst = "/tmp/decoder-quantizer-variant.onnx"
    t0 = time.perf_counter()
    make(dst)
    got, _ = teacher_forced(OrtDecoder(dst), rows, 2, 16, toks)
    print(
        f"{name}: top-1 agreement {(got.argmax(-1) == ref.argmax(-1)).mean():.3f}, {time.perf_counter() - t0:.0f} s"
    )
