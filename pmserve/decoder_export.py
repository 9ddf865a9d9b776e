"""`pmserve export` of a decoder language model (a causal LM folder, `pmserve merge --format full` of decoder
adapters, `builtin:smollm2`): one KV-cache decoder graph, parity-gated, in a bundle that carries what generation
needs.

The bundle (kind "causal-lm"): model.onnx (and model.onnx.data past 2 GB, or always for a GenAI graph), the
tokenizer files (with the chat template), generation_config.json (EOS, pad), probe.json, README.md (a model card),
genai_config.json for a GenAI graph, and manifest.json with every file's sha256.

Choices, and why:
- The graph (--graph, choose_graph): ONNX Runtime GenAI's model builder where it has been measured to pass this
  gate (GENAI_ARCHITECTURES, heads a multiple of 16 wide, as ONNX Runtime's CPU GroupQueryAttention needs), since
  its fused graph decodes SmolLM2-135M 1.2 to 1.9x faster than the trace (BENCHMARKS.md, "Decoder deployment");
  causal_lm's trace of the transformers model for everything else. Both go through the same gate, quantisers,
  fp16 conversion and probe: pmserve.generation runs either. Measured through the builder's graph on the merged
  SmolLM2 of the README's walkthrough: fp32 max relative difference 2.6e-6, int8 top-1 0.929, int4 0.647, fp16
  1.0 (the traced graph of the same model: int4 0.671; of builtin:smollm2: 1.7e-6, int8 0.956, int4 0.66).
- Parity gate, teacher-forced: PyTorch (fp32, the same merged weights, its own KV cache) and ONNX Runtime read the
  same tokens, the gate prompts and then 16 greedy tokens PyTorch chose, so a difference at one step cannot
  change what later steps see. The prompts run alone and as one left-padded batch (the padded path a server
  uses). fp32 passes when max |ORT - PyTorch| / max |PyTorch| <= 1e-4 at the prompt and at every step; then
  greedy generation through pmserve.generation must give exactly Hugging Face generate's tokens for every gate
  prompt, the prompts alone and batched. A failure leaves no bundle.
- Quantised graphs cannot meet 1e-4: they are gated on top-1 agreement with PyTorch over the same teacher-forced
  positions, at least MIN_TOP1, after the fp32 graph they come from passed its own gate. The thresholds are what
  round-to-nearest quantisation measured on SmolLM2-135M (85 positions; BENCHMARKS.md, "Decoder deployment"):
  int8 0.956 (gate 0.90), int4 0.66 (gate 0.60). A 135M model is fragile under int4; ONNX Runtime's HQQ
  quantiser kept 0.79 but took minutes more per export, and is not used yet.
- Both are ONNX Runtime's MatMulNBits weight-only quantiser (the format ONNX Runtime GenAI uses): symmetric
  blocks of --block-size weights along the input axis, accuracy level 4 (activations quantised to int8 inside
  the kernel, its fast CPU path), 8 or 4 bits. Not quantize_dynamic, which encoders use: per-tensor int8 scales
  kept 0.73 top-1 agreement on SmolLM2 (a decoder's weights have outlier columns), and its per-channel mode gave
  0.04 with these versions (onnxruntime 1.31.1).
- fp16 (--dtype fp16, for GPUs) is export.to_fp16 (onnxruntime.transformers' float16 converter, the encoders'
  code path) on the fp32 graph after it passed its gate: weights, activations and the KV cache (past_key_values.*
  inputs, present.* outputs) in float16, so a GPU's cache holds half the bytes; `logits` stays float32 (sampling
  and the probe read it; the converter casts the last MatMul's output) and the ids int64. ONNX Runtime's CPU
  provider runs every node of the converted Llama and GPT-2 graphs (the converter's default op block list, ops
  such as Range and ArgMax, stays fp32), so the gate runs on the CPU with no node kept in fp32. The gate is
  top-1 agreement with PyTorch over the same teacher-forced positions, at least FP16_MIN_TOP1 = 0.95, with the
  max relative difference recorded. Measured (CPUExecutionProvider, onnxruntime 1.31.1, the 85 gate positions):
  SmolLM2-135M (builtin:smollm2) top-1 1.0, max relative logit difference 8.9e-4 (trace 16 s, conversion 17 s,
  fp16 gate 32 s on 2 shared cores); the tiny test Llama 1.0 and 6.9e-3, GPT-2 1.0 and 3.9e-4. 0.95 leaves room
  for near-ties that fp16 rounding flips on other models (4 of 85 positions) while an fp16 overflow or a broken
  conversion (agreement near chance) cannot pass. A randomly initialised 604M-parameter Llama (22-token vocabulary,
  so its logits are near-ties) measured 0.965 and 1.7e-2: the gate's floor is near what random weights give. A
  GPU's fp16 kernels round differently from the CPU's; the server's probe check allows GPU_PROBE_TOL there.
- Graphs past 2 GB (protobuf's limit): every graph of the export (the trace, the fp16 or quantised conversion,
  the move into the bundle) is written by onnx_trace.save_graph / move_graph, which put tensors in one external
  data file, model.onnx.data, past EXTERNAL_DATA_BYTES; the manifest lists and hashes it. Measured once, that
  604M Llama (2.4 GB of fp32 weights, no download): the fp32 bundle in 218 s on 2 shared cores, peak RSS 5.2 GiB,
  model.onnx 1.1 MB + model.onnx.data 2.4 GB; --dtype fp16 in 235 s, peak RSS 11 GiB (the converter and its
  shape inference hold copies of the graph), one 1.2 GB model.onnx.
- The probe: the gate prompts' PyTorch logits after the prompt and the greedy tokens PyTorch chose; a server that
  loads the bundle checks both before it serves (logits within the fp32 tolerance and tokens exactly for fp32;
  for quantised and fp16 graphs logits within twice the difference measured at export, tokens not compared).
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .causal_lm import KVLayout, load_causal_lm, trace_decoder
from .errors import PMError
from .formats.bundle import MODEL, write_manifest, write_probe
from .generation import GENAI_CONFIG, Generator, OrtDecoder, PaddedCache, generation_ids
from .onnx_trace import move_graph, save_graph

KIND = "causal-lm"
# --graph auto builds these with ONNX Runtime GenAI's builder: each measured through it and the fp32 gate (SmolLM2
# as Llama, and tiny random Llama, Mistral, Qwen2 and Qwen3 models in the tests); any other stays traced
GENAI_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
FP16_MIN_TOP1 = 0.95  # SmolLM2-135M measured 1.0, max relative difference 8.9e-4 (module docstring)
FP16_KEEP_FP32 = ["logits"]  # the fp16 graph's one float32 input or output: what sampling and the probe read
DECODE_STEPS = 16
REL_TOL = 1e-4
# the top-1 gates of the graphs that cannot meet REL_TOL, measured on SmolLM2-135M (module docstring)
MIN_TOP1 = {"int8": 0.90, "int4": 0.60, "fp16": FP16_MIN_TOP1}
GATE_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def add(a, b):",
    "The three primary colours are",
]


class TorchDecoder:
    """PyTorch with the same call as generation.OrtDecoder (numpy in and out), for the teacher-forced reference."""

    def __init__(self, model: torch.nn.Module):
        from .causal_lm import CachedDecoder

        self.wrapper = CachedDecoder(model).eval()
        self.layout = self.wrapper.layout

    def empty_past(self, batch: int) -> list[np.ndarray]:
        lay = self.layout
        return [np.zeros((batch, lay.kv_heads, 0, lay.head_dim), np.float32) for _ in lay.past_names]

    @torch.no_grad()
    def __call__(self, ids, mask, pos, past):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5.2x renames past_key_values
            out = self.wrapper(*(torch.from_numpy(np.ascontiguousarray(x)) for x in (ids, mask, pos, *past)))
        return out[0].float().numpy(), [p.numpy() for p in out[1:]]

    def prefill(self, rows: list[list[int]], pad_id: int):
        return PaddedCache.prefill(self, rows, pad_id)


def teacher_forced(decoder, rows: list[list[int]], pad_id: int, steps: int, tokens: np.ndarray | None = None):
    """Logits [steps + 1, batch, vocab] after the prompts ROWS (one batch, padded as DECODER pads) and after each
    of STEPS tokens fed back: TOKENS [batch, steps] when given, else the decoder's own greedy choices; returns
    (logits, tokens)."""
    logits, cache = decoder.prefill(rows, pad_id)
    seen = [logits]
    chosen = []
    for k in range(steps):
        nxt = tokens[:, k] if tokens is not None else seen[-1].argmax(-1)
        chosen.append(nxt)
        seen.append(cache.step(np.asarray(nxt)))
    return np.stack(seen), np.stack(chosen, 1) if chosen else np.zeros((len(rows), 0), np.int64)


def check_decoder_parity(onnx_path: Path, reference: dict, reduced: str | None) -> dict:
    """ONNX Runtime against the PyTorch reference (teacher_forced) for every batch; the fp32 gate, or the top-1
    gate of REDUCED (int8, int4 or fp16: a key of MIN_TOP1)."""
    dec = OrtDecoder(onnx_path, "cpu")
    rel, agree, total = 0.0, 0, 0
    for case in reference["cases"]:
        got, _ = teacher_forced(dec, case["rows"], reference["pad_id"], DECODE_STEPS, case["tokens"])
        ref = case["logits"]
        rel = max(rel, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0] * ref.shape[1]
    out = {
        "max_rel_diff": rel,
        "top1_agreement": agree / total,
        "positions": total,
        "steps": DECODE_STEPS,
        "provider": "CPUExecutionProvider",
    }
    if reduced:
        out["min_top1_agreement"] = MIN_TOP1[reduced]
        out["passed"] = out["top1_agreement"] >= MIN_TOP1[reduced]
    else:
        out["tolerance"] = REL_TOL
        out["passed"] = rel <= REL_TOL and agree == total
    return out


@torch.no_grad()
def hf_greedy(
    model, tokenizer, rows: list[list[int]], steps: int, eos: list[int], pad_id: int
) -> list[list[int]]:
    """Hugging Face generate's greedy tokens for each prompt alone, up to and including an EOS."""
    outs = []
    for r in rows:
        ids = torch.tensor([r])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=steps,
                do_sample=False,
                eos_token_id=eos or None,
                pad_token_id=pad_id,
                top_k=None,
                top_p=None,
                temperature=None,
            )
        toks = gen[0, len(r) :].tolist()
        cut = next((i for i, t in enumerate(toks) if t in eos), None)
        outs.append(toks if cut is None else toks[: cut + 1])
    return outs


