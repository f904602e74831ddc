"""Layered configuration: command-line flags > ``REFUSALSCOPE_*`` environment variables > TOML file > defaults.

Each command's options are one pydantic-settings class; field descriptions double as ``--help`` text. A TOML file
may set options at its top level or in a table named after the command (``[direction]``, ``[asr]``), the table
winning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict, SettingsError

from refusalscope.errors import RefusalScopeError
from refusalscope.lm.registry import DEFAULT_MODEL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class CommandSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFUSALSCOPE_", extra="forbid", env_parse_none_str="none",
                                      env_nested_delimiter="__")
    _toml: ClassVar[dict] = {}  # the TOML layer of the settings being resolved

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=cls._toml)


class ModelOptions(CommandSettings):
    device: str = Field("auto", description="torch device: auto (CUDA if present), cpu, cuda, cuda:1")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")
    chat_template: str | None = Field(None, description="Jinja chat template (file or string) for models without one")


def share_prefix_help(parts: str) -> str:
    """The help of a step's ``share_prefix`` option (``lm.shared_prefix``), naming the parts of the step it speeds."""
    return (f"{parts}: run the chat template's prefix once per batch and only each prompt's own tokens after its "
            "key/value cache (same values up to float rounding); off: the plain forward")


class DirectionOptions(BaseModel):
    """Options of the refusal-direction step (Arditi et al.; paper appendix), shared by ``direction`` and ``run``."""

    model_config = ConfigDict(extra="forbid")

    harmful_train: str = Field("harmful_train", description="harmful prompts for the mean difference")
    harmless_train: str = Field("harmless_train", description="harmless prompts for the mean difference")
    harmful_val: str = Field("harmful_val", description="held-out harmful prompts for layer selection")
    harmless_val: str = Field("harmless_val", description="held-out harmless prompts for the KL/steer filters")
    n_train: int = Field(128, ge=1, description="prompts taken from each training set")
    n_val: int = Field(32, ge=1, description="prompts taken from each validation set")
    positions: Literal["last", "post-instruction"] = Field(
        "last", description="candidate positions: the last token, or every post-instruction template token")
    layers: str | None = Field(None, description="candidate layers, e.g. '4-20' or '10,12,19' (default: all)")
    filters: list[Literal["kl", "steer", "prune"]] = Field(
        default_factory=list, description="refusal_direction's filters: kl, steer, prune (comma-separated)")
    kl_threshold: float = Field(0.1, description="kl filter: max KL on harmless prompts under ablation")
    steer_threshold: float = Field(0.0, description="steer filter: min refusal log-odds of harmless + direction")
    prune_fraction: float = Field(0.2, ge=0, lt=1, description="prune filter: drop this last fraction of layers")
    asr_candidates: int = Field(3, ge=1, description="best-scoring layers whose held-out ASR is measured")
    max_new_tokens: int = Field(48, ge=1, description="tokens generated for the ASR of each candidate")
    allow_overlap: bool = Field(False, description="allow train and validation prompts to overlap")
    seed: int = Field(0, description="random seed")
    share_prefix: bool = Field(True, description=share_prefix_help("mean activations and candidate scoring"))


class DirectionSettings(ModelOptions, DirectionOptions):
    """Refusal direction: difference of means, layer selection by held-out ASR (Arditi et al.; paper appendix)."""

    model: str = Field(DEFAULT_MODEL, description="registry alias, hub id, local directory or .gguf file")
    out: Path = Field(..., description="run directory to write into")
    data_dir: str | None = Field(None, description="directory of the standard prompt sets (or REFUSALSCOPE_DATA)")


class AsrSettings(ModelOptions):
    """Attack success rate of the run's model on a prompt file, with or without an intervention."""

    run: Path = Field(..., description="run directory written by 'refusalscope direction'")
    prompts: str = Field(..., description="prompt file (.txt, .csv, .json, .jsonl) or a dataset name")
    column: str | None = Field(None, description="column holding the prompts (default: guessed)")
    intervention: Literal["none", "ablate-direction", "add-direction"] = Field(
        "none", description="none, ablate-direction (project r̂ out everywhere), add-direction (+λ r̂ at l*)")
    coeff: float | None = Field(None, description="λ for add-direction (default: the norm of the mean difference)")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per prompt")
    judge: str = Field("substring", description="substring, compliance, classifier:<hub id or path> or llm:<URL>")
    overlap: Literal["drop", "error", "allow"] = Field(
        "drop", description="prompts the run trained or selected on: drop them, refuse, or allow")
    data_dir: str | None = Field(None, description="data directory for dataset names (default: the run's)")
    json_output: bool = Field(False, description="print one final JSON line {n, asr, refusal_rate, degenerate_rate}",
                              json_schema_extra={"flag": "--json"})


class _RunOptions(ModelOptions):
    run: Path = Field(..., description="run directory (its run.json names the model)")
    data_dir: str | None = Field(None, description="data directory for dataset names (default: the run's)")


