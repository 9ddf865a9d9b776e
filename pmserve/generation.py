"""Text generation over an ONNX Runtime session of a decoder bundle: either graph `pmserve export` writes (causal_lm's
trace, or ONNX Runtime GenAI's builder's GroupQueryAttention graph; OrtDecoder says which and each has its cache
class, PaddedCache or SharedCache).

Built for iteration-level batching from the start: a DecodeBatch holds the sequences running now and one KV
cache for them (padded to a common length); between two decode steps a caller may add() new sequences (their
prompts are run as one batch, and their caches merged in by padding) and finished or cancelled ones leave. Each
Sequence carries its own sampling settings, random generator, stopping rule and text, so what one caller gets does
not depend on who else is in the batch (greedy tokens are the same alone or batched; a seeded sample is the same
alone or batched). `Generator.stream` is the simple loop over it that `pmserve generate` and the benchmark use; a
server runs the same loop, adding arrivals before each step() and routing each Sequence's text deltas to its
caller.

Stop rules, as Hugging Face's generate and the OpenAI API have them: an EOS token of the generation config ends a
sequence (and is not part of its text), a stop string ends it with the text cut before the string, and
max_new_tokens ends it. Text is streamed as it becomes final: a tail that could still turn into a stop string, or
half of a multi-byte character, is held back until the next token settles it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import defaults as D
from .causal_lm import KVLayout
from .errors import PMError

GENAI_CONFIG = "genai_config.json"  # beside a GroupQueryAttention graph of ONNX Runtime GenAI's builder


@dataclass
class SamplingParams:
    """How one sequence is decoded and when it stops. temperature 0 is greedy (top_k / top_p unused)."""

    max_new_tokens: int = D.GENERATE_MAX_NEW_TOKENS
    temperature: float = D.GENERATE_TEMPERATURE
    top_p: float = D.GENERATE_TOP_P
    top_k: int = D.GENERATE_TOP_K
    seed: int | None = D.GENERATE_SEED  # None: fresh entropy; prompt i of a batch uses seed + i
    stop: tuple[str, ...] = field(default_factory=lambda: tuple(D.GENERATE_STOP))

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise PMError(f"--max-new-tokens: must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise PMError(f"--temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PMError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PMError(f"--top-k: must be >= 0 (0: no limit), got {self.top_k}")
        if any(not s for s in self.stop):
            raise PMError("--stop: a stop string must not be empty")


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax when greedy, else a draw from the softmax of logits /
    temperature restricted to the top_k tokens and then to the smallest set whose probability reaches top_p."""
    if p.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / p.temperature
    order = np.argsort(-x, kind="stable")
    if p.top_k:
        order = order[: p.top_k]
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    if p.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1  # the token that crosses top_p stays
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    cdf = np.cumsum(probs)
    return int(order[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(order) - 1)])


class Sequence:
    """One request: its prompt ids, the tokens generated so far, its text, and why it finished (None while it
    runs; "eos", "stop", "length" or "cancelled"). With tokenizer None it makes tokens only."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, tokenizer, eos_ids, seed_offset: int = 0
    ):
        if not prompt_ids:
            raise PMError("prompt: empty after tokenisation")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.rng = np.random.default_rng(None if params.seed is None else params.seed + seed_offset)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._emitted = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this sequence (a client went away); it leaves its batch before the next step."""
        if not self.finished:
            self.finish_reason = "cancelled"

    def push(self, logits: np.ndarray) -> str:
        """Choose the next token from LOGITS [vocab], apply the stop rules; returns the text now final."""
        token = sample(logits, self.params, self.rng)
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "eos"
            return self._delta()
        if self.tokenizer is None:  # tokens only (a benchmark): no text, no stop strings
            if len(self.tokens) >= self.params.max_new_tokens:
                self.finish_reason = "length"
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if cuts:
            self.text, self.finish_reason = text[: min(cuts)], "stop"
        else:
            self.text = text
            if len(self.tokens) >= self.params.max_new_tokens:
                self.finish_reason = "length"
        return self._delta()

    def _delta(self) -> str:
        final = self.text
        if not self.finished:
            final = final.rstrip("\ufffd")  # half a multi-byte character
            for s in self.params.stop:  # a tail that may yet become a stop string
                for k in range(min(len(s) - 1, len(final)), 0, -1):
                    if final.endswith(s[:k]):
                        final = final[:-k]
                        break
        out = final[self._emitted :]
        self._emitted = max(self._emitted, len(final))
        return out