def check_greedy(onnx_path: Path, reference: dict) -> dict:
    """pmserve.generation's greedy tokens (each prompt alone, then all as one padded batch) against HF generate's."""
    gen = Generator(
        OrtDecoder(onnx_path, "cpu"), reference["tokenizer"], reference["eos"], reference["pad_id"]
    )
    rows, want = reference["rows"], reference["hf_greedy"]
    alone = [gen.greedy([r], DECODE_STEPS)[0] for r in rows]
    batched = gen.greedy(rows, DECODE_STEPS)
    bad = [i for i in range(len(rows)) if alone[i] != want[i] or batched[i] != want[i]]
    return {"prompts": len(rows), "new_tokens": DECODE_STEPS, "identical": not bad, "differs_on": bad}


class DecoderExport:
    """A causal LM loaded once, with its PyTorch reference computed, ready to write bundles from."""

    def __init__(self, source, opts, log):
        self.opts = opts
        self.log = log
        self.source = str(source)
        self.model, self.tokenizer, self.folder = load_causal_lm(source)
        self.eos, self.pad_id = generation_ids(Path(self.folder), self.tokenizer)
        log(f"computing the PyTorch reference on {len(GATE_PROMPTS)} prompts and {DECODE_STEPS} decode steps")
        self.reference = self._reference()

    def _reference(self) -> dict:
        rows = [list(self.tokenizer(p)["input_ids"]) for p in GATE_PROMPTS]
        torch_dec = TorchDecoder(self.model)
        cases = []
        for group in ([rows[0]], rows):  # batch 1 unpadded, then every prompt in one left-padded batch
            logits, tokens = teacher_forced(torch_dec, group, self.pad_id, DECODE_STEPS)
            cases.append({"rows": group, "logits": logits, "tokens": tokens})
        return {
            "cases": cases,
            "rows": rows,
            "pad_id": self.pad_id,
            "eos": self.eos,
            "tokenizer": self.tokenizer,
            "hf_greedy": hf_greedy(self.model, self.tokenizer, rows, DECODE_STEPS, self.eos, self.pad_id),
        }

    def write(self, tmp: Path) -> dict:
        from .export import _versions, graph_io, to_fp16

        opts, log = self.opts, self.log
        work = tmp / ".work"
        work.mkdir()
        cfg = self.model.config
        graph, why = choose_graph(opts.graph, cfg, opts.dtype)
        if why:
            log(f"graph: {graph} ({why})")
        if graph == "genai":
            log(
                f"building {self.source} ({cfg.model_type}, causal LM) with ONNX Runtime GenAI's model builder"
            )
            raw, layout, exporter = build_genai(Path(self.folder), cfg, work)
        else:
            log(f"exporting {self.source} ({cfg.model_type}, causal LM) to ONNX with a KV cache")
            raw = work / "raw.onnx"
            layout = trace_decoder(self.model, raw, opts.opset)
            exporter = f"torch.onnx TorchScript exporter, torch {torch.__version__} (pmserve.causal_lm)"
        parity = check_decoder_parity(raw, self.reference, None)
        log(f"parity (fp32): {_line(parity)}")
        if not parity["passed"]:
            raise PMError(f"parity check failed: {_line(parity)}; no bundle written")
        greedy = check_greedy(raw, self.reference)
        log(
            f"greedy generation vs Hugging Face generate: "
            f"{'identical' if greedy['identical'] else 'differs on prompts ' + str(greedy['differs_on'])}"
        )
        if not greedy["identical"]:
            raise PMError("greedy generation differs from Hugging Face generate; no bundle written")
        current, quantization, fp16 = raw, None, None
        if opts.dtype == "fp16":  # ExportOptions.validate refused --quantize with it
            start = time.perf_counter()
            current = to_fp16(raw, raw.parent / "fp16.onnx", keep_io_types=FP16_KEEP_FP32, keep_prefix=None)
            fparity = check_decoder_parity(current, self.reference, "fp16")
            log(f"parity (fp16): {_line(fparity)}")
            if not fparity["passed"]:
                raise PMError(f"fp16 parity check failed: {_line(fparity)}; no bundle written")
            fp16 = {
                "method": "onnxruntime.transformers OnnxModel.convert_float_to_float16",
                "float32_io": FP16_KEEP_FP32,
                "seconds": round(time.perf_counter() - start, 1),
                "parity_vs_pytorch": fparity,
            }
        if opts.quantize:
            q = raw.parent / f"{opts.quantize}.onnx"
            bits = 8 if opts.quantize == "int8" else 4
            quantize_nbits(raw, q, bits, opts.block_size)
            method = {
                "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                "bits": bits,
                "block_size": opts.block_size,
                "symmetric": True,
                "accuracy_level": 4,
            }
            qparity = check_decoder_parity(q, self.reference, opts.quantize)
            log(f"parity ({opts.quantize}): {_line(qparity)}")
            if not qparity["passed"]:
                raise PMError(f"{opts.quantize} parity check failed: {_line(qparity)}; no bundle written")
            quantization = {**method, "parity_vs_pytorch": qparity}
            current = q
        move_graph(current, tmp / MODEL)
        if graph == "genai":  # the head size OrtDecoder reads; GenAI itself can run the bundle too
            shutil.copy(raw.parent / GENAI_CONFIG, tmp / GENAI_CONFIG)
        shutil.rmtree(work)
        self.tokenizer.save_pretrained(str(tmp))
        self.model.generation_config.save_pretrained(str(tmp))
        probe = self._probe(tmp)
        manifest = {
            "source": {"path": self.source, "kind": "full", "model": str(Path(self.folder).resolve())},
            "kind": KIND,
            "input_kind": "text",
            "model_type": cfg.model_type,
            "max_positions": getattr(cfg, "max_position_embeddings", None)
            or getattr(cfg, "n_positions", None),
            "vocab_size": int(cfg.vocab_size),
            "cache": {"layers": layout.layers, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim},
            "eos_token_id": self.eos,
            "pad_token_id": self.pad_id,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "dtype": opts.dtype,
            "opset": graph_opset(tmp / MODEL),  # the builder chooses its own
            "graph": graph,
            "exporter": exporter,
            **graph_io(tmp / MODEL),
            "quantization": quantization,
            "fp16": fp16,
            "parity": {**parity, "greedy_vs_hf_generate": greedy, "prompts": GATE_PROMPTS},
            "probe": probe,
            "versions": _versions(),
        }
        (tmp / "README.md").write_text(decoder_card(manifest))
        return write_manifest(tmp, manifest)

    def _probe(self, tmp: Path) -> dict:
        """probe.json: the gate prompts, PyTorch's logits after each (alone), its greedy tokens, and the tolerance
        a server holds the bundle to on them: the fp32 gate's, or for a quantised or fp16 graph twice what it
        measured."""
        torch_dec, ort_dec = TorchDecoder(self.model), OrtDecoder(tmp / MODEL, "cpu")
        ref, got = [], []
        for r in self.reference["rows"]:
            ref.append(torch_dec.prefill([r], self.pad_id)[0])
            got.append(ort_dec.prefill([r], self.pad_id)[0])
        ref, got = np.concatenate(ref), np.concatenate(got)
        diff = float(np.abs(ref - got).max())
        tolerance = REL_TOL * float(np.abs(ref).max())
        if self.opts.quantize or self.opts.dtype == "fp16":
            tolerance = max(2 * diff, tolerance)
        elif diff > tolerance:
            raise PMError(
                f"probe: max |ONNX Runtime - PyTorch| = {diff:.3g} (tolerance {tolerance:.3g}); no bundle written"
            )
        entry = write_probe(tmp, "text", GATE_PROMPTS, ref, tolerance, output="logits")
        return {**entry, "greedy_tokens": self.reference["hf_greedy"]}