class SaeTrainOptions(BaseModel):
    """Options of SAE training (TopK SAEs in SAELens format), shared by ``sae train`` and ``run``."""

    model_config = ConfigDict(extra="forbid")

    layers: str | None = Field(None, description="layers, e.g. '2-19' (default: 2..l* of the run's direction)")
    stride: int = Field(1, ge=1, description="train every stride-th of those layers (l* is always included)")
    width: int = Field(4096, ge=16, description="latents per SAE (default ≥ 4 × d_model for the default model)")
    k: int = Field(64, ge=1, description="active latents per token (TopK)")
    epochs: int = Field(4, ge=1, description="passes over the collected activations")
    train_batch_size: int = Field(1024, ge=1, description="tokens per optimiser step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    corpus: list[str] = Field(default_factory=lambda: ["harmless_train", "harmless_val", "harmful_train"],
                              description="prompt sets the SAEs are trained on (never the evaluation prompts)")
    max_prompts: int | None = Field(None, ge=1, description="use at most this many corpus prompts")
    replies: int = Field(0, ge=0, description="append the model's own reply of up to N tokens to each prompt")
    norm_factor: float = Field(4.0, gt=1, description="tokens above this × median norm (attention sinks) are "
                               "outside the SAE's domain")
    eval_sets: list[str] = Field(default_factory=lambda: ["harmless_test", "harmful_val"],
                                 description="held-out prompt sets for the quality report")
    n_eval: int = Field(32, ge=1, description="held-out prompts for the quality report")
    seed: int = Field(0, description="random seed")
    share_prefix: bool = Field(True, description=share_prefix_help("activations and quality report"))


class SaeTrainSettings(_RunOptions, SaeTrainOptions):
    """Train TopK SAEs (SAELens format) on the run model's residual stream, or reuse cached ones."""

    json_output: bool = Field(False, description="print one final JSON line with the per-layer report",
                              json_schema_extra={"flag": "--json"})


class SaeEvalSettings(_RunOptions):
    """Report SAE quality on held-out chat text: FVU, L0, dead latents, CE-loss increase (reconstruction spliced in)."""

    eval_sets: list[str] = Field(default_factory=lambda: ["harmless_test", "harmful_val"],
                                 description="held-out prompt sets")
    n_eval: int = Field(32, ge=1, description="held-out prompts")
    share_prefix: bool = Field(True, description=share_prefix_help("activations and quality report"))
    json_output: bool = Field(False, description='print one final JSON line: [{"layer", "fvu", "l0", "dead_frac", '
                              '"ce_increase"}, ...]', json_schema_extra={"flag": "--json"})


class Stage3Options(BaseModel):
    """Stage 3 (paper, "Stage 3: Discovering feature interactions"): a factorization machine on SAE activations,
    features ranked by FM-embedding cosine to each prompt's Stage-2 set and ablated top-K; a linear probe as the
    baseline."""

    model_config = ConfigDict(extra="forbid")

    harmful: str = Field("advbench", description="label-1 prompts of the FM dataset (paper: all 520 AdvBench)")
    harmless: str = Field("alpaca", description="label-0 prompt pool; as many as harmful are sampled with the seed")
    first_layer: int = Field(2, ge=0, description="lowest SAE layer in the FM's inputs (paper: layers 2..l*)")
    n_positions: int = Field(4, ge=1, description="last prompt positions encoded (paper: the last 4 tokens)")
    positions: Literal["auto", "max", "positions"] = Field(
        "auto", description="how positions become columns: max over them, one column per position, or auto "
        "(train both, keep the better validation accuracy; the paper does not say)")
    scale: Literal["column-max", "none"] = Field(
        "column-max", description="input scaling: divide each column by its largest training value (our choice: "
        "raw SAE activations of ~10 over thousands of columns saturate the FM's logits) or none")
    fm_k: int = Field(20, ge=1, description="FM embedding size (paper: 20; 5 and 50 in its ablation)")
    fm_lr: float = Field(1e-3, gt=0, description="FM Adam learning rate")
    fm_epochs: int = Field(20, ge=1, description="FM epochs (the best by validation accuracy is kept)")
    fm_batch_size: int = Field(64, ge=1, description="FM minibatch size")
    # our choice: max, since a redundant feature needs to pair with one Stage-2 feature, not all (paper: "cosine")
    score: Literal["max", "mean"] = Field(
        "max", description="a candidate's score: max or mean cosine to the prompt's active Stage-2 features")
    k_values: list[int] = Field(default_factory=lambda: list(range(100, 2001, 100)),
                                description="K swept for the FM ranking (smallest jailbreaking K is kept)")
    probe_k: list[int] = Field(default_factory=lambda: [100, 500, 1000, 2000],
                               description="K for the probe ranking; the FM is judged at the same K")
    # our choice: 5 K per batch with early stopping (the paper sweeps every K); set it to 20 for one batch
    k_chunk: int = Field(5, ge=1, description="K values of the sweep generated per batch (the sweep stops at "
                         "the first jailbreaking chunk)")
    seed: int = Field(0, description="seed of the harmless sample, the 80/10/10 split and the FM")
    fm_device: str = Field("auto", description="device of the FM training (auto: the model's)")


