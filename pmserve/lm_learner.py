"""Continual training of a decoder (causal language model): the DecoderLearner, with the Learner's interface, so
pmserve.train's RUN lifecycle (_continue, --resume, --add, torchrun) runs it unchanged.

A generative example is a conversation and its response (tasks.Split). It is rendered with the tokenizer's chat
template when it has one (else the messages' text, one per line, then the response and the end-of-text token);
the loss is the next-token cross-entropy on the response's tokens only (the end-of-turn token included, so the
model learns to stop), never on the prompt or the padding. Everything P&M does is the encoder's code: the LoRA
(adapters.add_lora), the perturbation of its branch (perturb.Perturbation), Delta_t (adapters.task_vectors), the
diagonal Fisher (fisher.diagonal_fisher: a sample's gradient is its sequence loss's), the loss profile
(merging.curvature) and the merge (Learner.merge, merging.recurrence). The Fisher's labels are drawn from the
model's own next-token distribution at every response position (the true Fisher), by inverse CDF from uniforms
drawn for the whole global batch, so they do not depend on the number of ranks.

Evaluation: exact match of batched greedy generation (HF generate, KV cache, left padding), normalised for case,
surrounding whitespace and final punctuation, stopping at the longest reference plus a margin; and the mean
per-token NLL of the reference responses.
"""

from __future__ import annotations

import string
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import defaults as D
from . import distributed
from .adapters import ADAPTER, Tensors, add_lora, lora_layers, task_vectors
from .causal_lm import load_causal_lm
from .errors import PMError
from .fisher import diagonal_fisher
from .learner import Learner, TrainConfig, bucketed_batches
from .merging.curvature import PROFILE_POINTS, profile_curvature, rescale
from .perturb import Perturbation, branch_scale
from .progress import TrainProgress
from .seeds import SHUFFLE, perturb_seed, stream_generator, task_seed
from .task_fisher import fisher_generator, fisher_order
from .tasks import Split, Task

IGNORE = -100  # the label of a position the loss skips (prompt, padding), as transformers uses it
GENERATE_MARGIN = 4  # tokens generated beyond the longest reference response of a split
EVAL_BATCH = 32

# Options that only an encoder run uses (inference classifiers and the training head): a decoder is measured
# by exact match and NLL. A value other than its default, for a decoder, is refused.
ENCODER_ONLY = (
    "head",
    "train_head",
    "head_lr",
    "cosine_scale",
    "ridge_dim",
    "ridge_lambda",
    "ridge_select",
    "ridge_drift",
    "eval_heads",
    "reject",
    "gate",
)
# A decoder's own defaults, where the encoder's do not suit SmolLM2 (BENCHMARKS.md, issue 35)
DECODER_DEFAULTS = {
    "lr": (D.TRAIN_LR, D.TRAIN_DECODER_LR),
    "epochs": (D.TRAIN_EPOCHS, D.TRAIN_DECODER_EPOCHS),
    "batch_size": (D.TRAIN_BATCH_SIZE, D.TRAIN_DECODER_BATCH_SIZE),
    "max_length": (D.TRAIN_MAX_LENGTH, D.TRAIN_DECODER_MAX_LENGTH),
    "fisher_samples": (D.TRAIN_FISHER_SAMPLES, D.TRAIN_DECODER_FISHER_SAMPLES),
}


def decoder_config(cfg: TrainConfig) -> TrainConfig:
    """The options of a decoder run, decided here only. An option not in `cfg.given` takes the decoders' default
    (DECODER_DEFAULTS); one given keeps its value, whatever it is (`--lr 1e-3` stays 1e-3). A RUN read back from
    its config.json gives every option (train.run_config), so --resume keeps what the RUN recorded. Where
    `cfg.given` is None (a TrainConfig built in Python without saying), an option equal to the encoders' default
    is taken as left alone: pass `given` to ask for that value.

    An encoder-only option that differs from its default is a PMError (it would silently do nothing). One at its
    default is accepted even when given: it asks for nothing a decoder run does not already do, and a RUN read
    back gives every option, these included."""
    plain = TrainConfig(data=cfg.data)
    for k in ENCODER_ONLY:
        if getattr(cfg, k) != getattr(plain, k):
            raise PMError(
                f"--{k.replace('_', '-')}: applies to encoders only; a decoder run has no classifier "
                "(it is measured by exact match and NLL)"
            )
    if cfg.kernel == "triton":
        raise PMError("--kernel: triton is not supported for decoders yet (they train through PEFT's layers)")
    given = cfg.given
    if given is None:
        given = {
            k for k, (encoder_default, _) in DECODER_DEFAULTS.items() if getattr(cfg, k) != encoder_default
        }
    for k, (_, decoder_default) in DECODER_DEFAULTS.items():
        if k not in given:
            setattr(cfg, k, decoder_default)
    return cfg