class OrtDecoder:
    """An ONNX Runtime session on a decoder bundle's graph, of either layout: causal_lm's trace (input_ids,
    attention_mask, position_ids and a cache that each call returns grown by one: PaddedCache) or ONNX Runtime
    GenAI's model builder (GroupQueryAttention reading and writing one cache buffer in place, positions taken
    from the mask: SharedCache). prefill() hides which."""

    def __init__(self, path: Path | str, provider: str = "cpu", threads: int = 0, spinning: bool = True):
        from .predict import ort_session

        path = Path(path)
        if (path.parent / GENAI_CONFIG).is_file() and provider != "cpu":
            # SharedCache's buffers are host memory bound in place: measured on the CPU provider only (no GPU
            # was lent); on CUDA each step would copy them to the device and back, if the in-place update held
            if provider == "cuda":
                raise PMError(
                    f"{path}: a GroupQueryAttention (GenAI) graph runs on the CPU provider in pmserve; for GPUs "
                    "export with --graph traced (as --dtype fp16 does)"
                )
            provider = "cpu"
        self.session = ort_session(path, provider, threads, spinning)
        names = [i.name for i in self.session.get_inputs()]
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if names[:2] != ["input_ids", "attention_mask"] or not past:
            raise PMError(f"{path}: not a KV-cache decoder graph (inputs {', '.join(names[:4])}, ...)")
        self.shared = "position_ids" not in names  # the GenAI builder's graph (module docstring)
        shape = past[0].shape
        head_dim = genai_head_size(path.parent) if self.shared else int(shape[3])
        self.layout = KVLayout(len(past) // 2, int(shape[1]), head_dim)
        self.cache_dtype = np.float16 if "float16" in past[0].type else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return empty_past(self.layout, batch, self.cache_dtype)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]):
        """A traced graph's call: (logits [batch, sequence, vocab] float32, present caches)."""
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feed.update(zip(self.layout.past_names, past))
        out = self.session.run(None, feed)
        return out[0].astype(np.float32, copy=False), out[1:]

    def prefill(self, rows: list[list[int]], pad_id: int):
        """(logits [batch, vocab] after each prompt of ROWS, their cache): the prompts run as one batch."""
        if self.shared:
            return SharedCache.prefill(self, rows, pad_id)
        return PaddedCache.prefill(self, rows, pad_id)

    def bind_cache(self, buffers: list[np.ndarray]):
        """An IO binding of a GenAI graph with each layer's past and present bound to the same buffer of BUFFERS,
        which the graph then reads and writes in place, as GenAI's own runtime binds them."""
        import onnxruntime as ort

        bind = self.session.io_binding()
        bind.bind_output("logits")  # first, so that it is get_outputs()[0]
        for past, present, buf in zip(self.layout.past_names, self.layout.present_names, buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buf)  # shares the array's memory
            bind.bind_ortvalue_input(past, value)
            bind.bind_ortvalue_output(present, value)
        return bind

    def run_bound(self, bind, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A GenAI graph's call on the cache BIND holds (bind_cache): logits [batch, sequence, vocab] float32."""
        bind.bind_cpu_input("input_ids", ids)
        bind.bind_cpu_input("attention_mask", mask)
        bind.bind_output("logits")  # unallocated again: its shape changes from run to run
        self.session.run_with_iobinding(bind)
        # the logits only: copy_outputs_to_cpu() would copy every cache buffer too (32 ms a step at batch 8)
        return bind.get_outputs()[0].numpy().astype(np.float32, copy=False)


def genai_head_size(folder: Path) -> int:
    """The head size a GenAI graph's genai_config.json records (its cache inputs leave it symbolic)."""
    from .formats import read_json

    cfg = folder / GENAI_CONFIG
    if not cfg.is_file():
        raise PMError(f"{folder}: a GroupQueryAttention decoder graph without its genai_config.json")
    return int(read_json(cfg)["model"]["decoder"]["head_size"])


def empty_past(layout: KVLayout, batch: int, dtype=np.float32) -> list[np.ndarray]:
    """The cache of BATCH sequences that have read nothing yet (length 0)."""
    return [np.zeros((batch, layout.kv_heads, 0, layout.head_dim), dtype) for _ in layout.past_names]


def prompt_feed(manifest: dict, rows: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """The graph's inputs for the prompts ROWS (padded, empty cache), from the bundle's manifest alone: what a
    child process checks a served candidate on before the server opens its graph (pmserve.serving.candidate).
    The cache has the graph's type as the manifest records it (float16 in an fp16 bundle)."""
    c = manifest["cache"]
    layout = KVLayout(int(c["layers"]), int(c["kv_heads"]), int(c["head_dim"]))
    names = {i["name"]: i["dtype"] for i in manifest["inputs"]}
    dtype = np.dtype(names.get(layout.past_names[0], "float32"))
    if "position_ids" in names:
        feed = dict(zip(("input_ids", "attention_mask", "position_ids"), left_pad(rows, pad_id)))
    else:  # a GenAI graph runs a prompt on an empty cache too (right-padded, positions from the mask)
        feed = dict(zip(("input_ids", "attention_mask"), right_pad(rows, pad_id)))
    return feed | dict(zip(layout.past_names, empty_past(layout, len(rows), dtype)))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids) of token rows padded on the left to one length."""
    n = max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad_id, np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    return ids, mask, pos


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of token rows padded on the right to one length."""
    lens = np.array([len(r) for r in rows])
    ids = np.full((len(rows), int(lens.max())), pad_id, np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, _lengths_mask(lens)


def _lengths_mask(lens: np.ndarray) -> np.ndarray:
    return (np.arange(int(lens.max()))[None] < lens[:, None]).astype(np.int64)


class PaddedCache:
    """The cache of a graph that takes position ids (causal_lm's trace, and PyTorch's CachedDecoder in the export
    gate): rows left-padded to one length, a mask marking their real tokens, the cache returned one longer by each
    call. DECODER is called as (ids, mask, positions, past) -> (logits, present)."""

    def __init__(self, decoder, past: list[np.ndarray], mask: np.ndarray):
        self.decoder, self.past, self.mask = decoder, past, mask

    @classmethod
    def prefill(cls, decoder, rows: list[list[int]], pad_id: int):
        ids, mask, pos = left_pad(rows, pad_id)
        logits, present = decoder(ids, mask, pos, decoder.empty_past(len(rows)))
        return logits[:, -1], cls(decoder, present, mask)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [batch, vocab] after each row reads its token of TOKENS [batch]."""
        pos = self.mask.sum(1, keepdims=True)  # positions count real tokens only (left padding is skipped)
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], 1)
        logits, self.past = self.decoder(tokens[:, None].astype(np.int64), self.mask, pos, self.past)
        return logits[:, -1]

    def join(self, other: PaddedCache) -> None:
        """OTHER's rows appended after these (both padded on the left to one width)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        old, old_mask = _pad_cache(self.past, self.mask, width)
        new, new_mask = _pad_cache(other.past, other.mask, width)
        self.past = [np.concatenate([a, b]) for a, b in zip(old, new)]
        self.mask = np.concatenate([old_mask, new_mask])

    def keep(self, rows: list[int]) -> None:
        """Only ROWS stay; then the columns no remaining row uses go."""
        self.past = [p[rows] for p in self.past]
        self.mask = self.mask[rows]
        used = np.flatnonzero(self.mask.any(0))
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start:
            self.past = [p[:, :, start:] for p in self.past]
            self.mask = self.mask[:, start:]


def _pad_cache(past: list[np.ndarray], mask: np.ndarray, width: int):
    """Caches and mask padded on the left (axis 2 / axis 1) to WIDTH."""
    extra = width - mask.shape[1]
    if extra == 0:
        return past, mask
    past = [np.pad(p, ((0, 0), (0, 0), (extra, 0), (0, 0))) for p in past]
    return past, np.pad(mask, ((0, 0), (extra, 0)))


class SharedCache:
    """The cache of a GenAI graph (OrtDecoder.bind_cache): one buffer per layer input, [batch, kv_heads, capacity,
    head_dim], that the graph writes in place. Row i holds its tokens at [0, lens[i]) (right-padded); the mask
    only says how many (GroupQueryAttention takes each row's length, and so its next position, from it). The
    capacity doubles when a row would pass it, so only the step that doubles it copies the cache."""

    def __init__(self, decoder: OrtDecoder, buffers: list[np.ndarray], lens: np.ndarray):
        self.decoder, self.buffers, self.lens = decoder, buffers, lens

    @property
    def buffers(self) -> list[np.ndarray]:
        return self._buffers

    @buffers.setter
    def buffers(self, value: list[np.ndarray]) -> None:  # new arrays: bound again (0.7 ms), not every step
        self._buffers, self._bind = value, self.decoder.bind_cache(value)

    @classmethod
    def prefill(cls, decoder: OrtDecoder, rows: list[list[int]], pad_id: int):
        ids, mask = right_pad(rows, pad_id)
        lens = mask.sum(1)
        lay = decoder.layout
        shape = (len(rows), lay.kv_heads, _capacity(ids.shape[1] + 1), lay.head_dim)
        cache = cls(decoder, [np.zeros(shape, decoder.cache_dtype) for _ in lay.past_names], lens)
        logits = decoder.run_bound(cache._bind, ids, mask)
        return logits[np.arange(len(rows)), lens - 1], cache

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [batch, vocab] after each row reads its token of TOKENS [batch]."""
        self.lens = self.lens + 1
        self._reserve(int(self.lens.max()))
        ids = tokens[:, None].astype(np.int64)
        return self.decoder.run_bound(self._bind, ids, _lengths_mask(self.lens))[:, -1]

    def join(self, other: SharedCache) -> None:
        """OTHER's rows appended after these (both at the larger capacity; bound once, as one new cache)."""
        cap = max(self.buffers[0].shape[2], other.buffers[0].shape[2])
        pairs = zip(_widened(self.buffers, cap), _widened(other.buffers, cap))
        self.buffers = [np.concatenate([a, b]) for a, b in pairs]
        self.lens = np.concatenate([self.lens, other.lens])

    def keep(self, rows: list[int]) -> None:
        self.buffers = [np.ascontiguousarray(b[rows]) for b in self.buffers]
        self.lens = self.lens[rows]

    def _reserve(self, length: int) -> None:
        if length > self.buffers[0].shape[2]:
            self.buffers = _widened(self.buffers, _capacity(length))


def _widened(buffers: list[np.ndarray], cap: int) -> list[np.ndarray]:
    """BUFFERS padded on the right of their sequence axis to capacity CAP (the same arrays when already there)."""
    extra = cap - buffers[0].shape[2]
    return [np.pad(b, ((0, 0), (0, 0), (0, extra), (0, 0))) for b in buffers] if extra else buffers


def _capacity(length: int) -> int:
    """A cache capacity for LENGTH tokens: the next power of two, at least 64."""
    return max(64, 1 << (length - 1).bit_length())


class DecodeBatch:
    """The sequences decoding together now and their one KV cache. add() joins new sequences (their prompts run
    as one batch and yield each its first token), step() gives every running sequence one more token; finished
    and cancelled sequences leave at the start of the next add() or step()."""

    def __init__(self, decoder: OrtDecoder, pad_id: int = 0):
        self.decoder = decoder
        self.pad_id = pad_id
        self.seqs: list[Sequence] = []
        self.cache = None

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, str]]:
        """Run the prompts of SEQS, choose their first tokens and merge them into the batch."""
        self._leave()
        if not seqs:
            return []
        logits, cache = self.decoder.prefill([s.prompt_ids for s in seqs], self.pad_id)
        events = [(s, s.push(logits[i])) for i, s in enumerate(seqs)]
        if self.seqs:
            self.cache.join(cache)
        else:
            self.cache = cache
        self.seqs += seqs
        return events

    def step(self) -> list[tuple[Sequence, str]]:
        """One decode step for every running sequence: (sequence, its new final text) for each."""
        self._leave()
        if not self.seqs:
            return []
        logits = self.cache.step(np.array([s.tokens[-1] for s in self.seqs], np.int64))
        return [(s, s.push(logits[i])) for i, s in enumerate(self.seqs)]

    def _leave(self) -> None:
        """Drop finished rows and what of the cache only they used."""
        keep = [i for i, s in enumerate(self.seqs) if not s.finished]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if keep:
            self.cache.keep(keep)
        else:
            self.cache = None