class RayOptions(BaseModel):
    """Scale-out: the per-prompt work (and the FM's activation pass) sharded over a Ray cluster."""

    # our choice: a bare --ray is "auto", Ray's own default (join the node's cluster, else start a local one)
    ray: str | None = Field(None, description="run the per-prompt work on Ray: a cluster address "
                            "(ray://head:10001), auto (this node's cluster, else a local one) or local (a new local "
                            "cluster); needs pip install 'refusalscope[ray]'",
                            json_schema_extra={"nargs": "?", "const": "auto", "metavar": "ADDRESS"})
    ray_workers: int | None = Field(None, ge=1, description="Ray workers (default: one per GPU of the cluster, one "
                                    "per CPU when it has none)")


class RunSettings(ModelOptions):
    """The pipeline on a prompt set: direction, SAEs, Stages 1 (decoder cosine), 2 (Algorithm 1) and 3 (FM).

    Every step the run directory lacks is done first; finished prompts are never recomputed (resumable).
    """

    model: str = Field(DEFAULT_MODEL, description="registry alias, hub id, local directory or .gguf file")
    out: Path = Field(..., description="run directory (created, or resumed if it exists)")
    prompts: str = Field("advbench", description="prompt file (.txt, .csv, .json, .jsonl) or a dataset name")
    column: str | None = Field(None, description="column holding the prompts (default: guessed)")
    data_dir: str | None = Field(None, description="directory of the standard prompt sets (or REFUSALSCOPE_DATA)")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts (after dropping training ones)")
    max_refused: int | None = Field(None, ge=1, description="run the stages on at most N baseline-refused prompts")
    stages: list[Literal["1", "2", "3"]] = Field(default_factory=lambda: ["1", "2"],
                                                 description="stages to run: 1,2 or 1,2,3")
    saes: str | None = Field(None, description="SAE set: registry name, saelens:RELEASE:ID, or a directory "
                             "(default: the model's registry set, else train them)")
    layers: str | None = Field(None, description="SAE layers the stages use (default: every SAE layer ≥ min-layer)")
    min_layer: int = Field(3, ge=0, description="lowest SAE layer used (the paper excludes layers 1–2)")
    k_step: int = Field(10, ge=1, description="Stage 1: K grows in steps of this")
    k_cap: int = Field(200, ge=1, description="Stage 1: largest K tried")
    # our choice: 5 K per batch with early stopping (the paper sweeps every K); set it to 20 for one batch
    k_chunk: int = Field(5, ge=1, description="Stage 1: K values generated per batch")
    block: int = Field(5, ge=1, description="Stage 2: block size N")
    tau: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                             description="Stage 2: thresholds τ")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Stage 2: seeds (keep features found "
                             "with all of them)")
    stage2_batch_size: int | None = Field(None, ge=1, description="Stage 2: ablated sets per forward "
                                          "(default: 64 on CPU, 1024 on a GPU)")
    stage2_skip: Literal["auto", "on", "off"] = Field(
        "auto", description="Stage 2: skip the forward of a chain step whose block did not fire in the previous "
        "set's forward (exact: same P); auto: on CPU without --shared-rows only")
    shared_rows: bool = Field(True, description="Stage 2 scoring: ablated sets that agree on the latents that "
                              "fired so far share one batch row (same P up to float rounding); off: one row per set")
    early_stop: bool = Field(False, description="stop each generation once the judge's verdict can no longer change "
                             "(a refusal phrase appeared): same verdicts, shorter stored completions")
    # our choice: auto (lm.compiled.choose_mode): compiled on a GPU for runs of many prompts, where it paid
    compile_generation: Literal["auto", "off", "inductor", "aot_eager"] = Field(  # lm.compiled.CompileSetting
        "auto", description="decode with a static key/value cache and a compiled step replayed as CUDA graphs "
        "(inductor, on a GPU; aot_eager: capture only, for tests); shapes are bucketed so compiled steps are reused; "
        "auto: inductor on a GPU when the run has at least --compile-min-prompts refused prompts and no TopK SAEs, "
        "else off")
    # our choice: off until a GPU measures it (benchmarks/gpu_checks.sh stage2); on 2 CPU cores it gained
    # 0.94-1.16x, within noise, since matmuls are 80 % of Stage 2's time there (RESULTS.md)
    compile_scoring: Literal["off", "inductor", "aot_eager"] = Field(  # lm.compiled.MODES
        "off", description="Stage-2 scoring forwards run compiled decoder layers (inductor fuses the element-wise "
        "work between matmuls; aot_eager: capture only, for tests); the same P up to float rounding; not when a "
        "scorer shares the key/value cache of a prefix no candidate touches")
    compile_min_prompts: int = Field(64, ge=0, description="auto compile: the fewest prompts per process (with "
                                     "--ray-workers N, the run's share of N) worth its one-time compile (minutes "
                                     "on a GPU)")  # lm.compiled.AUTO_MIN_PROMPTS
    sae_placement: Literal["auto", "device", "host"] = Field(
        "auto", description="where the stages' SAEs live: device (all on the model's device), host (CPU memory; "
        "only the columns a stage ablates, and one layer's encoder at a time, go to the device); auto: device "
        "unless they would not fit in the GPU's free memory")
    sae_dtype: Literal["auto", "float32", "bfloat16"] = Field(  # saes.placement.HOST_DTYPES
        "auto", description="the dtype the SAE set is held in in host memory: bfloat16 halves it (weights rounded "
        "once; SAE arithmetic stays float32); auto: float32 unless that would take over 70 percent of the available "
        "memory")
    prompt_batch: int | None = Field(None, ge=1, description="prompts whose stages run together, their completions "
                                     "generated in shared batches of prompt-batch × batch-size rows (default: 4); "
                                     "each prompt's results are those it gets alone, up to float rounding of batch "
                                     "shapes (a greedy near-tie may pick another token)")
    n_random: int = Field(1, ge=0, description="equal-size random active-feature control sets per prompt")
    max_new_tokens: int = Field(48, ge=1, description="tokens generated to judge a jailbreak")
    judge: str = Field("substring", description="substring, compliance, classifier:<hub id or path> or llm:<URL>")
    refusal_tokens: list[str] | None = Field(None, description="tokens whose probability is P(refusal) in Eq. 1 "
                                             "(default: the registry's, \"I\")")
    overlap: Literal["drop", "error", "allow"] = Field(
        "drop", description="prompts used to train the direction or SAEs: drop them, refuse, or allow")
    seed: int = Field(0, description="random seed (random controls)")
    direction: DirectionOptions = Field(default_factory=DirectionOptions,
                                        description="options of the direction step ([run.direction] in TOML)")
    sae_train: SaeTrainOptions = Field(default_factory=SaeTrainOptions,
                                       description="options of SAE training ([run.sae-train] in TOML)")
    stage3: Stage3Options = Field(default_factory=Stage3Options, description="Stage 3 options ([run.stage3])")
    ray: str | None = RayOptions.model_fields["ray"]
    ray_workers: int | None = RayOptions.model_fields["ray_workers"]