def graph_opset(path: Path) -> int:
    """The ONNX opset of the graph at PATH (its default domain's)."""
    import onnx

    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next(int(o.version) for o in imports if o.domain in ("", "ai.onnx"))


def choose_graph(asked: str, cfg, dtype: str) -> tuple[str, str]:
    """(graph, why) for --graph ASKED: auto is genai for the architectures measured through the builder and the
    gate (GENAI_ARCHITECTURES) when its heads suit ONNX Runtime's CPU GroupQueryAttention, else traced; and traced
    for fp16, a GPU's bundle (pmserve runs GenAI graphs on the CPU provider only: generation.OrtDecoder)."""
    if asked != "auto":
        return asked, ""
    if dtype == "fp16":
        return "traced", "fp16 is for GPUs, where pmserve runs the traced graph"
    arch = (getattr(cfg, "architectures", None) or ["?"])[0]
    if arch not in GENAI_ARCHITECTURES:
        return "traced", f"{arch} is not one of the architectures built with ONNX Runtime GenAI's builder"
    head_dim = KVLayout.of(cfg).head_dim
    if head_dim % 16:
        return "traced", f"head size {head_dim} is not a multiple of 16, as GroupQueryAttention needs on CPUs"
    return "genai", f"ONNX Runtime GenAI's builder, for {arch}"


