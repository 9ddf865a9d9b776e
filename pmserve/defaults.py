"""Every default value of pmserve's options, in one place that imports nothing.

The library's option classes read their field defaults from here, and so does the command line, which must
build its `--help` without importing torch (importing pmserve.train, merge, export, serve or bench takes about
a second; `pmserve --help` should not). The rule: field F of

    TrainConfig   (pmserve train)    reads TRAIN_F
    MergeOptions  (pmserve merge)    reads MERGE_F
    ExportOptions (pmserve export)   reads EXPORT_F
    ServeConfig   (pmserve serve)    reads SERVE_F
    BenchConfig   (pmserve bench)    reads BENCH_F

with F in upper case. List-valued defaults are tuples here (immutable); a dataclass copies them in a
`default_factory`. tests/test_cli.py checks that the classes and the command line agree with this module.
Why the training defaults are what they are: README, "How pmserve chooses its defaults", and BENCHMARKS.md.
"""

from __future__ import annotations

# Token length assumed for a model whose training length is not recorded (a plain Hugging Face folder, a
# merge of adapters from outside pmserve, a bundle or run written before max_length was saved). It is not the
# training default (TRAIN_MAX_LENGTH): 128 covers the longer texts such a model may meet, where 64 would
# truncate them, and costs only time on short ones. Use it wherever a length is read with a fallback.
UNKNOWN_MAX_LENGTH = 128

# pmserve train: TrainConfig
TRAIN_MODEL = "builtin:minilm"
TRAIN_METHOD = "pm"
TRAIN_HEAD = "ridge"  # measured best inference head for every method (BENCHMARKS.md)
TRAIN_TRAIN_HEAD = ""  # "": cosine when the head is cosine, else linear (TrainConfig.__post_init__)
TRAIN_RANK = 10
TRAIN_LORA_ALPHA = 0.0  # 0: the same as the rank (LoRA scaling 1)
TRAIN_TARGET_MODULES = ("all-linear",)  # or ("key-value",), or module names
TRAIN_EPS = 0.5
TRAIN_PERTURB_PER = "step"
TRAIN_EPOCHS = 5
TRAIN_BATCH_SIZE = 32
TRAIN_LR = 1e-3
TRAIN_HEAD_LR = 1e-2
TRAIN_WEIGHT_DECAY = 0.01
TRAIN_MAX_LENGTH = 64
TRAIN_FISHER_SAMPLES = 512
TRAIN_FISHER_LABELS = "sampled"  # the true Fisher; runs from before the option used "true"
TRAIN_CLIP_ALPHA = True
TRAIN_CURVATURE = (
    "profile"  # the Fisher scaled to each task's loss profile; runs from before it used "fisher"
)
TRAIN_COSINE_SCALE = 16.0
TRAIN_RIDGE_DIM = 2000
TRAIN_RIDGE_LAMBDA = 0.0  # 0: chosen after every task by --ridge-select
TRAIN_RIDGE_SELECT = "gcv"  # from the statistics of every class seen; runs from before it used "holdout"
TRAIN_RIDGE_DRIFT = "linear"  # the map checked class by class; runs from before it used "none"
TRAIN_REJECT = 0.0  # off: rejection keeps ~99% of in-scope answers at 0.99, a measurable cost (BENCHMARKS.md)
TRAIN_GATE = False  # off until measured to pay (BENCHMARKS.md, issue 36)
TRAIN_EVAL_HEADS: tuple[str, ...] = ()
TRAIN_SEED = 0
TRAIN_DEVICE = "auto"
TRAIN_KEEP_TEST = True
TRAIN_KEEP_FISHER = False
TRAIN_KERNEL = "torch"  # measured faster than the fused kernel at the shapes pmserve trains (BENCHMARKS.md)
# A decoder run's (causal LM, generative tasks) own defaults, where the encoders' above do not suit SmolLM2-135M;
# the run uses these for the options not given (pmserve.lm_learner.decoder_config)
# lr and batch size: 1e-3 at 16 held out level with 5e-4 at 8 over 3 seeds, in half the steps (BENCHMARKS.md)
TRAIN_DECODER_LR = 1e-3
TRAIN_DECODER_EPOCHS = 2
TRAIN_DECODER_BATCH_SIZE = 16
TRAIN_DECODER_MAX_LENGTH = 96
TRAIN_DECODER_FISHER_SAMPLES = 64

# pmserve merge: MergeOptions. None means "decided from the inputs" (see MergeOptions).
MERGE_METHOD = "pm"
MERGE_FORMAT = "delta"
MERGE_WEIGHTS: tuple[float, ...] | None = None  # None: 1 per adapter
MERGE_DENSITY: float | None = None  # None: MERGE_DEFAULT_DENSITY for ties / dare-*, unused by the others
MERGE_DEFAULT_DENSITY = 0.5  # fraction of each task vector ties / dare-* keep when --density is not given
MERGE_SEED = 0
MERGE_CLIP: bool | None = None  # None: the RUN's clip_alpha when the adapters come from one, else True
MERGE_MAX_SHARD_SIZE = "5GB"
MERGE_DATA: str | None = None
MERGE_FISHER_SAMPLES = TRAIN_FISHER_SAMPLES  # the --data Fisher is computed as training computes it
MERGE_FISHER_LABELS = TRAIN_FISHER_LABELS
MERGE_CURVATURE = TRAIN_CURVATURE  # of the --data Fisher, as training scales its own
MERGE_CALIBRATE: str | None = None
MERGE_CALIBRATE_HEAD: str | None = None  # None: the carried classifier's kind, else ridge
MERGE_SAVED_MODULES = "average"  # PEFT modules_to_save (a SEQ_CLS head): merged (merging/saved.py), or drop