class InteractionSettings(_RunOptions, Stage3Options):
    """Stage 3 on a run that has Stages 1-2: FM and probe, ranked ablations, the causal link to Stage 2."""

    prompt_batch: int | None = RunSettings.model_fields["prompt_batch"]
    compile_generation: Literal["auto", "off", "inductor", "aot_eager"] = \
        RunSettings.model_fields["compile_generation"]
    compile_min_prompts: int = RunSettings.model_fields["compile_min_prompts"]

    ray: str | None = RayOptions.model_fields["ray"]
    ray_workers: int | None = RayOptions.model_fields["ray_workers"]


# ---- analyses (``refusalscope analyze NAME --run RUN``; TOML tables [analyze] and [analyze.NAME]) ----------------

class AnalyzeSettings(_RunOptions):
    """Options every analysis shares; unset ones take the run's own value."""

    judge: str | None = Field(None, description="judge of generated completions (default: the run's)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens generated per completion (default: the "
                                       "run's, so completions the stages generated are reused)")
    limit: int | None = Field(None, ge=1, description="analyse only the first N of the run's prompts")
    seed: int = Field(0, description="random seed of the analysis' random choices")


class PromptGroupOptions(BaseModel):
    """For analyses that generate per prompt (hydra, controls)."""

    model_config = ConfigDict(extra="forbid")

    prompt_batch: int | None = Field(None, ge=1, description="prompts analysed together, their completions generated "
                                     "in shared batches of prompt-batch × batch-size rows (default: the run's, else "
                                     "4); each prompt's results are those it gets alone, up to float rounding of "
                                     "batch shapes (a greedy near-tie may pick another token)")


class HydraOptions(BaseModel):
    """Dormant ("hydra") features (paper, "Redundant Features", Fig. 2).

    Pipeline features inactive on the prompt, what switches them on, and the graph of which ablation wakes which."""

    model_config = ConfigDict(extra="forbid")

    sets: list[Literal["stage2", "stage3"]] = Field(default_factory=lambda: ["stage2", "stage3"],
                                                    description="feature sets examined (stage3 when the run has it)")
    threshold: float = Field(0.0, description="a latent is on where its activation exceeds this (dormant: never "
                             "above it on the unablated prompt)")
    # our choice: activation mass (a strong firing counts more than a faint one); "count" counts positions
    shares: Literal["activation", "count"] = Field("activation", description="segment shares of the woken "
                                                   "features' activation mass, or of their firing positions")
    # our choice: "all" — the paper's "set" scope is always reported; "all" adds, from the same forwards, every latent
    # the ablations switch on anywhere downstream (the woken/tokens/segments/edges tables carry a scope column)
    wake_scope: Literal["set", "all"] = Field("all", description="woken features: the set's own dormant ones only "
                                              "(set), or also every latent of every SAE layer off on the clean prompt "
                                              "that an ablation switches on (all)")
    min_edge_prompts: int = Field(1, ge=1, description="graph: keep an edge found on at least this many prompts")
    # our choice: 5,000; every active block x every newly active latent gives millions of "all" edges on a real run
    graph_max_edges: int = Field(5000, ge=1, description="graph_all.*: keep the edges found on the most prompts")
    draw_max_edges: int = Field(200, ge=1, description="graph.png: draw at most this many edges per scope panel (most "
                                "prompts first)")