def build_genai(folder: Path, cfg, work: Path):
    """(graph path, cache layout, exporter) of ONNX Runtime GenAI's model builder run on the causal LM FOLDER, fp32
    for the CPU, into WORK/genai: GroupQueryAttention, packed QKV and fused norms, the graph GenAI itself runs.
    Run as a child process: the builder prints progress and holds its own copy of the weights while it works."""
    import importlib.util
    import subprocess
    import sys

    import onnx

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise PMError(
            "--graph genai: needs ONNX Runtime GenAI's model builder (onnxruntime-genai-cuda, a dependency of "
            "pmserve: install pmserve again)"
        )
    layout = KVLayout.of(cfg)
    if layout.head_dim % 16:
        raise PMError(
            f"--graph genai: head size {layout.head_dim} is not a multiple of 16, which ONNX Runtime's CPU "
            "GroupQueryAttention needs; use --graph traced"
        )
    out = work / "genai"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder.resolve())]
    cmd += ["-o", str(out.resolve()), "-p", "fp32", "-e", "cpu", "-c", str((work / "genai-cache").resolve())]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    graph = out / MODEL
    if done.returncode or not graph.is_file():
        lines = [ln.strip() for ln in (done.stdout + "\n" + done.stderr).splitlines() if ln.strip()]
        raise PMError(
            f"--graph genai: ONNX Runtime GenAI's builder could not build {folder}: "
            f"{(lines or ['no output'])[-1][:300]}"
        )
    names = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.input]
    if names[:2] != ["input_ids", "attention_mask"] or len(names) != 2 + 2 * layout.layers:
        raise PMError(
            f"--graph genai: the builder's graph of {folder} takes {', '.join(names[:3])}, ...; pmserve runs "
            "graphs of input_ids, attention_mask and the cache only; use --graph traced"
        )
    from importlib.metadata import version

    return graph, layout, f"ONNX Runtime GenAI model builder {version('onnxruntime-genai-cuda')} (fp32, CPU)"


