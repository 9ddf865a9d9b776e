"""Deployment commands: `pmserve export`, `predict`, `generate`, `eval` and `bench`. Each parses, calls one library
function (pmserve.export, pmserve.predict, pmserve.bench) and prints. `register(app)` adds them to the app."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pmserve import defaults as D

from .options import joined, parse_list, parse_pairs


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def register(app: typer.Typer) -> None:
    from pmserve.cli.main import user_errors  # here, not at import: main.py may import this module

    @app.command()
    @user_errors
    def export(
        merged: Path = typer.Argument(
            ...,
            help="A RUN, a Hugging Face model folder (a `pmserve merge --format full` output, a "
            "*ForSequenceClassification / *ForImageClassification, or an encoder: an embedding model), or a "
            "`pmserve merge --format delta|adapter` output (with --base).",
        ),
        out: Path = typer.Option(
            ...,
            "--out",
            "-o",
            help="BUNDLE folder to write (must not exist); with --new-version, a model folder REPO/NAME.",
        ),
        new_version: bool = typer.Option(
            False,
            "--new-version",
            help="Write the bundle as the next numbered version OUT/1, OUT/2, ... of the model folder OUT "
            "(made when missing; no version is ever overwritten), for `pmserve serve --repository`.",
        ),
        dtype: str = typer.Option(
            D.EXPORT_DTYPE,
            help="fp32 | fp16 (fp16 for GPUs; the classifier stays fp32; a decoder's cache is fp16 too, its logits fp32).",
        ),
        opset: int = typer.Option(D.EXPORT_OPSET, help="ONNX opset, 14..20."),
        optimize: bool = typer.Option(
            D.EXPORT_OPTIMIZE,
            "--optimize/--no-optimize",
            help="ONNX Runtime transformer fusions (BERT-like, ViT); default: on for --dtype fp16 (GPUs), off for "
            "fp32 and int8 (measured faster without on CPUs).",
            show_default=False,
        ),
        quantize: str = typer.Option(
            "",
            help="int8: dynamic int8 quantisation for CPUs (reports its accuracy drop; a decoder: weight-only "
            "8-bit MatMulNBits); int4: weight-only 4-bit MatMulNBits (decoder language models).",
        ),
        block_size: int = typer.Option(
            D.EXPORT_BLOCK_SIZE, help="A decoder's --quantize: weights per block."
        ),
        graph: str = typer.Option(
            D.EXPORT_GRAPH,
            help="A decoder's graph: auto (genai for Llama, Mistral, Qwen2 and Qwen3 models whose heads are a "
            "multiple of 16 wide, except fp16; else traced) | traced (pmserve's own trace, any causal LM) | genai "
            "(ONNX Runtime GenAI's model builder: GroupQueryAttention, 1.2-1.9x faster decoding; CPU provider).",
        ),
        data: str = typer.Option(
            "", help="Task sequence for the int8 accuracy report (default: the source's)."
        ),
        max_length: int = typer.Option(
            0, help=f"Tokenizer truncation (default: the source's, else {D.UNKNOWN_MAX_LENGTH})."
        ),
        base: str = typer.Option(
            "", "--base", help="Base model of a delta or adapter MODEL (default: the one its merge recorded)."
        ),
        scores: str = typer.Option(
            "",
            help="A model's own classification head: softmax | logits (default: softmax for single-label heads, "
            "the probabilities transformers' pipelines give).",
        ),
        pooling: str = typer.Option(
            "",
            help="An embedding model: mean | cls | max (default: its sentence-transformers files, else mean).",
        ),
        normalize: bool | None = typer.Option(
            D.EXPORT_NORMALIZE,
            "--normalize/--no-normalize",
            help="An embedding model: L2-normalise (default: its sentence-transformers files, else no).",
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the final line."),
    ):
        """Export a model to an ONNX bundle: model.onnx (class scores, or embeddings), tokenizer, labels, manifest."""
        from pmserve.export import ExportOptions, export_bundle, export_version

        opts = ExportOptions(
            dtype=dtype,
            opset=opset,
            optimize=optimize,
            quantize=quantize or None,
            block_size=block_size,
            graph=graph,
            data=data or None,
            max_length=max_length or None,
            base=base or None,
            scores=scores or None,
            pooling=pooling or None,
            normalize=normalize,
        )
        log = (lambda *_: None) if quiet else typer.echo
        if new_version:
            out, m = export_version(merged, out, opts, log=log)
        else:
            m = export_bundle(merged, out, opts, log=log)
        size = m["files"]["model.onnx"]["bytes"] / 2**20
        if m["kind"] == "causal-lm":
            q, data = m["quantization"], m["files"].get("model.onnx.data")
            weights = m["dtype"] if not q else ("int4" if q.get("bits") == 4 else "int8")
            graph = f"model.onnx {size:.1f} MiB" + (
                f" + model.onnx.data {data['bytes'] / 2**20:.1f} MiB" if data else ""
            )
            ids = ", ".join(i["name"] for i in m["inputs"] if not i["name"].startswith("past_key_values."))
            typer.echo(
                f"wrote {out}: {graph} (causal-lm, {weights}, {m.get('graph', 'traced')} graph), {ids} and a "
                f"{m['cache']['layers']}-layer KV cache -> logits, present"
            )
            return
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in m["inputs"])
        outs = ", ".join(f"{o['name']}{o['shape']}" for o in m["outputs"])
        typer.echo(f"wrote {out}: model.onnx {size:.1f} MiB ({m['dtype']}, {m['kind']}), {ins} -> {outs}")

    @app.command()
    @user_errors
    def predict(
        bundle: Path = typer.Argument(..., help="A BUNDLE from `pmserve export` (or a merged model folder)."),
        inputs: list[str] = typer.Argument(
            ...,
            help="Texts (or image paths), .txt files of lines, .jsonl files with a text/image field, or -.",
        ),
        provider: str = typer.Option(
            D.PREDICT_PROVIDER, help="auto (CUDA when a GPU is present) | cpu | cuda."
        ),
        top_k: int = typer.Option(D.PREDICT_TOP_K, help="Labels to print per input."),
        batch_size: int = typer.Option(D.PREDICT_BATCH_SIZE, help="Inputs per model call."),
        as_json: bool = typer.Option(
            False, "--json", help="One JSON object per input instead of tab-separated."
        ),
    ):
        """Print the predicted label(s) and score(s), tab-separated, then the input; for an embedding model, the
        embedding's values, space-separated, then the input. A model trained with --reject first prints each
        input's answer (its top label, or '<out of scope>') and the score it was judged by (the fit, or for
        older RUNs the top score), then the labels and scores.

        The score is the classifier's raw score: a logit (linear head), a scaled cosine (cosine head), a cosine
        to the class mean (prototype) or the ridge regression's output (ridge); a model's own head gives its
        softmax probabilities or logits, as the bundle was exported."""
        from pmserve.predict import predict as run_predict

        rows, model = run_predict(bundle, inputs, provider, top_k, batch_size)
        for r in rows:
            if as_json:
                typer.echo(json.dumps(r))
            elif "embedding" in r:
                typer.echo(" ".join(f"{v:.6g}" for v in r["embedding"]) + f"\t{r['input']}")
            else:
                top = "\t".join(f"{lab}\t{s:.4f}" for lab, s in r["top"])
                # a rejecting model's answer first: a label or <out of scope>, and what judged it
                if model.reject is not None:
                    top = f"{r['label']}\t{r.get('fit', r['score']):.4f}\t{top}"
                typer.echo(f"{top}\t{r['input']}")
        _echo_err(
            f"{len(rows)} inputs scored by {model.backend} ({', '.join(getattr(model, 'providers', ['pytorch']))})"
        )

    @app.command()
    @user_errors
    def generate(
        bundle: Path = typer.Argument(..., help="A decoder BUNDLE from `pmserve export` of a causal LM."),
        prompt: str = typer.Argument(..., help="The prompt (- reads it from stdin)."),
        chat: bool = typer.Option(
            D.GENERATE_CHAT, "--chat", help="Send PROMPT as a user message through the chat template."
        ),
        max_new_tokens: int = typer.Option(D.GENERATE_MAX_NEW_TOKENS, help="Tokens to generate at most."),
        temperature: float = typer.Option(D.GENERATE_TEMPERATURE, help="0: greedy; else sample."),
        top_p: float = typer.Option(
            D.GENERATE_TOP_P, help="Nucleus sampling: smallest set reaching this mass."
        ),
        top_k: int = typer.Option(D.GENERATE_TOP_K, help="Sample among the k likeliest tokens (0: all)."),
        seed: int = typer.Option(D.GENERATE_SEED, help="Seed of the sampler (same seed, same text)."),
        stop: list[str] = typer.Option(
            list(D.GENERATE_STOP), "--stop", help="Stop before this string (repeatable)."
        ),
        provider: str = typer.Option(D.GENERATE_PROVIDER, help="cpu | cuda | auto."),
    ):
        """Generate text from a decoder bundle with ONNX Runtime, streaming tokens to stdout as they come."""
        import sys

        from pmserve.generation import SamplingParams, stream_bundle

        text = sys.stdin.read() if prompt == "-" else prompt
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop or ()))
        seq = None
        for s, delta in stream_bundle(bundle, text, params, chat, provider):
            seq = s
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if seq is not None:
            _echo_err(f"{len(seq.tokens)} tokens, finished by {seq.finish_reason}")

    @app.command("eval")
    @user_errors
    def eval_(
        model: Path = typer.Argument(
            ..., help="A BUNDLE, a RUN folder or a `pmserve merge --format full` folder."
        ),
        data: str = typer.Argument(
            None, help="Task folders or builtin:...; default: the sequence it was trained on."
        ),
        seed: int = typer.Option(
            None, help="Class order of a built-in sequence (default: the model's run's)."
        ),
        provider: str = typer.Option(D.PREDICT_PROVIDER, help="auto | cpu | cuda."),
        batch_size: int = typer.Option(D.PREDICT_BATCH_SIZE, help="Inputs per model call."),
        json_file: Path = typer.Option(None, "--json", help="Also write the results here."),
    ):
        """Accuracy on the test split of every task, and overall; for a model trained with --reject, also with
        rejection (an in-scope request answered '<out of scope>' counts as wrong)."""
        from pmserve.predict import evaluate

        res = evaluate(model, data, seed, provider, batch_size)
        for r in res["tasks"]:
            if r["acc"] is None:
                typer.echo(f"{r['task']:<24} not evaluated (its test set is not reachable here)")
            else:
                rejecting = (
                    f"  with rejection {r['acc_with_rejection']:.4f}" if "acc_with_rejection" in r else ""
                )
                typer.echo(f"{r['task']:<24} {r['acc']:.4f}{rejecting}  (n={r['n']})")
        if res["mean"] is None:
            typer.echo("no test set of this model is reachable here; give DATA")
        else:
            rejecting = (
                f"  with rejection {res['mean_with_rejection']:.4f}" if "mean_with_rejection" in res else ""
            )
            typer.echo(f"{'mean over tasks':<24} {res['mean']:.4f}{rejecting}")
            typer.echo(f"{'all test examples':<24} {res['overall']:.4f}  ({res['backend']})")
        if json_file:
            json_file.write_text(json.dumps(res, indent=2))

    @app.command()
    @user_errors
    def bench(
        model: Path = typer.Argument(..., help="A BUNDLE or a merged model folder (exported on the fly)."),
        batch_sizes: str = typer.Option(joined(D.BENCH_BATCH_SIZES), help="Comma-separated batch sizes."),
        seq_lens: str = typer.Option(
            joined(D.BENCH_SEQ_LENS), help="Comma-separated sequence lengths (text models)."
        ),
        warmup: int = typer.Option(D.BENCH_WARMUP, help="Untimed calls per backend and shape."),
        runs: int = typer.Option(D.BENCH_RUNS, help="Timed calls per backend and shape."),
        provider: str = typer.Option(
            D.BENCH_PROVIDER, help="cpu | cuda (ONNX Runtime with IOBinding, PyTorch on the GPU)."
        ),
        threads: int = typer.Option(
            D.BENCH_THREADS, help="CPU threads for both runtimes (0: PyTorch's default)."
        ),
        backends: str = typer.Option(joined(D.BENCH_BACKENDS), help="Which to time, comma-separated."),
        new_tokens: int = typer.Option(
            D.BENCH_NEW_TOKENS,
            help="A decoder bundle: tokens generated per prompt (--seq-lens: prompt lengths).",
        ),
        also: str = typer.Option(
            D.BENCH_ALSO,
            help="More bundles of the same model to time beside it, as NAME=BUNDLE,... (e.g. int4=b4); "
            "rows onnxruntime-NAME.",
        ),
        json_file: Path = typer.Option(None, "--json", help="Write the full results here."),
    ):
        """Latency (p50/p90/p99) and throughput: ONNX Runtime, PyTorch merged, base and unmerged PEFT, interleaved."""
        from pmserve.bench import BenchConfig, print_bench, run_bench, write_json

        cfg = BenchConfig(
            batch_sizes=parse_list(batch_sizes, "batch-sizes", int),
            seq_lens=parse_list(seq_lens, "seq-lens", int),
            warmup=warmup,
            runs=runs,
            provider=provider,
            threads=threads,
            backends=parse_list(backends, "backends"),
            new_tokens=new_tokens,
            other_bundles=parse_pairs(also, "also"),
        )
        res = run_bench(model, cfg, log=typer.echo)
        print_bench(res)
        if json_file:
            write_json(res, json_file)
            typer.echo(f"wrote {json_file}")