class ObrienOptions(BaseModel):
    """Controls (paper, Fig. 6): random active features and the O'Brien et al. baseline.

    Equal-size random active features are tabulated from the run; the baseline ablates every feature active on at
    least k prompt tokens."""

    model_config = ConfigDict(extra="forbid")

    k_values: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 6, 8, 12, 16],
                                description="k swept: features active on at least k prompt tokens are ablated")


class CeOptions(BaseModel):
    """CE loss (paper, Table 9): the cost of the ablations in model quality.

    Next-token cross-entropy on harmless instructions (the model's own completions as targets) and on general
    English prose, for the baseline, direction ablation and per-prompt feature ablation."""

    model_config = ConfigDict(extra="forbid")

    n_instructions: int = Field(100, ge=1, description="harmless instructions (the first N of --instructions)")
    instructions: str = Field("harmless_test", description="harmless instruction set (dataset name or file)")
    n_prose: int = Field(100, ge=1, description="prose passages (State of the Union addresses, see refusalscope.prose)")
    # our choice: 20th/21st-century addresses, closer to the English a current model was trained on
    prose_since: int = Field(1900, description="prose: addresses from this year on (modern English)")
    # our choice: 96 tokens keep a chat prompt plus most of a 48-token completion, and bound the cost on a CPU
    max_tokens: int = Field(96, ge=2, description="tokens per CE text (prompt + completion, or prose), cut at the end")
    sets: list[Literal["stage2", "stage3"]] = Field(default_factory=lambda: ["stage2", "stage3"],
                                                    description="per-prompt feature sets ablated (stage3 when the "
                                                    "run has it)")
    max_sets: int | None = Field(None, ge=1, description="ablate at most N per-prompt sets of each kind (default: all)")
    # our choice: a CPU is compute-bound (more rows per forward save nothing); a GPU is filled by 8 sets' rows
    sets_per_forward: int | None = Field(None, ge=1, description="feature sets evaluated in one batched forward "
                                         "(default: 1 on CPU, 8 on a GPU)")


class ClampOptions(BaseModel):
    """Clamping (paper, Tables 5/6): the redundant features clamped to fixed values on benign prompts."""

    model_config = ConfigDict(extra="forbid")

    values: list[float] = Field(default_factory=lambda: [2.0, 4.0, 6.0, 8.0, 10.0],
                                description="values the features are clamped to")
    n_prompts: int = Field(5, ge=1, description="benign prompts (the first N of --prompts)")
    prompts: str = Field("harmless_test", description="benign prompt set (dataset name or file)")
    modes: list[Literal["first", "fired"]] = Field(
        default_factory=lambda: ["first", "fired"],
        description="where to clamp: first token, or the template/prompt token where the feature fired")