def quantize_nbits(path: Path, dst: Path, bits: int, block_size: int) -> None:
    """Weight-only BITS-bit (8 or 4) quantisation of every MatMul with a constant weight (MatMulNBits)."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        q = MatMulNBitsQuantizer(
            onnx.load(str(path)), bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4
        )
        q.process()
        q.model.topological_sort()
        save_graph(q.model.model, dst)
    finally:
        root.setLevel(level)


def _line(parity: dict) -> str:
    if "tolerance" in parity:
        return (
            f"max relative |ONNX Runtime - PyTorch| = {parity['max_rel_diff']:.3g} (tolerance {parity['tolerance']:g}) "
            f"over the prompt and {parity['steps']} decode steps, top-1 agreement {parity['top1_agreement']:.4f}"
        )
    return (
        f"top-1 agreement with PyTorch {parity['top1_agreement']:.4f} over {parity['positions']} positions "
        f"(gate >= {parity['min_top1_agreement']:.2f}), max relative difference {parity['max_rel_diff']:.3g}"
    )


def decoder_card(m: dict) -> str:
    """The bundle's README.md: what it is, how it was checked, how to run it."""
    from .model_card import front_matter

    q, h = m["quantization"], m.get("fp16")
    weights = (
        f"{q['method'].rsplit('.', 1)[-1]} ({'int4' if q.get('bits') == 4 else 'int8'})" if q else m["dtype"]
    )
    if h:
        weights += " (and the key/value cache; logits float32)"
    p = m["parity"]
    return (
        front_matter("onnxruntime", m["source"]["model"], {"pipeline_tag": "text-generation"})
        + f"\n# {m['model_type']} decoder, ONNX Runtime bundle\n\n"
        f"Exported by pmserve from `{m['source']['path']}`: one ONNX graph with a key/value cache "
        f"({m['cache']['layers']} layers) that runs the prompt and every decode step; weights {weights}.\n\n"
        f"Parity against PyTorch on the same weights: max relative logit difference {p['max_rel_diff']:.3g} over "
        f"the prompt and {p['steps']} decode steps (fp32 graph); greedy generation identical to Hugging Face "
        f"`generate`: {p['greedy_vs_hf_generate']['identical']}."
        + (f" Quantised top-1 agreement: {q['parity_vs_pytorch']['top1_agreement']:.4f}." if q else "")
        + (
            f" fp16 top-1 agreement: {h['parity_vs_pytorch']['top1_agreement']:.4f} (max relative logit "
            f"difference {h['parity_vs_pytorch']['max_rel_diff']:.3g}); made for GPUs, checked on the CPU."
            if h
            else ""
        )
        + '\n\n```\npmserve generate BUNDLE "prompt" --chat --max-new-tokens 64\n```\n'
    )
