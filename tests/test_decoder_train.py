"""Decoder continual training (issue 35) on tiny random Llama (with a chat template) and GPT-2 (Conv1D layers, no
template) models with a word-level tokenizer: the loss is on response tokens only, training lowers it, the
sampled Fisher equals an autograd brute force, --resume and --add are bitwise equal to one run, `pmserve merge`
of the RUN's adapters gives its merged state (and PEFT's merge_and_unload for one task), batched greedy
generation equals HF generate one prompt at a time; and one real SmolLM2 run."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmserve.errors import PMError
from tests.conftest import FILLER, WORDS

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
QUIET = dict(progress=False, log=lambda *_: None)


def _tokenizer(folder: Path, chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for v in WORDS.values() for w in v.split()} | set(FILLER) | set(WORDS))
    vocab = SPECIAL + words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
    )
    if chat:
        fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return len(vocab)


def _model(folder: Path, arch: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    n = _tokenizer(folder, chat=arch == "llama")
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            initializer_range=0.3,  # the output layer (not adapted) sees RMS-normed states: logits must reach far
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        LlamaForCausalLM(cfg).save_pretrained(folder)
    else:
        cfg = GPT2Config(
            vocab_size=n,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            initializer_range=0.3,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def write_gen_tasks(root: Path, groups: list[list[str]], n_train: int = 12, n_test: int = 4) -> Path:
    """Tasks whose prompt is words of a topic and whose response is the topic's name."""
    rng = random.Random(0)
    for t, labels in enumerate(groups):
        d = root / f"t{t}"
        d.mkdir(parents=True)
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for y in labels:
                for _ in range(n):
                    words = WORDS[y].split()
                    prompt = " ".join(
                        rng.choice(words if k % 2 == 0 else FILLER) for k in range(rng.randint(2, 5))
                    )
                    rows.append({"prompt": prompt, "response": y})
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def gen_tasks(tmp_path_factory) -> Path:
    return write_gen_tasks(tmp_path_factory.mktemp("gen") / "data", [["animal", "food"], ["tool", "place"]])


def config(data, model, **kw):
    from pmserve.train import TrainConfig

    base = dict(
        data=str(data), model=str(model), epochs=2, batch_size=4, rank=2, fisher_samples=6, lr=2e-2, seed=1
    )
    return TrainConfig(**{**base, **kw})


def _learner(model: Path, **kw):
    from pmserve.lm_learner import DecoderLearner, decoder_config, load_decoder

    cfg = decoder_config(config("x", model, **kw))
    dec, fmt, _ = load_decoder(str(model), cfg.max_length)
    return DecoderLearner(cfg, dec, fmt, torch.device("cpu"))


# ---------------------------------------------------------------- rendering, loss and evaluation


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_is_on_response_tokens_only(arch, llama, gpt2):
    from pmserve.lm_learner import pad_batch, token_losses

    learner = _learner(llama if arch == "llama" else gpt2)
    fmt, model = learner.prep, learner.encoder.model
    convs = [[{"role": "user", "content": "dog the cat"}], [{"role": "user", "content": "bread"}]]
    responses = ["animal", "food bread"]
    encoded = [fmt.encode(c, r) for c, r in zip(convs, responses)]
    if arch == "llama":  # the template's turn: the response and its end-of-turn token
        assert fmt.tok.convert_ids_to_tokens(encoded[0][0][encoded[0][1] :]) == ["animal", "</s>"]
        assert fmt.tok.convert_ids_to_tokens(encoded[0][0][: encoded[0][1]]) == [
            "<|user|>",
            "dog",
            "the",
            "cat",
            "</s>",
            "<|assistant|>",
        ]
    else:  # plain text: the prompt's words, then the response and the EOS
        assert fmt.tok.convert_ids_to_tokens(encoded[1][0]) == ["bread", "food", "bread", "</s>"]
    per_seq, count = token_losses(model, pad_batch(encoded, fmt.pad_id))
    for r, (ids, n_prompt) in enumerate(encoded):  # each sequence alone, unpadded, summed by hand
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        ref = -sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        assert float(per_seq[r]) == pytest.approx(ref, rel=1e-5)
        assert int(count[r]) == len(ids) - n_prompt