class Generator:
    """A decoder bundle's session, tokenizer and generation config: prompts in, text out (streamed)."""

    def __init__(self, decoder: OrtDecoder, tokenizer, eos_ids: list[int], pad_id: int):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id

    @property
    def providers(self) -> list[str]:
        return self.decoder.session.get_providers()

    @classmethod
    def from_bundle(
        cls, folder: Path | str, provider: str = "cpu", threads: int = 0, spinning: bool = True
    ) -> Generator:
        from transformers import AutoTokenizer

        from .formats.bundle import MODEL

        folder = Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        eos, pad = generation_ids(folder, tokenizer)
        return cls(OrtDecoder(folder / MODEL, provider, threads, spinning), tokenizer, eos, pad)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of PROMPT; with CHAT, as the user's message in the tokenizer's chat template."""
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of MESSAGES ({"role", "content"} each) in the tokenizer's chat template, ready for the
        assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise PMError("--chat: this bundle's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def sequences(self, prompts: list[str], params: SamplingParams, chat: bool = False) -> list[Sequence]:
        params.validate()
        return [
            Sequence(self.encode(p, chat), params, self.tokenizer, self.eos_ids, seed_offset=i)
            for i, p in enumerate(prompts)
        ]

    def stream(self, seqs: list[Sequence]) -> Iterator[tuple[int, str]]:
        """Decode SEQS as one batch to the end: (index of the sequence, text delta) as each becomes final."""
        index = {id(s): i for i, s in enumerate(seqs)}
        batch = DecodeBatch(self.decoder, self.pad_id)
        events = batch.add(seqs)
        while True:
            for s, delta in events:
                if delta:
                    yield index[id(s)], delta
            if all(s.finished for s in seqs):
                return
            events = batch.step()

    def greedy(self, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens (an EOS included) of the prompts ROWS decoded as one batch: what the export gate and a
        server's load check compare with Hugging Face generate's."""
        seqs = [
            Sequence(r, SamplingParams(max_new_tokens=max_new_tokens), self.tokenizer, self.eos_ids)
            for r in rows
        ]
        for _ in self.stream(seqs):
            pass
        return [s.tokens for s in seqs]

    def generate(self, prompts: list[str], params: SamplingParams, chat: bool = False) -> list[Sequence]:
        """The finished sequences of PROMPTS (text, tokens, finish_reason), decoded as one batch."""
        seqs = self.sequences(prompts, params, chat)
        for _ in self.stream(seqs):
            pass
        return seqs


