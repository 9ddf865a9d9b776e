"""`pmserve bench` of a decoder bundle: time to first token and decode tokens/s, ONNX Runtime (pmserve.generation
over the bundle, and any other bundles of the same model, e.g. int8 and int4) against PyTorch eager Hugging Face
`generate` with its KV cache on the same weights (the bundle's source folder), side by side in one run.

Every (batch, prompt length) shape runs random prompt tokens (no padding) and exactly --new-tokens new tokens
(EOS ignored, greedy), so all backends do the same work. TTFT is the time from the call to the first new token
(the prompt's forward pass); decode tokens/s counts the tokens after it: batch x (new - 1) / the time after the
first token. Backends alternate in a fresh random order every round, and medians over the rounds are reported.

Decode at batch 1 reads every weight once per token (but the embedding table, of which it reads a row), so its
ceiling is the machine's memory bandwidth divided by those bytes: measured here (a large numpy copy, read + write
bytes per second) and reported beside each backend's batch-1 tokens/s.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import PMError
from .formats.bundle import MODEL, verify_bundle
from .generation import DecodeBatch, OrtDecoder, SamplingParams, Sequence

DECODER_BACKENDS = ("onnxruntime", "torch-merged")


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large array copy (read + write), the best of REPEATS."""
    a = np.ones(mib << 18, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def decode_weight_bytes(path: Path) -> int:
    """Bytes of the graph's weights one decode step reads: every initializer but those only a Gather reads (the
    embedding table, of which a step reads one row per sequence), directly or through a Transpose or Cast that
    ONNX Runtime folds at load (GenAI's builder embeds a tied table as Gather(Transpose(lm_head weight)))."""
    import onnx

    m = onnx.load(str(path))
    readers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def gathered(name: str) -> bool:
        nodes = readers.get(name, [])
        return bool(nodes) and all(
            (n.op_type == "Gather" and n.input[0] == name)
            or (n.op_type in ("Transpose", "Cast") and all(map(gathered, n.output)))
            for n in nodes
        )

    return sum(
        onnx.numpy_helper.to_array(t).nbytes
        for t in m.graph.initializer
        if t.name in readers and not gathered(t.name)
    )


class _OrtRun:
    """One generation through pmserve.generation: returns (TTFT s, seconds after the first token)."""

    def __init__(self, path: Path, threads: int):
        self.decoder = OrtDecoder(path, "cpu", threads)
        self.bytes = decode_weight_bytes(path)

    def __call__(self, prompts: np.ndarray, new: int) -> tuple[float, float]:
        params = SamplingParams(max_new_tokens=new)
        seqs = [Sequence(list(p), params, None, ()) for p in prompts]
        batch = DecodeBatch(self.decoder)
        t0 = time.perf_counter()
        batch.add(seqs)
        t1 = time.perf_counter()
        while len(batch.step()):
            pass
        return t1 - t0, time.perf_counter() - t1


class _FirstToken:
    """A generate streamer that notes when the first new token arrives (its first put() is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


class _HFRun:
    """Hugging Face generate (PyTorch eager, KV cache, greedy, exactly NEW tokens)."""

    def __init__(self, folder: str):
        from .causal_lm import load_causal_lm

        self.model, _, _ = load_causal_lm(folder)
        self.model.generation_config.pad_token_id = self.model.generation_config.pad_token_id or 0
        emb = self.model.get_input_embeddings().weight
        tied = emb is self.model.get_output_embeddings().weight  # then the lm_head reads the table whole
        self.bytes = sum(
            p.numel() * p.element_size() for p in self.model.parameters() if tied or p is not emb
        )

    @torch.no_grad()
    def __call__(self, prompts: np.ndarray, new: int) -> tuple[float, float]:
        ids = torch.from_numpy(prompts)
        streamer = _FirstToken()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                top_k=None,
                top_p=None,
                temperature=None,
                streamer=streamer,
            )
        end = time.perf_counter()
        return streamer.first - t0, end - streamer.first


def run_decoder_bench(path: Path, manifest: dict, cfg, threads: int, log) -> dict:
    """The decoder rows of `pmserve bench` (cfg: bench.BenchConfig; seq_lens are prompt lengths)."""
    notes = []
    skipped = [b for b in cfg.backends if b not in DECODER_BACKENDS]
    if skipped:
        notes.append(f"a decoder bundle: backends {', '.join(skipped)} do not apply")
    runners: dict[str, object] = {}
    if "onnxruntime" in cfg.backends:
        runners["onnxruntime"] = _OrtRun(path / MODEL, threads)
    for name, other in cfg.other_bundles.items():
        m = verify_bundle(other)
        if m.get("kind") != "causal-lm":
            raise PMError(f"{other}: not a decoder bundle ({m.get('kind')})")
        runners[f"onnxruntime-{name}"] = _OrtRun(Path(other) / MODEL, threads)
    if "torch-merged" in cfg.backends:
        folder = manifest.get("source", {}).get("model")
        if folder and Path(folder).is_dir():
            runners["torch-merged"] = _HFRun(folder)
        else:
            notes.append(f"PyTorch rows skipped: the bundle's source {folder!r} is not readable here")
    max_pos = manifest.get("max_positions")
    too_long = [s for s in cfg.seq_lens if max_pos and s + cfg.new_tokens > max_pos]
    if too_long:
        raise PMError(f"--seq-lens: {too_long[0]} + {cfg.new_tokens} new tokens exceed {max_pos} positions")
    vocab = int(manifest["vocab_size"])
    g = np.random.default_rng(cfg.seed)
    order = np.random.default_rng(cfg.seed + 1)
    results = []
    for b in cfg.batch_sizes:
        for s in cfg.seq_lens:
            prompts = g.integers(min(100, vocab // 2), vocab, (b, s), dtype=np.int64)
            for _ in range(cfg.warmup):
                for r in runners.values():
                    r(prompts, min(cfg.new_tokens, 8))
            times = {n: [] for n in runners}
            for _ in range(cfg.runs):
                for j in order.permutation(len(runners)):
                    name = list(runners)[j]
                    times[name].append(runners[name](prompts, cfg.new_tokens))
            for name, ts in times.items():
                ttft = np.array([t[0] for t in ts]) * 1e3
                tps = np.array([b * (cfg.new_tokens - 1) / t[1] for t in ts])
                results.append(
                    {
                        "backend": name,
                        "batch": b,
                        "prompt": s,
                        "new_tokens": cfg.new_tokens,
                        "ttft_p50_ms": float(np.median(ttft)),
                        "ttft_p90_ms": float(np.percentile(ttft, 90)),
                        "decode_tokens_s_p50": float(np.median(tps)),
                        "decode_tokens_s_min": float(tps.min()),
                        "weight_bytes": int(runners[name].bytes),
                        "n": len(ts),
                    }
                )
            log(
                f"batch {b} prompt {s}: "
                + ", ".join(
                    f"{r['backend']} TTFT {r['ttft_p50_ms']:.1f} ms, {r['decode_tokens_s_p50']:.1f} tok/s"
                    for r in results[-len(runners) :]
                )
            )
    bw = memory_bandwidth()
    return {
        "results": results,
        "summary": decoder_summary(results, bw),
        "memory_bandwidth_GBs": bw / 1e9,
        "notes": notes,
    }


def decoder_summary(results: list[dict], bandwidth: float) -> list[dict]:
    """Per shape and ONNX Runtime backend: decode tokens/s and TTFT over HF generate's; at batch 1, tokens/s over
    the bandwidth ceiling (bandwidth / weight bytes)."""
    out = []
    for r in results:
        if r["backend"] == "torch-merged":
            continue
        hf = next(
            (
                x
                for x in results
                if x["backend"] == "torch-merged" and (x["batch"], x["prompt"]) == (r["batch"], r["prompt"])
            ),
            None,
        )
        row = {"backend": r["backend"], "batch": r["batch"], "prompt": r["prompt"]}
        if hf:
            row["decode_speedup"] = r["decode_tokens_s_p50"] / hf["decode_tokens_s_p50"]
            row["ttft_ratio"] = r["ttft_p50_ms"] / hf["ttft_p50_ms"]
        if r["batch"] == 1:
            row["bandwidth_ceiling_tokens_s"] = bandwidth / r["weight_bytes"]
            row["fraction_of_ceiling"] = r["decode_tokens_s_p50"] / row["bandwidth_ceiling_tokens_s"]
        out.append(row)
    return out


def print_decoder_bench(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"decoder latency on {result['device']}, {result['config']['threads']} threads")
    for col in ("batch", "prompt", "backend", "TTFT p50 ms", "decode tok/s p50", "weights MiB"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for r in result["results"]:
        t.add_row(
            str(r["batch"]),
            str(r["prompt"]),
            r["backend"],
            f"{r['ttft_p50_ms']:.1f}",
            f"{r['decode_tokens_s_p50']:.1f}",
            f"{r['weight_bytes'] / 2**20:.0f}",
        )
    console.print(t)
    console.print(f"memory bandwidth (copy): {result['memory_bandwidth_GBs']:.1f} GB/s")
    for s in result["summary"]:
        parts = []
        if "decode_speedup" in s:
            parts.append(f"decode {s['decode_speedup']:.2f}x HF generate, TTFT ratio {s['ttft_ratio']:.2f}")
        if "fraction_of_ceiling" in s:
            parts.append(
                f"{s['fraction_of_ceiling']:.0%} of the bandwidth ceiling {s['bandwidth_ceiling_tokens_s']:.0f} tok/s"
            )
        console.print(
            f"{s['backend']} batch {s['batch']} prompt {s['prompt']}: " + ", ".join(parts), soft_wrap=True
        )
    for n in result["notes"]:
        console.print(f"note: {n}", soft_wrap=True)