class Decoder(nn.Module):
    """A causal LM as the learner's backbone: `.model` is what PEFT wraps and set_merged writes into. Whether
    its loss may apply the output layer at the scored positions only, and run a batch's shared prefix once, is
    checked here, once (check_head_split, check_prefix_split)."""

    kind = "generative"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        check_head_split(model)
        check_prefix_split(model)


class ChatFormat:
    """Conversations and responses as token ids: the tokenizer's chat template where it has one."""

    def __init__(self, tok, max_length: int):
        self.tok = tok
        self.max_length = max_length
        self.chat = bool(getattr(self.tok, "chat_template", None))
        eos = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos or 0)
        # the tokens that end a response: the EOS, and the special token that closes a turn in the template
        stops = {eos} if eos is not None else set()
        probe = self.response_ids([{"role": "user", "content": "a"}], "b")
        ordinary = {self.tok.unk_token_id, self.tok.pad_token_id}
        stops |= {t for t in probe if t in set(self.tok.all_special_ids) - ordinary}
        self.stop_ids = sorted(stops)

    def prompt_text(self, messages: list[dict]) -> str:
        if self.chat:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(m["content"] + "\n" for m in messages)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        # a template writes its own special tokens; plain text gets the tokenizer's (a BOS)
        return self.tok(self.prompt_text(messages), add_special_tokens=not self.chat)["input_ids"]

    def response_ids(self, messages: list[dict], response: str) -> list[int]:
        """The tokens the loss is on: the response and what ends its turn (the template's, else the EOS)."""
        if self.chat:
            prompt = self.prompt_text(messages)
            full = self.tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            if full.startswith(prompt):
                return self.tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = self.tok(response, add_special_tokens=False)["input_ids"]
        return ids + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])

    def encode(self, messages: list[dict], response: str) -> tuple[list[int], int]:
        """(prompt + response ids, prompt length), at most max_length: the prompt loses its start first (the
        response is what is learnt), then the response its end."""
        p, r = self.prompt_ids(messages), self.response_ids(messages, response)
        r = r[: self.max_length - 1]
        p = p[max(len(p) - (self.max_length - len(r)), 0) :]
        return p + r, len(p)

    def encode_split(self, split: Split) -> list[tuple[list[int], int]]:
        return [self.encode(x, y) for x, y in zip(split.inputs, split.labels)]


def load_decoder(spec: str, max_length: int) -> tuple[Decoder, ChatFormat, Path]:
    """The causal LM `spec` (a local folder or builtin:smollm2) in eval mode, its chat format, and its folder."""
    model, tok, path = load_causal_lm(spec, attn=None)
    return Decoder(model), ChatFormat(tok, max_length), path


