"""The launchers' configuration in one place: typed settings per concern, TOML presets, absl flags.

Each concern is a frozen dataclass whose fields carry their help text (and choices / bounds):
`ModelSettings` (weights, adapter, head), `CatalogSettings` (items and histories, prompt length),
`MeshSettings` (devices, item placement, cache dtype, multi-host), `EngineSettings` (prefill mode,
cache budgets, snapshot), `ServingSettings` (HTTP, admission, warm-up), `BenchSettings` (the
ranking benchmark's workload), `TrainSettings` (the served ranker's training schedule) and
`FineTuneSettings` (label fine-tuning of the model). A launcher calls
`define_flags(ModelSettings, ...)` at import (one absl flag per field, named after it, plus
`--config`), and `read(ModelSettings, ...)` in `main`: the `--config` TOML preset is applied first
(`[model]`, `[catalog]`, `[mesh]`, `[engine]`, `[serving]`, `[bench]`, `[train]` sections, keys =
field names), flags given
on the command line win over it, and the settings come back typed. The library takes the dataclasses
(`recommender.open_served(model=ModelSettings(...), ...)`), so a program sets the same fields a
command line does. Importing this module starts no JAX backend (`--mesh` may still have to set
the device count).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from absl import app, flags

from rcllm_jax.data.movielens import NEGATIVES
from rcllm_jax.data.prompt import SERVED_HEAD, SERVED_HISTORY_LEN
from rcllm_jax.data.slices import SLICES
from rcllm_jax.parallel.placement import PLACEMENTS
from rcllm_jax.retrieval import CANDIDATE_FEATURES, FEATURES
from rcllm_jax.serve.scheduler import SCHEDULERS, SERVING_STEPS


def _opt(default, help: str, *, choices=None, lower=None, upper=None, flag_type=None):
    """A settings field: its default, its help text, optional choices and bounds of its flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "lower": lower,
                                                        "upper": upper, "flag_type": flag_type})


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The model that ranks and how it scores candidates."""
    SECTION: typing.ClassVar[str] = "model"
    model: str | None = _opt(None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct).")
    adapter: str | None = _opt(None, "LoRA adapter directory for --model (<train output_dir>/adapter).")
    dtype: str = _opt("float32", "Compute dtype.", choices=("float32", "bfloat16"))
    head: str = _opt(SERVED_HEAD, "How candidates are scored: score slots read by a trained head (--ranking_head; "
                     "default: the head shipped for the default model), or the answer's label logits (any model, "
                     "no head).", choices=("label", "slot"))
    ranking_head: str | None = _opt(None, "Slot-head directory (default with --head=slot: the shipped "
                                    "rcllm_jax/assets/slot_head, trained for the default model).")
    random_weights: bool = _opt(False, "Timing only: --model's config and tokenizer with seeded random weights "
                                "(a HF directory needs no safetensors; rankings mean nothing; use --head=label).")


@dataclasses.dataclass(frozen=True)
class CatalogSettings:
    """The items and user histories, and how much of a history a prompt holds."""
    SECTION: typing.ClassVar[str] = "catalog"
    catalog: str | None = _opt(None, "Catalog directory: items.jsonl|csv|parquet (an id column and text fields), "
                               "interactions.csv|parquet or a RecBole .inter file (user, item, timestamp) and "
                               "catalog.toml (item_template, ...; docs/launchers.md). Replaces --dataset.")
    dataset: str = _opt("ml-100k", "Catalog and user histories.", choices=("ml-100k", "ml-1m"))
    data_dir: str | None = _opt(None, "Directory with the dataset files (default: fetch ml-100k).")
    history_len: int = _opt(SERVED_HISTORY_LEN, "History items in a prompt (the most recent).")
    max_items: int = _opt(0, "Only the first N catalog items (0 = all; smoke tests).")
    min_interactions: int = _opt(1, "Keep only the items, then the users, with at least this many interactions (5: "
                                 "LlamaRec's ML-100k protocol, 943 users and 1349 items).", lower=1)
    prompt: str | None = _opt(None, "Prompt template preset: a TOML [prompt] table of block texts (configs/prompts/; "
                              "default: the built-in one, configs/prompts/movielens.toml, which the shipped head "
                              "was trained on; a slot head refuses another).")

    def __post_init__(self):
        if self.prompt is not None:
            from rcllm_jax.data.prompt_template import load_template
            load_template(self.prompt)  # a preset that cannot be used is refused before anything loads


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """The devices, how item caches are laid out over them, and the multi-host job."""
    SECTION: typing.ClassVar[str] = "mesh"
    mesh: str = _opt("items:1", "Device mesh: items:N[,model:M] (item caches sharded over items).")
    placement: str = _opt("coaccess", "Item block placement over the items axis: coaccess (METIS partition of the "
                          "retriever's item co-access graph), similarity (balanced k-means of the model's item "
                          "embeddings) or hash (baseline).", choices=tuple(PLACEMENTS))
    replicate: float = _opt(0.1, "Hot-item replication: up to this fraction of a shard's item tokens more per shard "
                            "for the items requests would fetch remotely most (held by every shard; 0 = off).",
                            lower=0.0, upper=1.0)
    kv_dtype: str = _opt("bfloat16", "How the item and glue caches hold KV (read back into the model's dtype per "
                         "request): bfloat16 halves their memory and the bytes moved between shards; int8 (a "
                         "scale per token and KV head) about quarters them.",
                         choices=("bfloat16", "float32", "int8"))
    coordinator_address: str | None = _opt(None, "Multi-host: host:port of process 0 (with --num_processes and "
                                           "--process_id; omit for one process).")
    num_processes: int = _opt(1, "Multi-host: number of processes.")
    process_id: int = _opt(0, "Multi-host: this process's index.")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """The prefill mode, the engine's cache budgets and the item-cache snapshot."""
    SECTION: typing.ClassVar[str] = "engine"
    mode: str = _opt("rcllm", "Prefill mode: rcllm, stitch, sink, deviation, full, prefix, prefix_warm.")
    max_candidates: int = _opt(52, "Most candidates per request (52: single-token labels).")
    user_cache_mb: float = _opt(2048.0, "User-store budget per device in MB (it is replicated on every device): "
                                "2048 MB hold ~120 users' prefixes at history 20 for the default model (~375 "
                                "tokens, 17 MB each in f32).")
    user_cache_pages: int = _opt(0, "User-store budget in 16-token pages (overrides --user_cache_mb).")
    prefix_cache_pages: int = _opt(1, "Prefix-cache budget in 16-token pages (the prefix modes get at least the "
                                   "user store's).")
    snapshot_dir: str | None = _opt(None, "Item-cache snapshot (default: <cache>/snapshots/<model "
                                    "fingerprint>-<dataset>); built and saved there when absent.")
    rebuild_on_damage: bool | None = _opt(None, "When no step of the item-cache snapshot is intact, rebuild it "
                                          "(default: yes at the default location, no for --snapshot_dir).",
                                          flag_type=bool)
    calibration_requests: int = _opt(16, "rcllm's policy is calibrated for the model, head and prompt in use on this "
                                     "many sampled requests (the cheapest policy meeting top-1 >= 0.95, Kendall tau "
                                     ">= 0.9, KL <= 0.01 vs full prefill; saved with the snapshot and reused); 0: the "
                                     "built-in default policy.", lower=0)
    calibration_candidates: int = _opt(20, "Candidates per calibration request (the retriever's top-K, as a "
                                       "request without candidates gets).", lower=1)


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """The HTTP server: address, admission, batching, warm-up, state."""
    SECTION: typing.ClassVar[str] = "serving"
    host: str = _opt("127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
    port: int = _opt(8000, "Port (0: any free port; the log says which).")
    users_dir: str | None = _opt(None, "User-store KV snapshot (default: <snapshot_dir>-users).")
    state_db: str | None = _opt(None, "State database (user histories, event log): a SQLite file (default: "
                                "<users_dir>-state.sqlite3), or postgresql://... shared by several server replicas "
                                "(pip install 'rcllm-jax[postgres]').")
    max_history: int = _opt(1000, "Items a stored history keeps at most (the most recent; the event log keeps "
                            "every event).")
    num_candidates: int = _opt(20, "Candidates the retriever proposes for a request that sends none (its "
                               "num_candidates field overrides).")
    scheduler: str = _opt("affinity", "Shard assignment policy.", choices=tuple(SCHEDULERS))
    max_queue: int = _opt(0, "Requests waiting at most (beyond: 503 + Retry-After); 0: sized from the returning "
                          "users' service time measured in the warm-up and --latency_target_s "
                          "(--adapt_queue_bound: then from the traffic's), and bounded by cost too: at most half "
                          "the target of estimated engine time waiting (the other half: the window in flight), a "
                          "new user's request (its history prefix to compute) costing what the warm-up measured.")
    latency_target_s: float = _opt(5.0, "Queueing a request may add at most (sizes --max_queue=0).")
    adapt_queue_bound: bool = _opt(False, "With --max_queue=0: keep resizing the bound from the service time "
                                   "measured on the traffic (a moving average), not only from the warm-up's. Off by "
                                   "default: after a phase of new users it shrank to 1 and cost returning users "
                                   "503s (BENCHMARKS.md, serving state).")
    window: int = _opt(32, "Requests per scheduling window (at most half the bound when the bound is sized from "
                       "--latency_target_s).")
    serving_step: str = _opt("auto", "batched: block-mode requests of a scheduling window run as serving steps, "
                             "each shard's requests one batch, every shard in one program (Engine.rank_step); "
                             "serial: one request at a time; auto: serial on CPU devices (they share the host's "
                             "cores: a step's padding is real work there; BENCHMARKS.md), batched on GPU / TPU "
                             "(unmeasured).", choices=("auto", *SERVING_STEPS))
    max_batch: int = _opt(8, "Requests per shard in one serving step at most (batched).")
    request_timeout_s: float = _opt(30.0, "A request not answered after this long gets 503 + Retry-After and is "
                                    "dropped, not computed.")
    max_body_bytes: int = _opt(64 * 1024, "Larger request bodies get 413.")
    max_connections: int = _opt(1024, "Open connections at most (beyond: 503).")
    max_client_connections: int = _opt(256, "Open connections one client address may hold (beyond: 503 + "
                                       "Retry-After).")
    shutdown_grace_s: float = _opt(5.0, "On SIGTERM, open connections get this long after the queue is answered "
                                   "and the user store saved; then they are closed.")
    warmup: bool = _opt(True, "Compile before serving: in the block modes every request shape the server accepts "
                        "(--history_len, --max_candidates, the served items; Engine.warm_up), on every shard; in "
                        "the baselines typical requests' shapes.")
    warmup_prompts: int = _opt(6, "Prompts shaped like traffic (distinct history-length buckets) timed in the "
                               "warm-up (the service time that sizes --max_queue; the baselines' warm-up).")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The ranking benchmark's workload and rows (`rcllm_jax.eval.ranking_bench`, launch/bench.py)."""
    SECTION: typing.ClassVar[str] = "bench"
    modes: tuple[str, ...] = _opt(("full",), "Prefill modes: full, prefix, prefix_warm (prefix caching with the "
                                  "user's instruction + history pages computed at event time), stitch, sink, "
                                  "deviation, rcllm.")
    num_users: int = _opt(100, "Users in the stream.")
    requests: str | None = _opt(None, "Replay a request log instead of MovieLens test requests: JSON lines "
                                "{user_id, history, candidates[, target][, arrival_s]} (README); accuracy over the "
                                "lines with a target, open-loop response times from arrival_s.")
    requests_per_user: int = _opt(1, "Requests per user (histories grow between them).")
    num_candidates: int = _opt(20, "Candidates per request (held-out item + negatives, or the retriever's top-K).")
    candidates: str = _opt("sampled", "sampled: the target + --negatives; retrieved: an item-kNN retriever's top-K "
                           "from the whole catalog (the target may be missing: a miss), evaluated the LlamaRec way.",
                           choices=("sampled", "retrieved"))
    rank_retrieved_only: bool = _opt(False, "With --candidates=retrieved: run the modes only on the requests whose "
                                     "target was retrieved. The others are misses whatever the model does, so the "
                                     "all-user metrics are unchanged; TTFT and fidelity then describe those requests "
                                     "only (for accuracy runs over many users).")
    candidate_order: str = _opt("shuffled", "Prompt order of retrieved candidates: seeded shuffle or the "
                                "retriever's order.", choices=("shuffled", "retriever"))
    negatives: str = _opt("uniform", "Negative sampling (retrieval: genre-matched, like a retrieval stage).",
                          choices=tuple(NEGATIVES))
    stage: str = _opt("test", "Leave-one-out target (1 request/user).", choices=("test", "valid"))
    test_positions: str | None = _opt(None, "Evaluate the targets held back at these positions from the end of each "
                                      "sequence ('1-3' or '1,2'; 1 = the last item) instead of --stage: one request "
                                      "per user and position, candidates from a retriever fitted strictly before "
                                      "that position (retrieval.fit_before), intervals resampling users. A head "
                                      "must have been validated above them (its card's validation_position).")
    slice: str | None = _opt(None, "With --test_positions and --candidates=retrieved: only the requests of one "
                             "cold-start slice (data/slices.py: new items and new users left out of every fit, "
                             "few-interaction targets, warm) or all of them; retrievers fitted without the cold "
                             "items and users.", choices=SLICES)
    seed: int = _opt(0, "Seed of user order, negatives and tie-breaking.")
    canonical: str | None = _opt(None, "Context item blocks are encoded after: the instruction + the glue before a "
                                 "first candidate, or the instruction alone (default: the engine's, candidate).",
                                 choices=("candidate", "instruction"))
    sink: int | None = _opt(None, "Override: first tokens of each block recomputed (sink, rcllm).", flag_type=int)
    ratio: float | None = _opt(None, "Override: deviation recompute ratio (deviation, rcllm).", flag_type=float)
    check_layer: int | None = _opt(None, "Override: deviation check layer.", flag_type=int)
    cached_glue: bool = _opt(False, "Block modes serve label/question glue from the block store.")
    calibration_requests: int = _opt(16, "rcllm's policy is calibrated for the model, head and prompt on this many "
                                     "requests of users outside the measured ones (engine/calibration.py; reused from "
                                     "--snapshot_dir when saved there); 0, or --sink / --ratio / --check_layer / "
                                     "--cached_glue given: the built-in policy with those overrides.", lower=0)
    sweep: tuple[str, ...] = _opt((), "Extra rows blend@r: sink (--sink, default 2) + deviation at ratio r (check "
                                  "layer --check_layer, default 1), glue as --cached_glue says.")
    prefix_cache_pages: int = _opt(4096, "Prefix-cache budget in 16-token pages.")
    user_cache_pages: int = _opt(2048, "User-store budget in 16-token pages.")
    attention_impl: str = _opt("auto", "Kernels of the block modes: Pallas where they compile (auto), always "
                               "(pallas; interpreted on CPU), or the XLA reference.", choices=("auto", "pallas", "xla"))
    compare_impl: bool = _opt(False, "Also run every block mode through the other kernel implementation (rows "
                              "'mode@pallas' / 'mode@xla'): kernel vs XLA path in one run.")
    warmup: bool = _opt(True, "Run each mode's stream once before timing it (compiles every shape). --nowarmup "
                        "halves an accuracy run; TTFT then includes compiles (compiles_during_timing says how many).")
    snapshot_dir: str | None = _opt(None, "Restore the item store from this snapshot (launch/build_cache.py) instead "
                                    "of building it; blocks it lacks are built.")
    peers: tuple[str, ...] = _opt(("transformers",), "External peers in the same run: transformers (rows hf_full, "
                                  "hf_prefix: same weights and prompts on CPU torch); --peers= for none.")
    scheduler: str = _opt("affinity", "Which items-shard serves a block-mode request on a mesh: the one holding most "
                          "of its item bytes, or request i -> i mod N.", choices=tuple(SCHEDULERS))
    arrival_rate: float = _opt(0.0, "Open-loop arrivals (requests/s, Poisson, seeded): rows add response_p50/p99_s = "
                               "queueing + history update + TTFT of one engine serving the stream in arrival order "
                               "(simulated from the measured service times). 0: back to back.")
    plots_dir: str | None = _opt(None, "Where the PNG plots go (default: <output_json without .json>_plots).")
    output_json: str = _opt("bench_out/bench.json", "Where to write the JSON.")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The served ranker's training schedule (launch/train.py; presets: configs/train_*.toml)."""
    SECTION: typing.ClassVar[str] = "train"
    output_dir: str = _opt("runs/ranker", "Where prefixes, states, checkpoints, heads and the log go.")
    positions: tuple[str, ...] = _opt(("4", "3"), "Stage 1: held-back positions from the end of each sequence "
                                      "(each > --validation_position).")
    validation_position: int = _opt(2, "Held-back position of the validation targets (2: the leave-one-out one); "
                                    "the positions below it are the test positions (bench.py --test_positions), "
                                    "those above it the training ones.")
    num_candidates: int = _opt(20, "Retrieved candidates per prompt.")
    history_len: int = _opt(SERVED_HISTORY_LEN, "History items in the prompt (what the head is trained for).")
    candidate_order: str = _opt("retriever", "Prompt order of the candidates (the head's position feature reads "
                                "it).", choices=("retriever", "shuffled"))
    collaborative: bool = _opt(True, "Stage 0: the head adds to a collaborative scorer over the retriever's "
                               "features (kNN and follow scores), fitted first.")
    side_features: tuple[str, ...] = _opt(CANDIDATE_FEATURES, "Stage 0: the retriever's candidate features the "
                                          f"head weighs, among {', '.join(FEATURES)} (retrieval.py; the last two "
                                          "reach items without interactions).")
    collaborative_positions: str = _opt("3-20", "Stage 0: held-back positions (a range 'a-b' or a list) of the "
                                        "collaborative scorer's examples (no model pass needed).")
    l2: tuple[str, ...] = _opt(("1e-2", "1e-1", "1", "10"), "Stage 1: L2 strengths of the head (best validation "
                               "wins).")
    head_steps: int = _opt(300, "Stage 1: full-batch Adam steps per L2 strength.")
    steps: int = _opt(0, "Stage 2: optimizer steps of head + query adapter (0: none, the CPU default).")
    batch_size: int = _opt(4, "Stage 2: examples per step (gradients accumulated).")
    lr: float = _opt(1e-3, "Stage 2: peak learning rate (AdamW, warm-up, cosine decay to 10%).")
    warmup: int = _opt(20, "Stage 2: warm-up steps.")
    lora_rank: int = _opt(8, "Query adapter: LoRA rank.")
    lora_alpha: float = _opt(16.0, "Query adapter: LoRA alpha (scale = alpha / rank).")
    lora_targets: tuple[str, ...] = _opt(("wq", "wk", "wv", "wo"), "Query adapter: adapted projections.")
    first_layer: int = _opt(0, "Query adapter: layers first_layer.. carry it (the gradient runs through those only).")
    val_examples: int = _opt(0, "Validation examples used (0 = every retrieved one).")
    val_every: int = _opt(40, "Stage 2: steps between validation runs.")
    checkpoint_every: int = _opt(25, "Stage 2: steps between Orbax checkpoints.")
    seed: int = _opt(0, "Seed of the data order and the adapter's initialisation.")
    max_users: int = _opt(0, "Use only the first N users (0 = all; smoke tests).")
    cold_split: bool = _opt(False, "Train without the cold-start slices' new items and new users "
                            "(data/slices.py): a head that bench.py --slice can measure on them honestly.")
    cold_dropout: float = _opt(0.0, "Share of the stage 0 / 1 examples whose candidates' collaborative features "
                               "are dropped (each with probability 0.5: as a cold item's), so the head learns to "
                               "rank from the slot states where those features are missing; the L2 is chosen on "
                               "the mean of clean and dropped validation (train/head_fit.drop_features).",
                               lower=0.0, upper=1.0)


@dataclasses.dataclass(frozen=True)
class FineTuneSettings:
    """The label fine-tuning schedule of the whole model (launch/train_label.py, `train.trainer.Trainer`;
    presets: configs/label_*.toml). Its fields are the training run's identity: a checkpoint is resumed
    only under the same values."""
    SECTION: typing.ClassVar[str] = "train"
    steps: int = _opt(250, "Optimizer steps.")
    batch_size: int = _opt(4, "Examples per optimizer step.")
    micro_batch: int = _opt(2, "Examples per forward/backward (batch_size / micro_batch accumulated).")
    lr: float = _opt(1e-3, "Peak learning rate (AdamW, linear warm-up, cosine decay to 10%).")
    warmup: int = _opt(20, "Warm-up steps.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    lora_rank: int = _opt(16, "LoRA rank; 0 = full fine-tuning of the trained layers.")
    lora_alpha: float = _opt(32.0, "LoRA alpha (scale = alpha / rank).")
    train_layers: int = _opt(8, "Top layers trained (0 = all); the rest stay frozen.")
    history_len: int = _opt(SERVED_HISTORY_LEN, "History items in the prompt.")
    num_candidates: int = _opt(20, "Candidates per prompt (<= 52: single-token labels).", upper=52)
    negatives: str = _opt("uniform", "Negative sampling (retrieval: genre-matched, like a retrieval stage).",
                          choices=tuple(NEGATIVES))
    max_len: int = _opt(832, "Padded prompt length (longer histories are shortened).")
    min_history: int = _opt(3, "Shortest history a training example may have.")
    block_attention_prob: float = _opt(0.0, "Probability that an example uses the engine's stitched attention.",
                                       lower=0.0, upper=1.0)
    block_glue: str = _opt("mixed", "Block-aware examples: glue computed fresh, cached like items, or either.",
                           choices=("fresh", "cached", "mixed"))
    teacher_weight: float = _opt(0.0, "Weight of a soft target over the candidates from training-split popularity "
                                 "(dense signal for short schedules); 0 = the label's cross-entropy only.")
    teacher_temperature: float = _opt(2.0, "Teacher: p ~ (1 + count)^(1/temperature).")
    seed: int = _opt(0, "Seed of data order, negatives and initialisation.")
    checkpoint_every: int = _opt(50, "Steps between Orbax checkpoints (0 = none).")
    keep_checkpoints: int = _opt(2, "Orbax checkpoints kept.", lower=1)
    val_every: int = _opt(100, "Steps between validation runs (0 = never).")
    val_users: int = _opt(64, "Users in each validation run.")

    def __post_init__(self):
        if self.batch_size % self.micro_batch:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of micro_batch={self.micro_batch}")
        if self.num_candidates > 52:
            raise ValueError("training uses single-token labels: at most 52 candidates")


SETTINGS = (ModelSettings, CatalogSettings, MeshSettings, EngineSettings, ServingSettings, BenchSettings,
            TrainSettings, FineTuneSettings)


def _base_type(hint):
    """int for `int`, str for `str | None`, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_DEFINED: set[tuple] = set()  # (settings class, field, FlagValues): the fields `define_flags` made flags


def define_flags(*classes, exclude: tuple[str, ...] = (), flag_values=flags.FLAGS, **defaults) -> None:
    """One absl flag per field of `classes` (named after the field; `defaults` overrides a field's
    default for this launcher, `exclude` leaves fields out), and `--config` (a TOML preset) once."""
    unknown = set(defaults) - {f.name for c in classes for f in dataclasses.fields(c)}
    if unknown:
        raise ValueError(f"defaults for no field: {sorted(unknown)}")
    fv = flag_values
    if "config" not in fv:
        flags.DEFINE_string("config", None, "TOML preset: [model], [catalog], [mesh], [engine], [serving], [bench], "
                            "[train] sections (keys = flag names); flags given on the command line win.",
                            flag_values=fv)
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            m, default = f.metadata, defaults.get(f.name, f.default)
            _DEFINED.add((cls, f.name, fv))
            kind = m["flag_type"] or _base_type(hints[f.name])
            if m["choices"]:
                flags.DEFINE_enum(f.name, default, list(m["choices"]), m["help"], flag_values=fv)
            elif typing.get_origin(hints[f.name]) is tuple:
                flags.DEFINE_list(f.name, list(default), m["help"], flag_values=fv)
            elif kind is bool:
                flags.DEFINE_bool(f.name, default, m["help"], flag_values=fv)
            elif kind is int:
                flags.DEFINE_integer(f.name, default, m["help"], lower_bound=m["lower"], upper_bound=m["upper"],
                                     flag_values=fv)
            elif kind is float:
                flags.DEFINE_float(f.name, default, m["help"], lower_bound=m["lower"], upper_bound=m["upper"],
                                   flag_values=fv)
            elif kind is str:
                flags.DEFINE_string(f.name, default, m["help"], flag_values=fv)
            else:
                raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {hints[f.name]}")


def preset_keys(*classes, flag_values=flags.FLAGS) -> dict[str, str]:
    """`section.key` -> flag name for the fields of `classes` that `define_flags` made flags."""
    return {f"{c.SECTION}.{f.name}": f.name for c in classes for f in dataclasses.fields(c)
            if (c, f.name, flag_values) in _DEFINED}


def apply_preset(path: str | Path, allowed: dict[str, str], flag_values=flags.FLAGS) -> dict[str, Any]:
    """Set absl flags from a TOML preset unless given on the command line.

    `allowed` maps `section.key` -> flag name; an unknown key is an error naming the file and the
    known keys (a typo must not pass silently). Returns the values applied."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"preset {path}: {e}") from None
    applied = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in values.items():
            name = allowed.get(f"{section}.{key}")
            if name is None:
                raise ValueError(f"{path}: unknown key {section}.{key}; known: {', '.join(sorted(allowed))}")
            fl = flag_values[name]
            if not fl.present:  # the command line wins
                try:
                    fl.value = fl.parser.parse(value)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}: {section}.{key} = {value!r}: {e}") from None
                applied[name] = fl.value
    return applied


def _typed(value):
    return tuple(value) if isinstance(value, list) else value  # list flags -> the dataclasses' tuples


_APPLIED: set[tuple] = set()  # (preset, FlagValues) applied (a second `read` must not apply it again)


def read(*classes, flag_values=flags.FLAGS):
    """The settings of `classes` from the flags, after applying `--config` (once per process):
    one instance per class, in order (a single instance for a single class)."""
    fv = flag_values
    path = fv["config"].value if "config" in fv else None
    if path and (path, fv) not in _APPLIED:
        try:
            apply_preset(path, preset_keys(*SETTINGS, flag_values=fv), fv)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        _APPLIED.add((path, fv))
    try:
        out = tuple(cls(**{f.name: _typed(fv[f.name].value) for f in dataclasses.fields(cls)
                           if (cls, f.name, fv) in _DEFINED}) for cls in classes)
    except ValueError as e:  # a combination of values a settings class refuses
        raise app.UsageError(str(e)) from None
    return out[0] if len(out) == 1 else out