class TaxonomyOptions(BaseModel):
    """Taxonomy mapping (paper, Fig. 3): the CoCoNot unsafe categories on whose prompts each feature fires."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["subcategory", "category"] = Field(
        "subcategory", description="CoCoNot label used as the category: the subcategories of 'Requests with safety "
        "concerns', or the five top categories of the original subset")
    max_per_category: int | None = Field(60, ge=1, description="prompts per category (seeded sample; none: all)")
    # our choice: 1 prompt maps a feature (the paper's "non-zero activation"); raise it to ask for more evidence
    min_prompts: int = Field(1, ge=1, description="a feature maps to a category when active on this many of its "
                             "prompts")
    # our choice: 0.25. With dense SAEs (ours: TopK, k = 64 of 4,096) almost every latent fires once in 60
    # prompts, so the paper's "non-zero on its prompts" maps nearly every feature, pipeline or random, to every
    # category; 0 gives the paper's rule, and share_sweep.parquet shows the counts at 0, 0.1, 0.25 and 0.5
    min_share: float = Field(0.25, ge=0, le=1, description="a feature maps to a category when active on at least "
                             "this share of its prompts too (0: the paper's rule)")
    min_category_prompts: int = Field(5, ge=1, description="drop categories with fewer prompts (CoCoNot has a "
                                      "1-prompt one)")
    # our choice: the template's tokens (system prompt, turn markers) are the same in every prompt, so a feature
    # firing there fires on every category and says nothing about it; only the user's text is read
    positions: Literal["user", "all"] = Field("user", description="prompt tokens read: the user's text, or all "
                                              "(template tokens included)")


class ExplainOptions(BaseModel):
    """Feature explanations (paper, Tables 4, 7, 8, 10, 11).

    Neuronpedia, local top-activating contexts, an optional LLM explainer, and an offline one-line fallback."""

    model_config = ConfigDict(extra="forbid")

    n_contexts: int = Field(5, ge=1, description="top-activating contexts kept per feature")
    # our choice: harmful and harmless instructions the stages did not evaluate (the run's prompts are dropped)
    corpus: list[str] = Field(default_factory=lambda: ["harmful_train", "harmless_test"],
                              description="prompt sets (or files) of the one top-context pass; empty: no pass "
                              "(Neuronpedia's contexts only)")
    corpus_limit: int | None = Field(None, ge=1, description="take at most N prompts from each corpus set")
    window_before: int = Field(10, ge=0, description="tokens kept before a context's max-activating token")
    window_after: int = Field(3, ge=0, description="tokens kept after it")
    chat_format: bool = Field(True, description="read corpus prompts as chat turns, as the stages do (else raw text)")
    neuronpedia: Literal["auto", "api", "exports", "off"] = Field(
        "auto", description="Neuronpedia explanations: the feature API, the bulk exports, off, or auto (the API "
        "for sources with few features, the exports otherwise; SAE sets Neuronpedia lacks are skipped)")
    neuronpedia_api_max: int = Field(50, ge=0, description="auto: use the API for a source with at most this many "
                                     "features (Neuronpedia asks heavy users to prefer the exports)")
    neuronpedia_source: str | None = Field(None, description="Neuronpedia MODEL/SOURCE with {layer} for SAE sets "
                                           "the registry does not map, e.g. gemma-2-2b/{layer}-gemmascope-res-16k")
    neuronpedia_url: str = Field("https://www.neuronpedia.org", description="Neuronpedia API base URL (key: "
                                 "NEURONPEDIA_API_KEY environment variable)")
    neuronpedia_exports_url: str = Field("https://neuronpedia-datasets.s3.us-east-1.amazonaws.com",
                                         description="Neuronpedia exports bucket URL")
    offline: bool = Field(False, description="answer Neuronpedia lookups from the cache only")
    cache_dir: str | None = Field(None, description="Neuronpedia cache (default: the user cache, "
                                  "refusalscope/neuronpedia)")
    llm_url: str | None = Field(None, description="OpenAI-compatible chat endpoint that explains features without "
                                "a Neuronpedia explanation, e.g. http://127.0.0.1:8080 (key: REFUSALSCOPE_LLM_API_KEY)")
    llm_model: str | None = Field(None, description="model name sent to the endpoint (default: "
                                  "REFUSALSCOPE_LLM_MODEL, else the server's first model)")
    http_timeout: float = Field(60.0, gt=0, description="seconds to wait for one HTTP answer (Neuronpedia, LLM)")
    retries: int = Field(4, ge=0, description="HTTP retries on 429, 5xx and timeouts (exponential backoff)")
    backoff: float = Field(1.0, ge=0, description="first backoff wait in seconds (doubles per retry; Retry-After "
                           "wins)")
    themes: str | None = Field(None, description="TOML file of theme keyword lists (default: the packaged "
                               "explain/themes.toml)")
    top_terms: int = Field(30, ge=1, description="content words kept in top_terms.parquet (paper, Table 4: 30)")


class HydraSettings(AnalyzeSettings, HydraOptions, PromptGroupOptions):
    """Dormant ("hydra") features: which pipeline features are inactive, and which ablations wake them."""


class ControlsSettings(AnalyzeSettings, ObrienOptions, PromptGroupOptions):
    """Controls: equal-size random active features and the O'Brien et al. active-feature baseline (ASR vs k)."""


class CeSettings(AnalyzeSettings, CeOptions):
    """CE loss of the model on harmless instructions and English prose, with and without the ablations."""


class ClampSettings(AnalyzeSettings, ClampOptions):
    """Clamp the redundant features on benign prompts and judge the completions."""


class TaxonomySettings(AnalyzeSettings, TaxonomyOptions):
    """Map each pipeline feature to the CoCoNot unsafe categories it fires on; compare with random features."""


class ExplainSettings(AnalyzeSettings, ExplainOptions):
    """Explain every feature the run found: Neuronpedia, local top contexts, an LLM explainer or a fallback."""


# analysis name -> its settings class (the CLI's `analyze` subcommands, the [analyze.NAME] TOML tables)
ANALYSIS_SETTINGS: dict[str, type[AnalyzeSettings]] = {
    "hydra": HydraSettings, "controls": ControlsSettings, "ce": CeSettings, "clamp": ClampSettings,
    "taxonomy": TaxonomySettings, "explain": ExplainSettings,
}


# ---- the report and the annotation app (``refusalscope report RUN``, ``refusalscope annotate RUN``) ---------------