def pad_batch(encoded: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (the ids on response tokens, IGNORE elsewhere)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for r, (x, n_prompt) in enumerate(encoded):
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
        labels[r, n_prompt : len(x)] = torch.tensor(x[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


HEAD_SPLIT = "pmserve_head_split"  # the attribute check_head_split sets on a causal LM: True where it holds
PREFIX_SPLIT = "pmserve_prefix_split"  # and check_prefix_split: True where a shared prefix may run once


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP, ResponseLogits and PEFT wrappers (the one object they all share)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, ResponseLogits)):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> int:
    """How many leading tokens every row of the batch has in common (a chat template's system prompt and an
    instruction's fixed words: 39 of SmolLM2's 56 on builtin:clinc150-gen), stopping before any row's first
    scored position: those positions can run once for the whole batch (run_shared)."""
    if input_ids.shape[0] < 2:
        return 0
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(0)
    n = int(same.long().cumprod(0).sum())
    scored = keep.any(1)
    if scored.any():
        n = min(n, int(keep.to(torch.uint8).argmax(1)[scored].min()))
    return n


def run_shared(fwd, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """fwd's first output (hidden states or logits) at positions prefix.. of every row. The first `prefix`
    tokens, the same in every row, run once at batch 1 and their keys and values are repeated for each row:
    exact in causal attention (a position sees only what precedes it), and gradients reach the shared part
    summed over the rows, as they would from separate copies."""
    if prefix == 0:
        return fwd(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    first = fwd(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix], use_cache=True)
    cache = first.past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.2x renames past_key_values
        rest = fwd(
            input_ids=input_ids[:, prefix:],
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
    return rest[0]


def _split_logits(
    lm: nn.Module, input_ids, attention_mask, keep: torch.Tensor, prefix: int = 0
) -> torch.Tensor:
    """The logits at the True positions of keep (B, T' <= T), row by row: the base model's final hidden states,
    then the output layer on (B, max kept per row, H) only. The head sees whole rows (not one flat list) so a
    per-row hook on it (the per-sample perturbation, if LoRA targets lm_head) still finds one row per sample.
    With `prefix`, the first positions (none of them kept) run once for the batch (run_shared)."""
    base = getattr(lm, lm.base_model_prefix)
    keep = keep[:, prefix:]
    hidden = run_shared(base, input_ids, attention_mask, prefix)[:, : keep.shape[1]]
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    # each row's kept positions first, in order (a stable sort of "not kept"), then cut to the longest row's
    pos = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    rows = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = lm.get_output_embeddings()(rows)
    return logits[torch.arange(width, device=counts.device) < counts.unsqueeze(1)]


class ResponseLogits(nn.Module):
    """A causal LM's logits at the scored positions only, as one module so DDP can wrap it (DDP syncs the
    gradients of what runs through its own forward). The output layer (576 x 49152 for SmolLM2) over every
    position and the log-softmax were most of a step's time, while a response is a few tokens of each row.

    `share_prefix`: the tokens every row of a batch begins with run once (shared_prefix, run_shared), where
    the model passed check_prefix_split. Never for the Fisher (its per-sample gradients need every row's own
    pass) nor with the per-sample perturbation (its hooks scale the branch row by row)."""

    def __init__(self, model: nn.Module, share_prefix: bool = False):
        super().__init__()
        self.module = model
        self.share_prefix = share_prefix

    def forward(self, input_ids, attention_mask, keep: torch.Tensor) -> torch.Tensor:
        """(N, V): the logits at the N True positions of keep (B, T' <= T), in row-major order."""
        lm = causal_lm(self.module)
        prefix = 0
        if self.share_prefix and getattr(lm, PREFIX_SPLIT, False):
            prefix = shared_prefix(input_ids, attention_mask, keep)
        if getattr(lm, HEAD_SPLIT, False):
            return _split_logits(lm, input_ids, attention_mask, keep, prefix)
        logits = run_shared(self.module, input_ids, attention_mask, prefix)
        return logits[:, : keep.shape[1] - prefix][keep[:, prefix:]]


@torch.no_grad()
def check_head_split(model: nn.Module) -> bool:
    """Whether the model's logits are its output layer applied to its base model's last hidden states, checked
    against its own forward on a small padded input; recorded on the model (HEAD_SPLIT), which ResponseLogits
    reads. A model that post-processes its logits (Gemma 2's soft-capping, Cohere's logit_scale), or has no
    base model or output layer to call, keeps the full forward rather than being silently wrong."""
    lm = causal_lm(model)
    training = lm.training
    ok = False
    try:
        lm.eval()
        vocab = lm.get_input_embeddings().num_embeddings
        ids = torch.randint(vocab, (2, 8), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        ids = ids.to(lm.device)
        mask = mask.to(lm.device)
        full = lm(input_ids=ids, attention_mask=mask).logits
        keep = torch.ones_like(ids, dtype=torch.bool)
        fast = _split_logits(lm, ids, mask, keep)
        ref = full[keep]
        ok = fast.shape == ref.shape and torch.allclose(
            fast.float(), ref.float(), rtol=1e-5, atol=1e-5 * float(ref.abs().max())
        )
    except Exception:  # any model that cannot be called this way keeps the full forward
        ok = False
    finally:
        lm.train(training)
    setattr(lm, HEAD_SPLIT, ok)
    return ok


def check_prefix_split(model: nn.Module) -> bool:
    """Whether running a batch's shared prefix once (run_shared) gives the model's own logits, and gradients
    through the shared part (checked on the input embeddings, which every position reaches), on a small padded
    input whose rows share 5 tokens; recorded on the model (PREFIX_SPLIT). A model whose cache cannot be
    repeated across rows, or computes or back-propagates differently with one, keeps the full pass."""
    lm = causal_lm(model)
    training = lm.training
    weight = lm.get_input_embeddings().weight
    had_grad = weight.requires_grad
    ok = False
    try:
        lm.eval()
        weight.requires_grad_(True)
        ids = torch.randint(weight.shape[0], (3, 9), generator=torch.Generator().manual_seed(0))
        ids[:, :5] = ids[0, :5]
        mask = torch.ones_like(ids)
        mask[2, 7:] = 0
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        outs = []
        with torch.enable_grad():
            for prefix in (0, 5):
                logits = run_shared(lm, ids, mask, prefix)[:, -4:-2]  # positions 5 and 6: real in every row
                (grad,) = torch.autograd.grad(logits.float().square().mean(), weight)
                outs.append((logits.detach().float(), grad.float()))
        (full, g_full), (fast, g_fast) = outs

        def close(a, b):
            return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))

        ok = close(fast, full) and close(g_fast, g_full)
    except Exception:  # any model that cannot be called this way keeps the full pass
        ok = False
    finally:
        weight.requires_grad_(had_grad)
        lm.train(training)
    setattr(lm, PREFIX_SPLIT, ok)
    return ok


def token_losses(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    u: torch.Tensor | None = None,
    share_prefix: bool = False,
):
    """(per-sequence summed cross-entropy over response tokens, response token count per sequence). Position t
    predicts token t + 1, scored against the reference token, or with `u` (uniforms, one per position) against
    a token drawn from the model's own distribution there (sample_targets). Logits are computed at the scored
    positions only (ResponseLogits, with `share_prefix`); `model` may be one already, or DDP around one."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    if not isinstance(model, ResponseLogits) and not isinstance(
        getattr(model, "module", None), ResponseLogits
    ):
        model = ResponseLogits(model, share_prefix)
    logits = model(batch["input_ids"], batch["attention_mask"], keep).float()
    targets = labels[keep] if u is None else sample_targets(logits.detach(), u[keep])
    nll = F.cross_entropy(logits, targets, reduction="none")
    per_seq = torch.zeros(labels.shape[0], device=nll.device).index_add(0, keep.nonzero()[:, 0], nll)
    return per_seq, keep.sum(1)


def sample_targets(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens drawn from softmax(logits) (N, V) by inverse CDF at the uniforms u (N,): deterministic given u."""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    picks = torch.searchsorted(cdf, (u.double().to(cdf.device) * cdf[:, -1]).unsqueeze(-1))
    return picks.squeeze(-1).clamp_max(logits.shape[-1] - 1)


def normalise(text: str) -> str:
    """An answer as exact match compares it: lower case, without surrounding whitespace or final punctuation."""
    return text.strip().rstrip(string.punctuation).strip().lower()


class DecoderLearner(Learner):
    """The Learner of a decoder run: the same merge, accumulators and state; no head or classifier."""

    losses = ("nll",)

    def __init__(self, cfg: TrainConfig, decoder: Decoder, fmt: ChatFormat, device: torch.device):
        self._adapt(cfg, decoder, fmt, device)
        self.classifiers = {}
        self.drift_mu = None
        self.timing: dict[str, float] = {}  # the last task's seconds in steps, Fisher and profile (task.json)

    @property
    def measures(self) -> list[str]:
        return ["exact"]

    def _encoded(self, split: Split) -> list[tuple[list[int], int]]:
        return self.prep.encode_split(split)

    # ---- one task

    def train_task(
        self, task: Task, i: int, epochs: int, progress: TrainProgress
    ) -> tuple[nn.Module | None, Tensors, Tensors, dict | None]:
        """Train task i (Learner.train_task's contract): LoRA on the response loss, the branch perturbed."""
        cfg = self.cfg
        self.timing = {}
        t0 = time.perf_counter()
        if cfg.method == "frozen":  # the base model as it is (zero-shot)
            for epoch in range(epochs):
                progress.epoch_done(epoch + 1, epochs)
            return None, {}, {}, None
        torch.manual_seed(task_seed(cfg.seed, i))  # PEFT draws lora_A's init from the global generator
        peft_model = add_lora(self.encoder.model, cfg.lora)
        self.encoder.model = peft_model
        layers = lora_layers(peft_model)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        eps = cfg.eps if cfg.method == "pm" else 0.0
        pert = (
            Perturbation(layers, eps, cfg.perturb_per, perturb_seed(cfg.seed, i), ADAPTER)
            if eps > 0
            else None
        )
        shuffle = stream_generator(cfg.seed, i, SHUFFLE)
        encoded = self._encoded(task.train)
        lengths = [len(ids) for ids, _ in encoded]
        # a batch's shared prefix runs once, except where the perturbation scales rows apart
        net = distributed.wrap(ResponseLogits(peft_model, pert is None or pert.per == "step"), self.device)
        world = distributed.world()
        for epoch in range(epochs):
            for idx in bucketed_batches(lengths, cfg.batch_size, shuffle):
                # the global batch's mean per response token: every rank counts the whole batch's tokens
                tokens = sum(lengths[j] - encoded[j][1] for j in idx.tolist())
                rows, weight = distributed.shard(len(idx)), world
                if rows.start == rows.stop:  # short last batch: DDP needs every rank, so one sample weighs 0
                    rows, weight = slice(0, 1), 0
                part = idx[rows].tolist()
                if pert is not None:
                    pert.draw(len(idx), self.device, rows)
                batch = {
                    k: v.to(self.device)
                    for k, v in pad_batch([encoded[j] for j in part], self.prep.pad_id).items()
                }
                per_seq, _ = token_losses(net, batch)
                loss = per_seq.sum() / tokens * weight
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                progress.step(loss)
            progress.epoch_done(epoch + 1, epochs)
        del net
        if pert is not None:
            pert.remove()
        self.timing["steps"] = time.perf_counter() - t0
        delta, scaled = task_vectors(peft_model), None
        weighs = cfg.method in ("pm", "merge")
        t0 = time.perf_counter()
        fisher = self._fisher(task, i, layers) if weighs or cfg.keep_fisher else {}
        self.timing["fisher"] = time.perf_counter() - t0
        if cfg.curvature == "profile" and weighs:
            t0 = time.perf_counter()
            losses = self._profile(task, i, layers)
            self.timing["profile"] = time.perf_counter() - t0
            c = profile_curvature(PROFILE_POINTS, losses)
            fisher, k = rescale(fisher, delta, c)
            scaled = {"points": list(PROFILE_POINTS), "losses": losses, "curvature": c, "fisher_scale": k}
        return peft_model, delta, fisher, scaled

    def _fisher_samples(self, task: Task, i: int) -> tuple[list[tuple[list[int], int]], torch.Generator]:
        """The encoded examples the Fisher and the profile are taken on (fisher_order's draw, by token length)
        and the generator that then draws the sampled labels."""
        gen = fisher_generator(self.cfg.seed, i)
        order = fisher_order(task.train, self.cfg.fisher_samples, gen).tolist()
        chosen = Split([task.train.inputs[j] for j in order], [task.train.labels[j] for j in order])
        encoded = sorted(self._encoded(chosen), key=lambda e: len(e[0]))
        return encoded, gen

    def _global_batches(self, encoded: list, gen: torch.Generator | None):
        """(this rank's padded slice of each global batch, per row: the uniforms its sampled labels are drawn
        at, or zeros where the reference tokens are the labels). The uniforms are drawn for the whole global
        batch, so a sample's labels do not depend on the number of ranks."""
        bs = self.cfg.batch_size
        for k in range(0, len(encoded), bs):
            glob = encoded[k : k + bs]
            width = max(len(ids) for ids, _ in glob)
            u = (
                torch.rand(len(glob), width, generator=gen)
                if gen is not None
                else torch.zeros(len(glob), width)
            )
            rows = distributed.shard(len(glob))
            part = glob[rows]
            if part:
                batch = {kk: v.to(self.device) for kk, v in pad_batch(part, self.prep.pad_id).items()}
                yield batch, u[rows, : batch["input_ids"].shape[1] - 1].to(self.device)

    def _fisher(self, task: Task, i: int, layers) -> Tensors:
        """The diagonal Fisher of each sequence's summed response loss at theta*_t, no perturbation; labels
        drawn from the model at every response position (sampled) or the reference tokens (true)."""
        encoded, gen = self._fisher_samples(task, i)
        sampled = self.cfg.fisher_labels == "sampled"

        def loss_fn(batch, u):
            return token_losses(self.encoder.model, batch, u if sampled else None)[0].sum()

        return diagonal_fisher(dict(layers), self._global_batches(encoded, gen if sampled else None), loss_fn)

    @torch.no_grad()
    def _profile(self, task: Task, i: int, layers) -> list[float]:
        """Task i's mean sequence loss at W_hat_{t-1} + s Delta_t for s in PROFILE_POINTS, on its Fisher's
        samples (the Fisher's scale: one sequence's summed response loss), no perturbation."""
        encoded, _ = self._fisher_samples(task, i)
        out = []
        for s in PROFILE_POINTS:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            with branch_scale(layers, s):
                for batch, _ in self._global_batches(encoded, None):
                    per_seq, _ = token_losses(self.encoder.model, batch, share_prefix=True)
                    total[0] += per_seq.sum().double()
                    total[1] += per_seq.numel()
            distributed.all_reduce_sum(total)
            out.append(float(total[0] / total[1].clamp_min(1)))
        return out

    # ---- evaluation

    @torch.no_grad()
    def accuracy(self, split: Split) -> dict[str, float]:
        """{"exact": exact-match accuracy of greedy generation, "nll": mean NLL per reference response token}."""
        answers = self.generate(split.inputs, max_new=self._max_new(split))
        exact = sum(normalise(a) == normalise(y) for a, y in zip(answers, split.labels)) / len(split.labels)
        return {"exact": exact, "nll": self.nll(split)}

    def _max_new(self, split: Split) -> int:
        longest = max(len(self.prep.response_ids(x, y)) for x, y in zip(split.inputs, split.labels))
        return longest + GENERATE_MARGIN

    @torch.no_grad()
    def nll(self, split: Split) -> float:
        encoded = self._encoded(split)
        order = sorted(range(len(encoded)), key=lambda j: len(encoded[j][0]))
        total, count = 0.0, 0
        for k in range(0, len(order), EVAL_BATCH):
            batch = pad_batch([encoded[j] for j in order[k : k + EVAL_BATCH]], self.prep.pad_id)
            batch = {kk: v.to(self.device) for kk, v in batch.items()}
            per_seq, n = token_losses(self.encoder.model, batch, share_prefix=True)
            total, count = total + float(per_seq.sum()), count + int(n.sum())
        return total / max(count, 1)

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], max_new: int) -> list[str]:
        """Greedy answers, batched by prompt length with left padding, through HF generate (KV cache)."""
        fmt, model = self.prep, self.encoder.model
        prompts = [fmt.prompt_ids(x)[-(fmt.max_length - 1) :] for x in conversations]
        order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
        out: list[str] = [""] * len(prompts)
        for k in range(0, len(order), EVAL_BATCH):
            rows = order[k : k + EVAL_BATCH]
            width = max(len(prompts[j]) for j in rows)
            ids = torch.full((len(rows), width), fmt.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, j in enumerate(rows):
                ids[r, width - len(prompts[j]) :] = torch.tensor(prompts[j])
                mask[r, width - len(prompts[j]) :] = 1
            gen = model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                eos_token_id=fmt.stop_ids or None,
                pad_token_id=fmt.pad_id,
            )
            for r, j in enumerate(rows):
                new = gen[r, width:].tolist()
                cut = next((n for n, t in enumerate(new) if t in fmt.stop_ids), len(new))
                out[j] = fmt.tok.decode(new[:cut], skip_special_tokens=True)
        return out

    # ---- no classifiers

    def features_before(self, task: Task) -> None:
        return None

    def update_classifiers(self, task: Task, i: int, before=None) -> None:
        return None

    def ridge_on_edge(self) -> None:
        return None

    def _save_heads(self, folder: Path) -> None:
        pass

    def _load_heads(self, folder: Path) -> None:
        pass