# pmserve export: ExportOptions
EXPORT_DTYPE = "fp32"
EXPORT_OPSET = 17
EXPORT_OPTIMIZE: bool | None = None  # None: fusions for fp16 (GPU) bundles only; on CPUs they measured slower
EXPORT_QUANTIZE: str | None = None  # None, int8 (dynamic), int4 (weight-only MatMulNBits; decoders only)
# a decoder's graph: auto (genai where measured, else traced: decoder_export.choose_graph) | traced | genai
EXPORT_GRAPH = "auto"
EXPORT_BLOCK_SIZE = 32  # int4: weights per quantisation block (ONNX Runtime GenAI's builder uses 32 for CPUs)
EXPORT_DATA: str | None = None  # None: the source's own task sequence
EXPORT_MAX_LENGTH: int | None = None  # None: the source's (UNKNOWN_MAX_LENGTH when it has none)
EXPORT_BASE: str | None = None  # None: the base a delta or adapter's merge recorded
EXPORT_SCORES: str | None = None  # None: softmax for a single-label head of the model's own, else logits
EXPORT_POOLING: str | None = (
    None  # None: an encoder's sentence-transformers files, else mean (text) / cls (images)
)
EXPORT_NORMALIZE: bool | None = None  # None: the sentence-transformers files (a Normalize module), else no

# pmserve serve: ServeConfig, and the address serve() listens on
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
SERVE_MAX_BATCH = 32
SERVE_MAX_WAIT_MS = 5.0
SERVE_BY_LENGTH = (
    True  # split a gathered batch into groups of similar token counts (serving.batcher.length_groups)
)
SERVE_MAX_INPUTS = 256
SERVE_MAX_TEXT_CHARS = 8192
SERVE_PROVIDER = "auto"
SERVE_THREADS = 0  # 0: ONNX Runtime's default, one per core
SERVE_DRAIN_S = 30.0
SERVE_POLL_S = 2.0  # --repository: seconds between looks for new versions; 0: never look
SERVE_MAX_IMAGE_PIXELS = 25_000_000  # one image's width x height, read from its header before it is decoded
SERVE_MAX_IMAGE_BYTES = 2 << 20  # one encoded image; an image model's infer body is --max-inputs of them
SERVE_BODY_TIMEOUT_S = 30.0  # a request body must arrive whole within this (slow clients hold memory)
SERVE_LOAD_TIMEOUT_S = 300.0  # --repository: a candidate version's check in a child process
SERVE_API_KEY = None  # no key: inference is open to whoever reaches the port (README, the threat model)
SERVE_MAX_PROMPT_TOKENS = 4096  # a decoder's prompt, in tokens (400 past it)
SERVE_MAX_NEW_TOKENS = 1024  # the most a generation request may ask for (400 past it)
SERVE_MAX_SEQUENCES = 32  # a decoder's sequences running at once, queued or decoding (429 past it)
SERVE_ADMIN_KEY = None  # no key: load and unload only when the server listens on loopback

# pmserve bench: BenchConfig
BENCH_BATCH_SIZES = (1, 8, 32)
BENCH_SEQ_LENS = (16, 64, 128)
BENCH_WARMUP = 5
BENCH_RUNS = 30
BENCH_BLOCK = 10  # timed calls of one backend in a row (after one untimed call), backends alternated by block
BENCH_PROVIDER = "cpu"
BENCH_THREADS = 0  # 0: PyTorch's default
BENCH_BACKENDS = ("onnxruntime", "torch-merged", "torch-base", "peft-unmerged")  # all of bench.BACKENDS
BENCH_SEED = 0
BENCH_ALSO = ""  # no other bundles timed beside the one given
BENCH_NEW_TOKENS = 128  # a decoder bundle: tokens generated after each prompt (its length: --seq-lens)

# pmserve generate: generation.SamplingParams (and the CLI's --chat)
GENERATE_MAX_NEW_TOKENS = 128
GENERATE_TEMPERATURE = 0.0  # 0: greedy, the deterministic answer a user expects from a plain command
GENERATE_TOP_P = 1.0
GENERATE_TOP_K = 0  # 0: no limit
GENERATE_SEED: int | None = None  # None: fresh entropy
GENERATE_STOP: tuple[str, ...] = ()
GENERATE_CHAT = False
GENERATE_PROVIDER = "cpu"

# pmserve predict / eval (pmserve.predict.predict and evaluate)
PREDICT_PROVIDER = "auto"
PREDICT_TOP_K = 1
PREDICT_BATCH_SIZE = 64