class AgreementOptions(BaseModel):
    """Scoring of the human annotation (paper, Fig. 7): majority vote against the activation-based labels."""

    model_config = ConfigDict(extra="forbid")

    votes: int = Field(2, ge=1, description="annotators who must tick a category for it to be in the majority label "
                       "(paper: 2 of 3)")
    min_annotators: int = Field(3, ge=1, description="a feature is scored once this many annotators answered it")


class ReportSettings(CommandSettings, AgreementOptions):
    """Write a self-contained HTML report of a run (every figure embedded, opens offline)."""

    run: Path = Field(..., description="run directory (also the positional RUN_DIR)")
    out: Path | None = Field(None, description="HTML file to write (default: RUN/report.html)")
    max_rows: int = Field(200, ge=1, description="rows shown per table (the count of the rest is given)")
    max_prompts: int = Field(500, ge=1, description="prompts in the per-prompt drill-down")
    max_features: int = Field(20, ge=1, description="features per set shown with explanation and contexts in the "
                              "drill-down (the rest by name)")


class AnnotateSettings(CommandSettings, AgreementOptions):
    """Serve the annotation app: annotators label sampled features with CoCoNot categories (paper, Fig. 7)."""

    run: Path = Field(..., description="run directory with taxonomy and explanations (also the positional RUN_DIR)")
    host: str = Field("127.0.0.1", description="address to listen on (127.0.0.1: this machine only)")
    port: int = Field(8765, ge=0, le=65535, description="port to listen on (0: any free port)")
    # our choice: sizes (the paper's appendix gives the procedure; the sample is stored once in annotations.sqlite)
    n_pipeline: int = Field(60, ge=0, description="pipeline features sampled, stratified by number of categories")
    n_active: int = Field(20, ge=0, description="random activating features sampled (taxonomy group random_active)")
    n_inactive: int = Field(20, ge=0, description="random non-activating features sampled (group random_inactive)")
    seed: int = Field(0, description="seed of the sample and of each annotator's order")
    order: Literal["per-annotator", "shared"] = Field(
        "per-annotator", description="each annotator's own seeded order (our choice: averages out order effects), "
        "or one shared order")
    data_dir: str | None = Field(None, description="data directory holding coconot.jsonl, for the categories when "
                                 "the taxonomy does not list them (default: the run's)")


def read_text_or_value(value: str | None) -> str | None:
    """The file's text when ``value`` names a file, else ``value`` itself (a template given inline)."""
    if not value:
        return value
    try:
        p = Path(value).expanduser()
        return p.read_text() if p.is_file() else value
    except OSError:  # e.g. an inline template longer than a file name
        return value


def _normalise_keys(table: dict) -> dict:
    """TOML keys may use dashes (``n-train``); nested tables too."""
    return {k.replace("-", "_"): (_normalise_keys(v) if isinstance(v, dict) else v) for k, v in table.items()}


# Sub-step tables of `run`: a top-level [direction] / [sae-train] table configures the same options of `run`,
# so one file drives both the step's own command and the pipeline; [run.direction] wins over it.
RUN_SUBSTEPS = {"direction": "direction", "sae_train": "sae_train", "stage3": "interactions"}