def generation_ids(folder: Path, tokenizer) -> tuple[list[int], int]:
    """(EOS ids, pad id) from the folder's generation_config.json, else its tokenizer; pad falls back to EOS."""
    from .formats import read_json

    cfg = (
        read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    )
    eos = cfg.get("eos_token_id", tokenizer.eos_token_id)
    eos = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = cfg.get("pad_token_id", tokenizer.pad_token_id)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


def stream_bundle(
    bundle: Path | str, prompt: str, params: SamplingParams, chat: bool = False, provider: str = "cpu"
) -> Iterator[tuple[Sequence, str]]:
    """`pmserve generate`: the bundle checked (hashes, kind), then PROMPT's (sequence, text delta) as they come."""
    from .formats.bundle import verify_bundle

    params.validate()
    bundle = Path(bundle)
    m = verify_bundle(bundle)
    if m.get("kind") != "causal-lm":
        raise PMError(
            f"{bundle}: a {m.get('kind', 'classifier')} bundle; generate needs a decoder (causal-lm) bundle"
        )
    gen = Generator.from_bundle(bundle, provider)
    (seq,) = gen.sequences([prompt], params, chat)
    for _, delta in gen.stream([seq]):
        yield seq, delta
    yield seq, ""  # the finished sequence, even when it produced no text