def _scored_batch(fmt):
    """Rows whose response tokens sit at different positions and differ in number (and one padded row)."""
    from pmserve.lm_learner import pad_batch

    convs = [["dog the cat", "animal"], ["bread", "food bread"], ["the cat dog bread", "food"]]
    return pad_batch([fmt.encode([{"role": "user", "content": c}], r) for c, r in convs], fmt.pad_id)


def _grads(model, per_seq):
    return torch.autograd.grad(
        per_seq.sum() / per_seq.numel(), [p for p in model.parameters() if p.requires_grad]
    )


def _losses_and_grads(model, batch, u=None):
    from pmserve.lm_learner import token_losses

    per_seq, _ = token_losses(model, batch, u)
    return per_seq.detach(), _grads(model, per_seq)


def _by_hand(model, batch):
    """The reference: every position's logits from the model's own forward, the response tokens picked out."""
    logp = torch.log_softmax(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
    )
    labels = batch["labels"][:, 1:]
    nll = -logp[:, :-1].gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (nll * (labels != -100)).sum(1)


@pytest.mark.parametrize(
    "arch,targets",
    [("llama", None), ("gpt2", None), ("llama", ("q_proj", "v_proj", "lm_head"))],
)
def test_scored_positions_only_equal_the_full_logits(arch, targets, llama, gpt2):
    """The loss's logits at the response positions only (base model, then the output layer): the same losses and
    LoRA gradients (lm_head's too, through PEFT's wrapped layer, with a per-sample perturbation hooked on it) as
    the model's own forward over every position; and the same sampled Fisher labels."""
    from pmserve.adapters import ADAPTER, LoraSpec, add_lora, lora_layers
    from pmserve.lm_learner import HEAD_SPLIT, causal_lm
    from pmserve.perturb import Perturbation

    learner = _learner(llama if arch == "llama" else gpt2)
    model = learner.encoder.model
    assert getattr(model, HEAD_SPLIT) is True
    spec = learner.cfg.lora if targets is None else LoraSpec(rank=2, alpha=4.0, target_modules=targets)
    torch.manual_seed(0)
    peft_model = add_lora(model, spec)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    batch = _scored_batch(learner.prep)
    keep = batch["labels"][:, 1:] != -100
    assert len({tuple(r.nonzero()[:, 0].tolist()) for r in keep}) == 3  # every row scored elsewhere
    pert = None
    if targets is not None:
        pert = Perturbation(lora_layers(peft_model), 0.5, "sample", seed=0, adapter=ADAPTER)
        pert.draw(3)
    u = torch.rand(keep.shape, generator=torch.Generator().manual_seed(0))
    fast, fast_u = _losses_and_grads(peft_model, batch), _losses_and_grads(peft_model, batch, u)
    setattr(causal_lm(peft_model), HEAD_SPLIT, False)  # the full forward: every position's logits
    full, full_u = _losses_and_grads(peft_model, batch), _losses_and_grads(peft_model, batch, u)
    per_seq = _by_hand(peft_model, batch)
    ref = per_seq.detach(), _grads(peft_model, per_seq)
    for got in (fast, full):
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        assert len(got[1]) == len(ref[1]) > 0
        for g, r in zip(got[1], ref[1]):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast_u[0], full_u[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(fast_u[1], full_u[1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    if pert is not None:
        pert.remove()


def test_a_model_that_rescales_its_logits_keeps_the_full_forward(llama):
    """A forward that post-processes the logits (as Gemma 2's soft-capping or Cohere's logit_scale do) fails
    the check at load, and the loss stays its own forward's."""
    from transformers import LlamaForCausalLM

    from pmserve.lm_learner import HEAD_SPLIT, Decoder, token_losses

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = Scaled.from_pretrained(str(llama)).eval()
    Decoder(model)
    assert getattr(model, HEAD_SPLIT) is False
    learner = _learner(llama)
    batch = _scored_batch(learner.prep)
    per_seq, _ = token_losses(model, batch)
    torch.testing.assert_close(per_seq, _by_hand(model, batch), rtol=1e-5, atol=1e-6)


def _prefixed_batch(fmt):
    """Rows that begin alike (the template's turn start and two words) and then differ, one padded."""
    from pmserve.lm_learner import pad_batch

    convs = [["the cat dog", "animal"], ["the cat bread food", "food bread"], ["the cat food", "animal"]]
    return pad_batch([fmt.encode([{"role": "user", "content": c}], r) for c, r in convs], fmt.pad_id)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_shared_prefix_run_once_gives_every_rows_own_losses_and_gradients(arch, llama, gpt2):
    """The tokens every row begins with run once for the batch (their cache repeated per row): the losses and
    LoRA gradients equal the model's own forward over every full row, with the output layer at the scored
    positions only and with the full logits; the prefix stops before any row's first scored position."""
    from pmserve.adapters import add_lora
    from pmserve.lm_learner import HEAD_SPLIT, PREFIX_SPLIT, causal_lm, shared_prefix, token_losses

    learner = _learner(llama if arch == "llama" else gpt2)
    model = learner.encoder.model
    assert getattr(model, PREFIX_SPLIT) is True
    torch.manual_seed(0)
    peft_model = add_lora(model, learner.cfg.lora)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    batch = _prefixed_batch(learner.prep)
    keep = batch["labels"][:, 1:] != -100
    n = shared_prefix(batch["input_ids"], batch["attention_mask"], keep)
    assert n == (3 if arch == "llama" else 2)  # <|user|> the cat / the cat
    per_seq = _by_hand(peft_model, batch)
    ref = per_seq.detach(), _grads(peft_model, per_seq)
    shapes = []  # what the embedding sees: the prefix once, then every row's rest
    hook = (
        causal_lm(peft_model)
        .get_input_embeddings()
        .register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    )
    for split in (True, False):
        setattr(causal_lm(peft_model), HEAD_SPLIT, split)
        shapes.clear()
        got = token_losses(peft_model, batch, share_prefix=True)[0]
        assert shapes == [(1, n), (3, batch["input_ids"].shape[1] - n)]
        torch.testing.assert_close(got.detach(), ref[0], rtol=1e-5, atol=1e-6)
        for g, r in zip(_grads(peft_model, got), ref[1], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    hook.remove()
    same = {k: v[[0, 0]] for k, v in batch.items()}  # identical rows: the prefix ends before the response
    first = int(keep[0].to(torch.uint8).argmax())
    assert shared_prefix(same["input_ids"], same["attention_mask"], keep[[0, 0]]) == first
    assert shared_prefix(batch["input_ids"][:1], batch["attention_mask"][:1], keep[:1]) == 0


def test_a_model_that_ignores_its_cache_keeps_the_full_pass(llama):
    """A forward that drops the cache it is given fails the check at load (its prefix-shared logits differ),
    and the loss with share_prefix stays its own forward's."""
    from transformers import LlamaForCausalLM

    from pmserve.lm_learner import PREFIX_SPLIT, Decoder, token_losses

    class Forgetful(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            if kwargs.get("past_key_values") is not None:
                kwargs["past_key_values"] = None
                kwargs["attention_mask"] = kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1] :]
            return super().forward(*args, **kwargs)

    model = Forgetful.from_pretrained(str(llama)).eval()
    Decoder(model)
    assert getattr(model, PREFIX_SPLIT) is False
    batch = _prefixed_batch(_learner(llama).prep)
    per_seq, _ = token_losses(model, batch, share_prefix=True)
    torch.testing.assert_close(per_seq, _by_hand(model, batch), rtol=1e-5, atol=1e-6)


def test_exact_match_normalisation():
    from pmserve.lm_learner import normalise

    assert normalise("  Change Accent.\n") == normalise("change accent") == "change accent"
    assert normalise("Paris!?") == "paris" and normalise("a. b") == "a. b"
    assert normalise("change accent please") != normalise("change accent")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_generation_equals_hf_generate_one_by_one(arch, llama, gpt2):
    learner = _learner(llama if arch == "llama" else gpt2)
    fmt, model = learner.prep, learner.encoder.model
    convs = [[{"role": "user", "content": " ".join(WORDS["animal"].split()[: k + 1])}] for k in range(5)]
    got = learner.generate(convs, max_new=6)
    for conv, answer in zip(convs, got):
        ids = torch.tensor([fmt.prompt_ids(conv)])
        out = model.generate(
            input_ids=ids,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=fmt.stop_ids,
            pad_token_id=fmt.pad_id,
        )
        new = out[0, ids.shape[1] :].tolist()
        new = new[: next((n for n, t in enumerate(new) if t in fmt.stop_ids), len(new))]
        assert answer == fmt.tok.decode(new, skip_special_tokens=True)


def test_sampled_fisher_equals_autograd_brute_force(gpt2, gen_tasks):
    """GPT-2's Conv1D layers: the Fisher (and Delta) in the weight's in x out layout."""
    from pmserve.adapters import add_lora, lora_layers, task_vectors
    from pmserve.lm_learner import IGNORE, pad_batch
    from pmserve.task_fisher import fisher_generator, fisher_order
    from pmserve.tasks import load_task_folder

    learner = _learner(gpt2, fisher_samples=5, batch_size=2)
    task = load_task_folder(gen_tasks / "t0")
    torch.manual_seed(3)
    peft_model = add_lora(learner.encoder.model, learner.cfg.lora)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    learner.encoder.model = peft_model
    layers = lora_layers(peft_model)
    fisher = learner._fisher(task, 0, layers)
    delta = task_vectors(peft_model)
    # reference: the plain model with W_0 + Delta, per-sample autograd, labels drawn by inverse CDF at the same
    # uniforms (one per position of each global batch, drawn after the samples)
    plain = peft_model.merge_and_unload()
    mods = dict(plain.named_modules())
    for name in delta:
        assert mods[name].weight.shape == delta[name].shape == fisher[name].shape
        mods[name].weight.requires_grad_(True)
    gen = fisher_generator(1, 0)
    order = fisher_order(task.train, 5, gen).tolist()
    enc = sorted(
        (learner.prep.encode(task.train.inputs[j], task.train.labels[j]) for j in order),
        key=lambda e: len(e[0]),
    )
    ref = {n: torch.zeros_like(f, dtype=torch.float64) for n, f in fisher.items()}
    for k in range(0, len(enc), 2):
        glob = enc[k : k + 2]
        u = torch.rand(len(glob), max(len(e[0]) for e in glob), generator=gen)
        for r, (ids, n_prompt) in enumerate(glob):
            logits = plain(input_ids=torch.tensor([ids])).logits[0]
            loss = 0
            for t in range(n_prompt, len(ids)):
                p = torch.softmax(logits[t - 1].double(), -1)
                y = int((p.cumsum(0) < u[r, t - 1] * p.sum()).sum())  # the inverse CDF, by hand
                loss = loss - torch.log_softmax(logits[t - 1], -1)[y]
            grads = torch.autograd.grad(loss, [mods[n].weight for n in ref])
            for n, g in zip(ref, grads):
                ref[n] += g.double() ** 2
    for n in ref:
        torch.testing.assert_close(fisher[n].double(), ref[n] / len(enc), rtol=1e-4, atol=1e-9)
    assert IGNORE == -100 and pad_batch  # the module's padding is what the learner used


# ---------------------------------------------------------------- RUNs


@pytest.fixture(scope="module")
def llama_run(llama, gen_tasks, tmp_path_factory) -> tuple[Path, dict]:
    from pmserve.train import train

    out = tmp_path_factory.mktemp("llama-run") / "run"
    return out, train(config(gen_tasks, llama, keep_fisher=True), out, **QUIET)


def test_pm_run_learns_and_records_exact_match_and_nll(llama, gen_tasks, llama_run, tmp_path):
    from pmserve.train import train

    out, result = llama_run
    assert result["head"] == "exact" and len(result["nll_matrix"]) == 2
    assert [len(r) for r in result["acc_matrix"]] == [1, 2] and result["ACC"] is not None
    info = json.loads((out / "tasks" / "00-t0" / "task.json").read_text())
    assert set(info["acc"]) == {"exact"} and len(info["nll"]) == 1
    frozen = train(config(gen_tasks, llama, method="frozen"), tmp_path / "frozen", **QUIET)
    # training lowered the response loss of the task it trained on, well below the base model's
    assert result["nll_matrix"][0][0] < 0.5 * frozen["nll_matrix"][0][0]
    assert result["acc_matrix"][0][0] > frozen["acc_matrix"][0][0]
    assert not (out / "state" / "head.safetensors").exists()


def test_resume_and_add_are_bitwise_equal_to_one_run(llama, gen_tasks, llama_run, tmp_path, monkeypatch):
    from pmserve import lm_learner
    from pmserve.train import add_tasks, train

    full, result = llama_run
    real = lm_learner.DecoderLearner.train_task

    def dying(self, task, i, *a, **kw):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, task, i, *a, **kw)

    monkeypatch.setattr(lm_learner.DecoderLearner, "train_task", dying)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(config(gen_tasks, llama, keep_fisher=True), part, **QUIET)
    monkeypatch.setattr(lm_learner.DecoderLearner, "train_task", real)
    resumed = train(config(gen_tasks, llama, keep_fisher=True), part, resume=True, **QUIET)
    # --add: a RUN of the first task, grown by the second
    first = tmp_path / "first"
    (first / "t0").parent.mkdir()
    (first / "t0").symlink_to(gen_tasks / "t0")
    train(config(first, llama, keep_fisher=True), tmp_path / "grown", **QUIET)
    size = {p.name: p.stat().st_size for p in (tmp_path / "grown" / "state").glob("*.safetensors")}
    grown = add_tasks(tmp_path / "grown", [gen_tasks / "t1"], **QUIET)
    # the state stays the same size as tasks are added: merged deltas and the two P&M accumulators
    assert {p.name: p.stat().st_size for p in (tmp_path / "grown" / "state").glob("*.safetensors")} == size
    assert set(size) == {"merged.safetensors", "fisher_sums.safetensors"}
    for other, res in ((part, resumed), (tmp_path / "grown", grown)):
        for k in ("acc_matrix", "nll_matrix", "alphas"):
            assert res[k] == result[k], k
        for name in ("merged", "fisher_sums"):
            a = load_file(str(full / "state" / f"{name}.safetensors"))
            b = load_file(str(other / "state" / f"{name}.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_of_the_run_adapters_is_its_state_and_peft_merge(llama, llama_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pmserve.merging import MergeOptions, merge_adapters

    out, result = llama_run
    notes = []
    rep = merge_adapters([out], tmp_path / "d", options=MergeOptions("pm", "delta"), log=notes.append)
    assert rep["alphas"] == pytest.approx(result["alphas"], abs=1e-6)
    # a causal LM carries no classifier: none written, none mentioned, --calibrate refused before OUT exists
    assert rep["classifier"] is None and not (tmp_path / "d" / "labels.json").exists()
    assert not any("classifier" in n for n in notes)
    with pytest.raises(PMError, match="--calibrate: .* causal LM"):
        merge_adapters(
            [out], tmp_path / "c", options=MergeOptions("pm", "delta", calibrate="x"), log=notes.append
        )
    assert not (tmp_path / "c").exists()
    ours = load_file(str(tmp_path / "d" / "merged.safetensors"))
    theirs = load_file(str(out / "state" / "merged.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
    # --format full: a model folder transformers loads as the causal LM, holding W_0 + D
    merge_adapters([out], tmp_path / "full", options=MergeOptions("pm", "full"), log=lambda *_: None)
    full = dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).named_modules())
    start = dict(AutoModelForCausalLM.from_pretrained(str(llama)).named_modules())
    for k, d in theirs.items():
        torch.testing.assert_close(full[k].weight, start[k].weight + d, rtol=0, atol=1e-6)
    # the first task alone (alpha_1 = 1): W_0 + D_1 is PEFT's merge_and_unload of its saved adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(str(llama))
        merged = PeftModel.from_pretrained(base, str(out / "tasks" / "00-t0")).merge_and_unload()
    w0 = dict(AutoModelForCausalLM.from_pretrained(str(llama)).named_modules())
    mods = dict(merged.named_modules())
    one = merge_adapters(
        [out / "tasks" / "00-t0"], tmp_path / "d1", options=MergeOptions("pm", "delta"), log=lambda *_: None
    )
    d1 = load_file(str(tmp_path / "d1" / "merged.safetensors"))
    assert one["alphas"] == [1.0]
    for k, d in d1.items():
        torch.testing.assert_close(w0[k].weight + d, mods[k].weight, rtol=0, atol=1e-6)


def test_gpt2_conv1d_run_and_encoder_options_refused(gpt2, gen_tasks, tmp_path):
    from pmserve.train import train

    res = train(config(gen_tasks, gpt2, epochs=1, method="merge"), tmp_path / "g", **QUIET)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["target_modules"] == ["c_attn", "c_proj", "c_fc"]
    assert json.loads((tmp_path / "g" / "tasks" / "00-t0" / "adapter_config.json").read_text())[
        "fan_in_fan_out"
    ]
    assert res["alphas"][0] == 1.0 and len(res["nll_matrix"]) == 2
    with pytest.raises(PMError, match="--head: applies to encoders only"):
        train(config(gen_tasks, gpt2, head="prototype"), tmp_path / "h", **QUIET)
    assert not (tmp_path / "h").exists()


def test_decoder_defaults_apply_where_options_are_left_alone(gpt2):
    from pmserve import defaults as D
    from pmserve.lm_learner import decoder_config
    from pmserve.train import TrainConfig

    cfg = decoder_config(TrainConfig(data="x", model=str(gpt2), rank=4))
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.max_length) == (
        D.TRAIN_DECODER_LR,
        D.TRAIN_DECODER_EPOCHS,
        D.TRAIN_DECODER_BATCH_SIZE,
        D.TRAIN_DECODER_MAX_LENGTH,
    )
    assert cfg.rank == 4 and decoder_config(TrainConfig(data="x", lr=0.1)).lr == 0.1
    # given: the options chosen keep their values, even the encoders' defaults; the rest take the decoders'
    chosen = decoder_config(
        TrainConfig(data="x", lr=D.TRAIN_LR, epochs=D.TRAIN_EPOCHS, given={"lr", "epochs"})
    )
    assert (chosen.lr, chosen.epochs, chosen.batch_size) == (
        D.TRAIN_LR,
        D.TRAIN_EPOCHS,
        D.TRAIN_DECODER_BATCH_SIZE,
    )
    assert "given" not in chosen.saved() and chosen.saved() == TrainConfig(**chosen.saved()).saved()


def _cli(*args):
    from pmserve.cli.main import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["train", *map(str, args)])


def test_cli_keeps_an_option_given_at_the_encoder_default(gpt2, gen_tasks, tmp_path, monkeypatch):
    """`--max-length 64` (the encoders' default) typed for a decoder run trains at 64, is what config.json
    records, and --resume keeps it; left out, the run takes the decoders' 96 (stopped before anything is
    written)."""
    from pmserve import defaults as D
    from pmserve import train as train_module

    assert D.TRAIN_MAX_LENGTH != D.TRAIN_DECODER_MAX_LENGTH  # else this test tells nothing
    out = tmp_path / "given"
    small = ("--epochs", 1, "--rank", 2, "--fisher-samples", 6, "--quiet")
    res = _cli(gen_tasks, "--model", gpt2, "--out", out, "--max-length", D.TRAIN_MAX_LENGTH, *small)
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_length"], saved["batch_size"], saved["epochs"]) == (
        D.TRAIN_MAX_LENGTH,
        D.TRAIN_DECODER_BATCH_SIZE,
        1,
    )
    assert "given" not in saved
    again = _cli("--out", out, "--resume", "--quiet")  # the RUN's options, not the decoders' defaults
    assert again.exit_code == 0, again.output
    assert json.loads((out / "config.json").read_text()) == saved

    seen = []

    def stop(out, cfg, resume, model):  # the configuration the RUN would record
        seen.append(cfg.saved())
        raise PMError("stopped")

    monkeypatch.setattr(train_module, "_prepare_out", stop)
    res = _cli(gen_tasks, "--model", gpt2, "--out", tmp_path / "left", *small)
    assert "stopped" in res.output and seen[0]["max_length"] == D.TRAIN_DECODER_MAX_LENGTH


# ---------------------------------------------------------------- the real model


def test_smollm2_trains_one_tiny_task_end_to_end(smollm2_cache, tmp_path):
    """builtin:smollm2 through the whole path (template, LoRA on its 210 linear layers, the sampled Fisher, the
    profile, the merge, generation), kept small: one task of 2 intents, 8 requests, one step."""
    from pmserve import defaults as D
    from pmserve.train import TrainConfig, train

    cfg = TrainConfig(
        data="builtin:clinc150-gen:tasks=1,classes=2,train=4,test=1",
        model="builtin:smollm2",
        epochs=1,
        fisher_samples=2,
        rank=2,
    )
    res = train(cfg, tmp_path / "run", **QUIET)
    assert res["head"] == "exact" and res["alphas"] == [1.0]
    assert 0.0 <= res["ACC"] <= 1.0 and 0.0 < res["nll_matrix"][0][0] < 10.0
    assert res["curvatures"][0]["curvature"] >= 0.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["batch_size"], saved["lr"], saved["max_length"]) == (  # the decoder defaults
        D.TRAIN_DECODER_BATCH_SIZE,
        D.TRAIN_DECODER_LR,
        D.TRAIN_DECODER_MAX_LENGTH,
    )
    assert sorted(saved["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@pytest.mark.parametrize("per", ["sample", "step"])
def test_two_ranks_give_one_process_results(per, llama, tmp_path):
    """torchrun, two gloo ranks: the same global batches (10 examples in batches of 4: the last splits 1 + 1),
    perturbation draws and sampled Fisher labels as one process; per step, each rank's rows also run their
    shared prefix (the template's first token) once."""
    import os
    import subprocess
    import sys

    from pmserve.train import train

    data = write_gen_tasks(tmp_path / "data", [["animal", "food"], ["tool", "place"]], n_train=5, n_test=2)
    opts = dict(epochs=2, batch_size=4, rank=2, fisher_samples=6, lr=2e-2, seed=1, perturb_per=per)
    one = train(config(data, llama, **opts), tmp_path / "one", **QUIET)
    argv = [
        sys.executable,
        "-m",
        "pmserve",
        "train",
        str(data),
        "--model",
        str(llama),
        "--out",
        str(tmp_path / "two"),
    ]
    argv += [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*argv, "--quiet", "--nproc", "2"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["alphas"] == pytest.approx(one["alphas"], abs=1e-5)
    flat = [x for row in one["nll_matrix"] for x in row]
    assert [x for row in two["nll_matrix"] for x in row] == pytest.approx(flat, rel=1e-3)
    a = load_file(str(tmp_path / "one" / "state" / "merged.safetensors"))
    b = load_file(str(tmp_path / "two" / "state" / "merged.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    fa = load_file(str(tmp_path / "one" / "state" / "fisher_sums.safetensors"))
    fb = load_file(str(tmp_path / "two" / "state" / "fisher_sums.safetensors"))
    for k in fa:
        # compared as a whole: one entry in 1024 was seen 2% apart (most likely a sampled token flipped by a
        # uniform on a CDF boundary, the weights being equal only to float rounding; not pinned down)
        assert float((fa[k] - fb[k]).norm()) <= 1e-2 * float(fa[k].norm()), k


def test_encoder_commands_refuse_a_decoder_run_in_one_line(llama):
    from pmserve.backbone import load_encoder

    with pytest.raises(PMError, match="are for `pmserve train` and `pmserve merge`") as e:
        load_encoder(str(llama), "generative")
    assert "\n" not in str(e.value)