def read_toml(path: str | Path | None, command: str) -> dict:
    if path is None:
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise RefusalScopeError(f"config file not found: {p}")
    try:
        data = _normalise_keys(tomllib.loads(p.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise RefusalScopeError(f"config file {p} is not valid TOML: {e}") from None
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    head, _, sub = command.replace("-", "_").partition(".")
    table = data.get(head, {})
    if sub:  # [analyze.hydra]: the [analyze] table's own keys, then the sub-table's
        table = {**{k: v for k, v in table.items() if not isinstance(v, dict)}, **table.get(sub, {})}
    if command == "run":
        for field, name in RUN_SUBSTEPS.items():
            shared = {k: v for k, v in data.get(name, {}).items() if k in _SUBSTEP_FIELDS[field]}
            if shared or field in table:
                merged[field] = {**shared, **table.get(field, {})}
        table = {k: v for k, v in table.items() if k not in RUN_SUBSTEPS}
    merged.update(table)
    return merged


def resolve(cls: type[CommandSettings], flags: dict, toml_path: str | Path | None = None, command: str = ""):
    """Build ``cls`` from flags, environment and TOML, with one readable error on invalid values."""
    toml = read_toml(toml_path, command)
    known = set(cls.model_fields)
    unknown = sorted(set(toml) - known)
    if unknown:
        raise RefusalScopeError(f"unknown option(s) in config file for '{command}': {', '.join(unknown)}")
    cls._toml = toml
    try:
        return cls(**flags)
    except SettingsError as e:  # e.g. a list option set in the environment as "kl,steer"
        raise RefusalScopeError(f"{e}; list options in environment variables are JSON, e.g. "
                                'REFUSALSCOPE_FILTERS=\'["kl","steer"]\'') from None
    except ValidationError as e:
        lines = [f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors()]
        raise RefusalScopeError("invalid options:\n  " + "\n  ".join(lines)) from None
    finally:
        cls._toml = {}


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'4-20', '10,12,19', '3-' or None (all) -> sorted layer list, checked against the model."""
    if spec is None or str(spec).strip() in ("", "all"):
        return list(range(n_layers))
    out: set[int] = set()
    bad_spec = RefusalScopeError(f"cannot read layers {spec!r}; use e.g. '4-20', '3-', '-5' or '10,12,19'")
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part:  # 'a-b', 'a-' (to the last layer), '-b' (from layer 0)
                a, b = part.split("-", 1)
                lo, hi = int(a) if a else 0, int(b) if b else n_layers - 1
                if hi < lo:
                    raise bad_spec
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise bad_spec from None
    if not out:
        raise bad_spec
    bad = sorted(x for x in out if not 0 <= x < n_layers)
    if bad:
        raise RefusalScopeError(f"layer(s) {bad} out of range: the model has layers 0..{n_layers - 1}")
    return sorted(out)


_SUBSTEP_FIELDS = {"direction": set(DirectionOptions.model_fields), "sae_train": set(SaeTrainOptions.model_fields),
                   "stage3": set(Stage3Options.model_fields)}


# ---- the commented example file (refusalscope.example.toml is generated from these classes; a test keeps it so) ----

def _toml_value(value) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _example_table(cls: type[BaseModel], skip: set[str]) -> list[str]:
    lines = []
    for name, field in cls.model_fields.items():
        if name in skip or (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            continue
        key = name.replace("_", "-")
        if field.is_required():
            lines.append(f"# {key} = ...  # required: {field.description}")
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, Path):
            value = str(value)
        text = _toml_value(value)
        prefix = "# " if value is None else ""
        lines.append(f"# {field.description}")
        lines.append(f"{prefix}{key} = {text.replace('  # unset', '')}" if value is not None
                     else f"# {key} =  (unset by default)")
    return lines


def _analysis_options(cls: type[AnalyzeSettings]) -> type[BaseModel]:
    """The options model of one analysis: the fields of every base of its settings class but ``AnalyzeSettings``
    (its own options, and shared groups such as ``PromptGroupOptions``)."""
    bases = [b for b in cls.__bases__ if b is not AnalyzeSettings]
    if len(bases) == 1:
        return bases[0]
    return type(bases[0].__name__, tuple(bases), {"__doc__": bases[0].__doc__})


def example_toml() -> str:
    """Every option of every command with its default, commented: the text of refusalscope.example.toml."""
    out = ["# refusalscope options: pass with --config FILE. Flags beat REFUSALSCOPE_* environment variables, which",
           "# beat this file. Keys at the top level apply to every command that has them; a table applies to one",
           "# command ([run], [direction], ...). [run.direction], [run.sae-train] and [run.stage3] set the options",
           "# of those steps inside `refusalscope run`; a top-level [direction] or [sae-train] table sets them too.",
           "# [analyze] holds options every analysis shares; [analyze.NAME] those of `refusalscope analyze NAME`.",
           "# Generated from refusalscope.config (python -c 'import refusalscope.config as c; "
           "print(c.example_toml())').", ""]
    common = set(ModelOptions.model_fields)
    out.append("# ---- options every model-loading command shares ----")
    out += _example_table(ModelOptions, set())
    for command, cls, nested in (("run", RunSettings, (("direction", DirectionOptions), ("sae-train", SaeTrainOptions),
                                                       ("stage3", Stage3Options))),
                                 ("direction", DirectionSettings, ()), ("sae-train", SaeTrainSettings, ()),
                                 ("sae-eval", SaeEvalSettings, ()), ("asr", AsrSettings, ()),
                                 ("interactions", InteractionSettings, ()), ("report", ReportSettings, ()),
                                 ("annotate", AnnotateSettings, ()), ("analyze", AnalyzeSettings, ()),
                                 *((f"analyze.{name}", _analysis_options(cls), ())
                                   for name, cls in ANALYSIS_SETTINGS.items())):
        out += ["", f"[{command}]", f"# {(cls.__doc__ or '').strip().splitlines()[0]}"]
        skip = common | ({"direction", "sae_train", "stage3"} if nested else set())
        if command in ("direction", "sae-train", "interactions"):
            skip |= {n for n in cls.model_fields if n not in common and n not in (
                "model", "out", "run", "data_dir", "json_output")}  # shown once, under [run.<step>]
            out.append("# (its step options are listed under [run.%s] below; the same keys work here)"
                       % {"direction": "direction", "sae-train": "sae-train", "interactions": "stage3"}[command])
        out += _example_table(cls, skip)
        for name, sub in nested:
            out += ["", f"[{command}.{name}]", f"# {(sub.__doc__ or '').strip().splitlines()[0]}"]
            out += _example_table(sub, set())
    return "\n".join(out) + "\n"
