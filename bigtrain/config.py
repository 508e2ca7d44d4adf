"""One typed config tree for every bigtrain entry point.

Loaded from YAML (``configs/*.yaml``), overridden with ``--set dotted.key=value``; unknown keys, wrong
types and inconsistent parallel layouts are errors raised *before* any process group exists, each as
one line naming the field. Derived values (data-parallel size, gradient accumulation, padded vocab) are
computed once in :meth:`Config.resolve` and stored under ``derived``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the field."""


# ``precision`` -> the torch dtype's name (also what HF's config.json ``torch_dtype`` says)
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a ``precision`` (fp32|bf16|fp16); KeyError on any other name."""
    import torch  # here, not at the top: loading and checking a config needs no torch

    dtype: torch.dtype = getattr(torch, PRECISION_DTYPES[precision])
    return dtype


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (shown by ``--help-config``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.copy(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


MODEL_FAMILIES = ("llama", "bert")  # each has entries in bigtrain.registry


ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")
# what the export writes (bigtrain.models.layout)
DECODER_HF_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
    "mixtral",
    "qwen2_moe",
)
HF_MODEL_TYPES = (*DECODER_HF_TYPES, "bert")
GEMMA = ("gemma2", "gemma3_text")
FINETUNE_TASKS = ("none", "sft", "classify", "token_classify")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # gelu (exact, erf): the bert family's


@dataclass
class RopeScalingConfig:
    """Rotary scaling, under HF's ``rope_parameters`` names (``bigtrain.models.layers.rope_frequencies``)."""

    type: str = opt(
        "none",
        "none (plain rotary) | linear (positions divided by factor) | llama3 (Llama 3.1+: long wavelengths "
        "interpolated, short kept, a smooth band between) | yarn (Peng et al. 2023: NTK-by-parts and a cos/sin "
        "attention factor). HF's dynamic NTK rescales only at inference past the context: not a training "
        "setting, refused.",
    )
    factor: float = opt(1.0, "Context extension factor of linear, llama3 and yarn (>= 1).")
    original_max_position_embeddings: int | None = opt(
        None,
        "llama3/yarn: the context length the model was pretrained at (default: the model's context, "
        "model.max_position_embeddings or seq_length); phi3 "
        "records it with any type, for the export.",
    )
    low_freq_factor: float | None = opt(
        None, "llama3 (required): wavelengths above original/low_freq_factor are divided by factor."
    )
    high_freq_factor: float | None = opt(
        None, "llama3 (required): wavelengths below original/high_freq_factor are kept; > low_freq_factor."
    )
    beta_fast: float | None = opt(None, "yarn: rotations where the ramp ends extrapolating (default 32).")
    beta_slow: float | None = opt(None, "yarn: rotations where the ramp starts interpolating (default 1).")
    attention_factor: float | None = opt(
        None, "yarn: scale of cos/sin (default 0.1*ln(factor)+1, or the mscale ratio when both are set)."
    )
    mscale: float | None = opt(None, "yarn (DeepSeek style): mscale of the default attention factor.")
    mscale_all_dim: float | None = opt(None, "yarn (DeepSeek style): the attention factor's divisor mscale.")
    truncate: bool | None = opt(None, "yarn: round the correction range to whole dimensions (default true).")


@dataclass
class MoEConfig:
    """Mixture of experts (``bigtrain.models.moe``): megatron-core's router and all-to-all token dispatcher
    around bigtrain's stacked SwiGLU experts (HF Mixtral / Qwen2-MoE semantics)."""

    num_experts: int = opt(0, "Routed experts per MoE block; 0: every block has the dense MLP.")
    top_k: int = opt(2, "Experts each token is sent to (HF num_experts_per_tok).")
    ffn_hidden_size: int | None = opt(
        None, "Inner width of one routed expert (HF moe_intermediate_size); default: model.ffn_hidden_size."
    )
    layer_freq: int = opt(
        1,
        "Block i (0-based) is a MoE block when (i+1) is a multiple of this (HF Qwen2-MoE decoder_sparse_step); "
        "1: every block.",
    )
    norm_topk_prob: bool = opt(
        True,
        "Renormalize the top-k routing weights to sum to 1 (Mixtral: true; Qwen2-MoE and OLMoE: false). The "
        "router is softmax over all experts, then top-k, in fp32.",
    )
    shared_expert_ffn_size: int = opt(
        0,
        "Inner width of an always-on shared SwiGLU expert added to the routed output (HF Qwen2-MoE "
        "shared_expert_intermediate_size); 0: none.",
    )
    shared_expert_gate: bool = opt(
        False, "Scale the shared expert's output by sigmoid(x . w) (HF Qwen2-MoE shared_expert_gate)."
    )
    aux_loss_coeff: float = opt(
        0.01,
        "Coefficient of the load-balancing loss: the mean over MoE blocks of E * sum_e f_e * P_e (Switch/"
        "GShard; f_e: the block's top-k slots routed to expert e per token, summing to top_k; P_e: the "
        "expert's mean router probability; HF's value for one block, top_k at uniform routing, and HF's "
        "router_aux_loss_coef). Added to the gradients, reported apart from the loss (moe_aux_loss). 0: off.",
    )
    z_loss_coeff: float = opt(
        0.0,
        "Coefficient of the router z-loss, the mean over MoE blocks of mean(logsumexp(logits)^2) (Zoph et al. "
        "2022, ST-MoE); 0: off.",
    )
    capacity_factor: float | None = opt(
        None,
        "Expert capacity = factor * tokens * top_k / experts; tokens past it are dropped (lowest "
        "probability first) and pass through the residual only. null: dropless (no token dropped).",
    )

    def is_moe_block(self, block: int) -> bool:
        """Whether block ``block`` (0-based) has the experts in place of the dense MLP."""
        return self.num_experts > 0 and (block + 1) % self.layer_freq == 0


@dataclass
class ModelConfig:
    family: str = opt(
        "llama",
        "Model family (bigtrain.registry): llama (causal decoder and its variants) | bert (bidirectional "
        "encoder: learned positions, token types, post-LayerNorm blocks, MLM + NSP heads).",
    )
    num_layers: int = opt(2, "Number of transformer blocks.")
    hidden_size: int = opt(64, "Model width.")
    num_attention_heads: int = opt(4, "Query heads.")
    num_kv_heads: int | None = opt(
        None, "Key/value heads for grouped-query attention (default: = query heads)."
    )
    ffn_hidden_size: int | None = opt(
        None,
        "MLP inner width (SwiGLU; default: Llama's 8/3*hidden rounded up to 256; bert: the GELU MLP, "
        "default 4*hidden).",
    )
    seq_length: int = opt(128, "Training sequence length in tokens.")
    max_position_embeddings: int | None = opt(
        None,
        "Context length the model declares (HF max_position_embeddings, written by the export; the "
        "default context of llama3/yarn rotary scaling); default: seq_length. An import keeps the HF "
        "model's (e.g. 131072 for Llama 3.2) and trains at a shorter seq_length.",
    )
    vocab_size: int | None = opt(None, "True vocabulary size (default: taken from data.tokenizer).")
    rope_theta: float = opt(10000.0, "Rotary embedding base.")
    norm_eps: float = opt(1e-5, "Norm epsilon (RMSNorm; bert: LayerNorm, HF layer_norm_eps, 1e-12).")
    tie_embeddings: bool = opt(False, "Share the input embedding with the output layer.")
    init_std: float = opt(
        0.02, "Std of the normal weight init (output projections scaled by 1/sqrt(2*layers))."
    )
    make_vocab_size_divisible_by: int = opt(128, "Vocab is padded to a multiple of this times tensor size.")
    kv_channels: int | None = opt(
        None,
        "Width of one attention head (HF head_dim; Qwen3's differs), default hidden_size/num_attention_heads.",
    )
    qkv_bias: bool = opt(
        False, "Biases on the query/key/value projections (Qwen2/2.5; model.hf_model_type qwen2)."
    )
    qk_norm: bool = opt(
        False, "RMSNorm over each query and key head before rotary (Qwen3; model.hf_model_type qwen3)."
    )
    sliding_window: int | None = opt(
        None,
        "Sliding-window attention: a token attends to itself and the window-1 tokens before it (Mistral v0.1, "
        "Qwen2 use_sliding_window); null: the whole causal context.",
    )
    full_attention_layers: int = opt(
        0,
        "With sliding_window: the first this many blocks attend to the full context (HF max_window_layers).",
    )
    window_pattern: int = opt(
        0,
        "With sliding_window and > 0: block i (0-based) attends to the full context when (i+1) is a multiple "
        "of this, the others use the window (Gemma 2: 2); 0: full_attention_layers decides.",
    )
    norm_offset: bool = opt(False, "RMSNorm scales by (1 + weight), all in fp32; weights start at 0 (Gemma).")
    sandwich_norms: bool = opt(
        False, "Also normalize the attention and MLP outputs before their residual adds (Gemma 2/3)."
    )
    activation: str = opt(
        "silu",
        "MLP activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma) | gelu (exact; the bert family's plain MLP).",
    )
    type_vocab_size: int = opt(2, "bert: token types (segments A/B; HF type_vocab_size).")
    scale_embeddings: bool = opt(False, "Multiply the embeddings by sqrt(hidden_size) (Gemma).")
    query_pre_attn_scalar: int | None = opt(
        None, "Attention scores scaled by 1/sqrt(this) instead of 1/sqrt(head width) (Gemma)."
    )
    attn_logit_softcapping: float | None = opt(
        None,
        "Attention scores become cap*tanh(score/cap) (Gemma 2; a math attention path, not SDPA's kernels).",
    )
    final_logit_softcapping: float | None = opt(None, "Output logits become cap*tanh(logit/cap) (Gemma 2).")
    rope_local_theta: float | None = opt(
        None,
        "Rotary base of the sliding-window blocks, which rotate unscaled (Gemma 3's rope_local_base_freq); "
        "null: every block uses rope_theta and rope_scaling.",
    )
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    hf_model_type: str = opt(
        "llama",
        "HF model_type the export writes (import sets it): llama | mistral | qwen2 | qwen3 | phi3 (fused "
        "qkv_proj/gate_up_proj tensors) | gemma2 | gemma3_text | mixtral | qwen2_moe (model.moe) | bert (the "
        "bert family's).",
    )

    @property
    def has_shared_expert(self) -> bool:
        return self.moe.num_experts > 0 and self.moe.shared_expert_ffn_size > 0

    @property
    def has_shared_expert_gate(self) -> bool:
        return self.has_shared_expert and self.moe.shared_expert_gate

    @property
    def num_moe_blocks(self) -> int:
        """How many blocks have experts (``model.moe.layer_freq``)."""
        return sum(self.moe.is_moe_block(i) for i in range(self.num_layers))

    @property
    def expert_ffn_size(self) -> int:
        """The inner width of one routed expert (``moe.ffn_hidden_size``, else the dense MLP's)."""
        return self.moe.ffn_hidden_size or self.ffn_size

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.family == "bert":
            return 4 * self.hidden_size
        return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)

    @property
    def context_length(self) -> int:
        """The declared context: ``max_position_embeddings``, else ``seq_length``."""
        return self.max_position_embeddings or self.seq_length

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def window_of(self, block: int) -> int | None:
        """The sliding window of block ``block`` (0-based), None where it attends to the full context."""
        if self.window_pattern:
            return None if (block + 1) % self.window_pattern == 0 else self.sliding_window
        return self.sliding_window if block >= self.full_attention_layers else None


@dataclass
class ParallelConfig:
    tensor: int = opt(1, "Tensor-parallel size (megatron-core column/row-parallel layers).")
    pipeline: int = opt(1, "Pipeline stages (DeepSpeed PipelineModule, 1F1B).")
    sequence_parallel: bool = opt(
        False,
        "Megatron sequence parallelism (needs parallel.tensor > 1): norms and residuals hold seq_length / "
        "tensor positions per rank; the tensor-parallel all-reduces become all-gather + reduce-scatter.",
    )
    partition_method: str = opt(
        "parameters", "How DeepSpeed splits layers across stages: parameters|uniform."
    )
    context: int = opt(
        1,
        "Context-parallel size: each sample's sequence is split over this many ranks (seq_length / context "
        "positions each) and attention spans them with DeepSpeed-Ulysses all-to-alls over heads; the "
        "world is tensor x context x data x pipeline, and ZeRO shards over data x context. Needs the key/"
        "value heads per tensor rank divisible by it; llama pretraining and SFT, pipeline 1, zero.stage 0-2.",
    )
    expert: int = opt(
        1,
        "Expert-parallel size (model.moe): the experts are split over this many data-parallel ranks and "
        "tokens reach them by all-to-all (megatron-core's dispatcher); expert weights are reduced over the "
        "data ranks that hold the same experts, dense weights over all. Divides the data-parallel size and "
        "moe.num_experts; zero.stage 0-2, pipeline 1.",
    )


@dataclass
class ZeroConfig:
    stage: int = opt(0, "DeepSpeed ZeRO stage 0-3 (2/3 need pipeline = 1).")
    offload_optimizer: bool = opt(False, "Keep optimizer states on CPU (ZeRO >= 1).")
    overlap_comm: bool = opt(True, "Overlap gradient reduction with backward.")
    reduce_bucket_size: int = opt(
        500_000_000,
        "Elements per gradient reduce bucket (capped at the parameters of one rank's model shard: ZeRO-3 "
        "allocates the bucket whole).",
    )
    allgather_bucket_size: int = opt(500_000_000, "Elements per all-gather bucket (ZeRO 1/2).")
    stage3_param_persistence_threshold: int = opt(
        100_000, "ZeRO-3: parameters smaller than this stay gathered."
    )
    stage3_prefetch_bucket_size: int = opt(50_000_000, "ZeRO-3: elements prefetched ahead of use.")
    grad_reduce_dtype: str = opt(
        "fp32",
        "Data type of the data-parallel gradient reduction under bf16/fp16: fp32 (Megatron-LM's choice for "
        "bf16: no rounding of the summed gradients, twice the bytes on the wire) | model (the training "
        "precision, DeepSpeed's default: half the traffic, each rank's gradients rounded to 8/11 bits).",
    )


@dataclass
class FP16Config:
    initial_scale_power: int = opt(16, "fp16: initial loss scale is 2**this.")
    loss_scale_window: int = opt(1000, "fp16: steps without overflow before the scale grows.")
    hysteresis: int = opt(2, "fp16: overflows tolerated before the scale drops.")
    min_loss_scale: float = opt(1.0, "fp16: lower bound of the dynamic loss scale.")


@dataclass
class OptimConfig:
    name: str = opt("adamw", "Optimizer: adamw (fused on GPU) | adam (L2 weight decay) | sgd | rmsprop.")
    momentum: float = opt(0.9, "Momentum of sgd and rmsprop.")
    layer_decay: float = opt(
        1.0, "Layer-wise LR decay: block i of L gets lr*layer_decay**(L+1-i), embeddings **(L+1); 1: off."
    )
    lr: float = opt(3e-4, "Peak learning rate.")
    min_lr: float = opt(3e-5, "Learning rate at the end of decay.")
    weight_decay: float = opt(0.1, "Decoupled weight decay (not applied to norms).")
    beta1: float = opt(0.9, "Adam beta1.")
    beta2: float = opt(0.95, "Adam beta2.")
    eps: float = opt(1e-8, "Adam epsilon.")
    warmup_steps: int = opt(0, "Linear warmup steps from 0 to lr.")
    decay: str = opt("cosine", "Decay after warmup: cosine|linear|constant.")
    decay_steps: int | None = opt(None, "Steps over which to decay (default: train.steps).")
    grad_clip: float = opt(1.0, "Global gradient-norm clip (0 disables).")


@dataclass
class TrainConfig:
    steps: int = opt(10, "Optimizer steps to train.")
    micro_batch_size: int = opt(1, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int = opt(8, "Sequences per optimizer step over all data-parallel ranks.")
    seed: int = opt(1234, "Seed for weights and data order.")
    run_dir: str = opt("runs/default", "Where checkpoints, metrics.jsonl and TensorBoard events go.")
    log_interval: int = opt(1, "Steps between log lines.")
    eval_interval: int = opt(0, "Steps between validations (0: only at the end when data.valid is set).")
    eval_steps: int = opt(2, "Validation batches per evaluation.")
    dist_timeout_minutes: float = opt(
        10.0, "Collective timeout: a rank that died or hangs makes the others exit non-zero after this."
    )
    device: str = opt("auto", "auto|cpu|cuda.")
    compile: bool = opt(
        False,
        "torch.compile the elementwise regions (RMSNorm, rotary, SwiGLU gate, loss at tensor size 1): fewer "
        "kernels and activations on GPU; costs compilation time at start.",
    )
    exit_signal_save: bool = opt(
        True,
        "On SIGTERM/SIGUSR1 (Slurm's warning before a kill) every rank saves a checkpoint at the end of the "
        "current step and exits 0. False: the signal's default action (immediate death).",
    )
    max_minutes: float = opt(
        0.0,
        "Wall-clock budget: stop with a checkpoint before this many minutes since start (leaving room for "
        "one more step and a save); 0: no limit.",
    )
    nonfinite: str = opt(
        "skip",
        "Non-finite loss or gradient norm: skip (parameters, optimizer state and LR schedule untouched, step "
        "counted) or stop (exit non-zero before any checkpoint of poisoned weights).",
    )
    max_consecutive_skips: int = opt(5, "train.nonfinite=skip: stop with an error after this many in a row.")
    spike_sigma: float = opt(
        0.0,
        "Loss-spike detection: a loss above the running mean by this many standard deviations is logged "
        "(console, metrics.jsonl, TensorBoard); 0: off.",
    )
    spike_window: int = opt(50, "Steps in the running mean/std of the loss for spike detection.")
    spike_min_history: int = opt(10, "Steps of history needed before a spike can be declared.")
    spike_rollback: bool = opt(
        False,
        "On a spike, reload the last checkpoint and skip the global batch that caused it (recorded in the "
        "checkpoint, never replayed).",
    )
    max_rollbacks: int = opt(3, "Spike rollbacks allowed per run before stopping with an error.")


@dataclass
class MaskingConfig:
    """The bert family's pretraining samples (Devlin et al. 2019; Megatron's BERT dataset): masked tokens
    and a sentence pair. Masks are a pure function of (train.seed, sample index)."""

    prob: float = opt(0.15, "Fraction of a sample's tokens the MLM loss predicts.")
    mask_fraction: float = opt(0.8, "Of the predicted tokens: replaced by [MASK] (BERT: 80%).")
    random_fraction: float = opt(
        0.1, "Of the predicted tokens: replaced by a random token (BERT: 10%; the rest are kept)."
    )
    whole_word: bool = opt(
        False, "Mask whole words: a word's pieces are chosen together (word starts: sentencepiece's '▁')."
    )
    sentence_pair: str = opt(
        "nsp",
        "Second-segment objective: nsp (B follows A in 50%, else a random document's) | sop (A and B "
        "swapped in 50%, ALBERT) | none (one segment, MLM only).",
    )
    short_seq_prob: float = opt(0.1, "Probability of a sample shorter than seq_length (Megatron's).")


@dataclass
class DataConfig:
    train: Any = opt(
        None,
        "Training corpus: a prefix, a directory/glob of shards, or a blend [[weight, prefix], ...].",
    )
    valid: Any = opt(None, "Validation corpus (same forms as train); default: a split of train.")
    split: str = opt("98,2,0", "train,valid,test split of train when valid is not given (Megatron-style).")
    tokenizer: str | None = opt(None, "Tokenizer directory (tokenizer/ package output).")
    cache_dir: str | None = opt(None, "Index-map cache (default: next to the data).")
    mock: bool = opt(False, "Random tokens instead of files (smoke tests only).")
    train_samples: int | None = opt(
        None,
        "Samples the training dataset is built for (default: train.steps*global_batch_size at a run's start; a "
        "resume keeps the saved run's count, or grows it for more steps where megatron's order for the new "
        "count starts with the saved run's, else refuses). megatron's shuffle depends on it (its number of "
        "epochs): pin it at the start to extend train.steps freely later; a new value on resume rebuilds the "
        "shuffle (said whether it keeps the saved order).",
    )
    document_mask: bool = opt(
        False,
        "Pretraining (llama): attention stays within each document of a packed sample and rotary positions "
        "restart at 0 at each document (a document ends with, and includes, its EOD token; a sample's first "
        "document may be the tail of one cut by the previous sample). Megatron's reset_attention_mask + "
        "reset_position_ids, as per-token document ids instead of a dense mask. For long model.seq_length "
        "over corpora of short documents; off: plain causal attention over the whole sample.",
    )
    masking: MaskingConfig = field(default_factory=MaskingConfig)


@dataclass
class CheckpointConfig:
    interval: int = opt(0, "Steps between checkpoints (0: only at the end).")
    keep_last: int = opt(3, "Checkpoints kept (older ones deleted; never the one this run resumed from).")
    load: str | None = opt(None, "Start from these weights only (fresh optimizer, step 0).")
    save: bool = opt(True, "Write checkpoints at all.")
    verify_checksums: bool = opt(
        True, "On resume, check every file's sha256 against the manifest (false: sizes only, faster)."
    )


@dataclass
class LoggingConfig:
    tensorboard: bool = opt(True, "Write TensorBoard events under run_dir/tensorboard.")
    peak_tflops: float | None = opt(None, "Device peak TFLOP/s for MFU (default: detected from device name).")


@dataclass
class DebugConfig:
    """Fault injection, for tests and for validating a cluster's recovery (all off by default)."""

    crash_at_step: int = opt(
        0, "Right after this step, debug.fault_rank is killed with SIGKILL, like `kill -9` (0: off)."
    )
    fault_rank: int = opt(-1, "Rank the crash/sleep/non-finite injections hit (-1: every rank).")
    sleep_at_step: int = opt(0, "After this step, debug.fault_rank sleeps debug.sleep_seconds (a hung rank).")
    sleep_seconds: float = opt(0.0, "Length of the debug.sleep_at_step sleep.")
    inject_nonfinite_at_step: int = opt(0, "Multiply this step's loss by NaN on debug.fault_rank (0: off).")
    inject_spike_at_step: int = opt(
        0, "Multiply the loss of the global batch first used at this step by debug.spike_factor (0: off)."
    )
    spike_factor: float = opt(30.0, "Loss multiplier for debug.inject_spike_at_step.")
    kill_in_save: str = opt(
        "",
        "SIGKILL this process at a named point inside a checkpoint save (see checkpoint.SAVE_FAULT_POINTS).",
    )
    kill_in_save_step: int = opt(0, "Only in the save of this step (0: the first save).")
    check_reshard: bool = opt(
        False,
        "After a resume at another layout, read the injected masters and Adam moments back from the live "
        "optimizer and require them bitwise equal to the checkpoint's (a collective; tests, drills).",
    )
    reshard_zero_moments: bool = opt(
        False, "Wrong on purpose (test control): a resume at another layout injects zero Adam moments."
    )
    skip_norm_grad_reduce: bool = opt(
        False,
        "Wrong on purpose (test control): under sequence parallelism, norm weight gradients are not "
        "summed over the tensor group (each rank keeps its sequence shard's partial gradient).",
    )
    rotate_expert_ranks: bool = opt(
        False,
        "Wrong on purpose (test control): under expert parallelism, expert rank r holds (and computes with) "
        "the experts of rank r+1, so every routed token reaches another rank's experts.",
    )
    skip_rotary_offset: bool = opt(
        False,
        "Wrong on purpose (test control): under context parallelism, every rank rotates its sequence "
        "chunk from position 0 instead of its offset.",
    )


@dataclass
class LoraConfig:
    rank: int = opt(0, "LoRA rank (0: no adapters; full fine-tuning or freezing as configured).")
    alpha: float = opt(16.0, "LoRA scale numerator: the update is alpha/rank * B @ A.")
    dropout: float = opt(0.0, "Dropout on the adapter input.")
    targets: list = opt(
        ["qkv", "proj", "gate_up", "down"],
        "Projections with adapters: qkv|proj|gate_up|down (bert: gate_up/down are the MLP's fc1/fc2).",
    )


@dataclass
class FinetuneConfig:
    task: str = opt(
        "none",
        "none (pretraining) | sft | classify (a label per text or text pair) | token_classify (a BIO tag "
        "per word; the bert family).",
    )
    train: Any = opt(None, "Training JSONL: a path, a glob, or a list of them.")
    valid: Any = opt(None, "Validation JSONL (same forms as train).")
    epochs: float = opt(0.0, "Passes over the training examples; sets train.steps (0: use train.steps).")
    packing: bool = opt(
        True, "sft: pack several examples into one sequence (attention/positions per example)."
    )
    overlong: str = opt(
        "truncate", "Examples longer than model.seq_length: truncate | drop (counted either way)."
    )
    strict: bool = opt(False, "Bad input lines are errors (file:line) instead of skipped and counted.")
    labels: list = opt(
        [],
        "classify: class names in id order (default: sorted labels of the training data); token_classify: "
        "the tag set (default: the training data's, O first).",
    )
    freeze_embeddings: bool = opt(False, "Keep the input embedding fixed.")
    freeze_layers: int = opt(0, "Keep the first N transformer blocks fixed.")
    freeze_router: bool = opt(
        False,
        "MoE models (model.moe): keep every block's router fixed while the rest trains, so tokens keep going "
        "to the experts pretraining sent them to (LoRA freezes the routers with the whole base).",
    )
    metric: str = opt("val_loss", "Early stopping / best checkpoint metric: val_loss|val_accuracy|val_f1|...")
    patience: int = opt(0, "Stop after this many validations without improvement (0: never).")
    min_delta: float = opt(0.0, "Smallest change that counts as an improvement.")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class Derived:
    """Values computed once from the rest (never set by the user)."""

    world_size: int = 1
    data_parallel_size: int = 1
    grad_accum_steps: int = 1
    padded_vocab_size: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: str = opt("fp32", "bf16|fp16|fp32 (bf16/fp16 keep fp32 master weights).")
    activation_checkpointing: str = opt("none", "none|full (every block)|selective (attention core only).")
    fp16: FP16Config = field(default_factory=FP16Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    derived: Derived = field(default_factory=Derived)

    # ------------------------------------------------------------------ derived values and checks
    def resolve(self, world_size: int, vocab_size: int | None = None) -> Config:
        """Validate against a world size and fill ``derived``; raises ConfigError (one line)."""
        m, p = self.model, self.parallel
        if vocab_size is not None and m.vocab_size is None:
            m.vocab_size = vocab_size
        validate(self, world_size)
        dp = world_size // (p.tensor * p.pipeline * p.context)
        self.derived = Derived(
            world_size=world_size,
            data_parallel_size=dp,
            grad_accum_steps=self.train.global_batch_size // (self.train.micro_batch_size * dp),
            padded_vocab_size=padded_vocab_size(m, p.tensor),
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def padded_vocab_size(m: ModelConfig, tensor: int) -> int:
    """Rows of the embedding and output layer: ``vocab_size`` rounded up to a multiple of
    ``make_vocab_size_divisible_by * tensor`` (Megatron's ``_vocab_size_with_padding``), so every
    tensor rank holds an equal slice. ConfigError when ``vocab_size`` is not set."""
    if m.vocab_size is None:
        raise ConfigError("model.vocab_size is not set and no data.tokenizer gives it")
    multiple = m.make_vocab_size_divisible_by * tensor
    return multiple * math.ceil(m.vocab_size / multiple)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# the decoder variants' fields, at their defaults: what the bert family must leave alone
DECODER_ONLY_FIELDS = {
    "num_kv_heads": None,
    "kv_channels": None,
    "qkv_bias": False,
    "qk_norm": False,
    "sliding_window": None,
    "full_attention_layers": 0,
    "window_pattern": 0,
    "norm_offset": False,
    "sandwich_norms": False,
    "scale_embeddings": False,
    "query_pre_attn_scalar": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "rope_local_theta": None,
}


def validate_bert(m: ModelConfig) -> None:
    """The bert family: BERT's own architecture (HF ``BertModel``), none of the decoder's variants."""
    _check(
        m.hf_model_type == "bert",
        f"model.family bert needs model.hf_model_type bert, got {m.hf_model_type!r}",
    )
    _check(m.activation == "gelu", f"model.family bert needs model.activation gelu, got {m.activation!r}")
    _check(
        m.tie_embeddings,
        "model.family bert ties the MLM decoder to the word embeddings: set tie_embeddings true",
    )
    _check(m.type_vocab_size >= 1, f"model.type_vocab_size must be >= 1, got {m.type_vocab_size}")
    for name, default in DECODER_ONLY_FIELDS.items():
        _check(getattr(m, name) == default, f"model.{name} is a decoder setting: model.family bert has none")
    _check(
        m.rope_scaling.type == "none",
        "model.rope_scaling: model.family bert has learned positions, no rotary",
    )


SENTENCE_PAIRS = ("nsp", "sop", "none")


def validate_masking(k: MaskingConfig) -> None:
    """``data.masking`` (the bert family's samples): probabilities in range, the fractions a split of 1."""
    _check(0 < k.prob < 1, f"data.masking.prob must be in (0, 1), got {k.prob!r}")
    for name in ("mask_fraction", "random_fraction"):
        value = getattr(k, name)
        _check(0 <= value <= 1, f"data.masking.{name} must be in [0, 1], got {value!r}")
    _check(
        k.mask_fraction + k.random_fraction <= 1,
        f"data.masking.mask_fraction + random_fraction must be <= 1 (the rest stay unchanged), got "
        f"{k.mask_fraction!r} + {k.random_fraction!r}",
    )
    _check(
        k.sentence_pair in SENTENCE_PAIRS,
        f"data.masking.sentence_pair must be {'|'.join(SENTENCE_PAIRS)}, got {k.sentence_pair!r}",
    )
    _check(
        0 <= k.short_seq_prob <= 1, f"data.masking.short_seq_prob must be in [0, 1], got {k.short_seq_prob!r}"
    )


def validate_model_variant(m: ModelConfig) -> None:
    """The architecture variants: head width, biases, q/k norm, sliding window, rotary scaling, HF type."""
    _check(
        m.hf_model_type in HF_MODEL_TYPES,
        f"model.hf_model_type must be {'|'.join(HF_MODEL_TYPES)}, got {m.hf_model_type!r}",
    )
    if m.family == "bert":
        return validate_bert(m)
    _check(
        m.hf_model_type != "bert" and m.activation != "gelu",
        "model.hf_model_type bert and model.activation gelu are the bert family's (set model.family bert)",
    )
    _check(m.kv_channels is None or m.kv_channels > 0, f"model.kv_channels must be > 0, got {m.kv_channels}")
    _check(
        m.head_dim % 2 == 0, f"model head width {m.head_dim} must be even (rotary pairs; model.kv_channels)"
    )
    # HF's other families put a bias on the output projection too (attention_bias), which bigtrain has not
    _check(
        not m.qkv_bias or m.hf_model_type in ("qwen2", "qwen2_moe"),
        "model.qkv_bias needs model.hf_model_type qwen2|qwen2_moe",
    )
    _check(
        not m.qk_norm or m.hf_model_type in ("qwen3", "gemma3_text"),
        "model.qk_norm needs model.hf_model_type qwen3|gemma3_text",
    )
    _check(
        m.sliding_window is None or m.sliding_window > 0,
        f"model.sliding_window must be > 0 or null, got {m.sliding_window}",
    )
    _check(
        m.sliding_window is None or m.hf_model_type != "llama",
        "model.sliding_window: HF's llama has no sliding window (set model.hf_model_type mistral|qwen2|qwen3)",
    )
    # HF's Qwen2-MoE windows every other block below max_window_layers: not bigtrain's window rule
    _check(
        m.sliding_window is None or m.hf_model_type != "qwen2_moe",
        "model.sliding_window: HF's qwen2_moe windows other blocks than bigtrain would (set it to null)",
    )
    _check(
        m.full_attention_layers >= 0,
        f"model.full_attention_layers must be >= 0, got {m.full_attention_layers}",
    )
    _check(
        m.full_attention_layers == 0 or m.hf_model_type in ("qwen2", "qwen3", "qwen2_moe"),
        "model.full_attention_layers is HF Qwen's max_window_layers: needs model.hf_model_type "
        "qwen2|qwen3|qwen2_moe",
    )
    validate_moe_hf_type(m)
    _check(
        m.activation in ACTIVATIONS, f"model.activation must be {'|'.join(ACTIVATIONS)}, got {m.activation!r}"
    )
    _check(m.window_pattern >= 0, f"model.window_pattern must be >= 0, got {m.window_pattern}")
    gemma = m.hf_model_type in GEMMA
    for name, on in (
        ("norm_offset", m.norm_offset),
        ("sandwich_norms", m.sandwich_norms),
        ("scale_embeddings", m.scale_embeddings),
        ("activation gelu_tanh", m.activation == "gelu_tanh"),
    ):  # what HF's Gemma 2/3 always have and its other families never
        _check(
            on == gemma,
            f"model.{name} is Gemma's block: set it exactly when model.hf_model_type is gemma2|gemma3_text",
        )
    _check(not m.window_pattern or gemma, "model.window_pattern needs model.hf_model_type gemma2|gemma3_text")
    _check(
        m.rope_local_theta is None or m.hf_model_type == "gemma3_text",
        "model.rope_local_theta needs model.hf_model_type gemma3_text",
    )
    _check(
        m.hf_model_type != "gemma3_text" or m.qk_norm, "model.hf_model_type gemma3_text needs model.qk_norm"
    )
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(m, name)
        _check(value is None or gemma, f"model.{name} needs model.hf_model_type gemma2|gemma3_text")
        _check(value is None or value > 0, f"model.{name} must be > 0 or null, got {value}")
    r = m.rope_scaling
    _check(
        r.type in ROPE_SCALING_TYPES,
        f"model.rope_scaling.type must be {'|'.join(ROPE_SCALING_TYPES)}, got {r.type!r}"
        + (" (dynamic NTK only rescales at inference, past the context)" if r.type == "dynamic" else ""),
    )
    _check(r.factor >= 1, f"model.rope_scaling.factor must be >= 1, got {r.factor}")
    _check(
        r.original_max_position_embeddings is None or r.original_max_position_embeddings > 0,
        "model.rope_scaling.original_max_position_embeddings must be > 0",
    )
    if r.type == "llama3":
        low, high = r.low_freq_factor, r.high_freq_factor
        _check(
            low is not None and high is not None and 0 < low < high,
            f"model.rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor, got {low} and {high}",
        )
    for name in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"):
        _check(
            r.type == "yarn" or getattr(r, name) is None,
            f"model.rope_scaling.{name} is a yarn setting (type is {r.type!r})",
        )


def validate_context_parallel(cfg: Config) -> None:
    """``parallel.context`` > 1, before any process group (ConfigError naming the field): DeepSpeed-Ulysses
    trades the sequence split for a head split, so every tensor rank's key/value heads must divide
    evenly over the context ranks, and each rank holds an equal chunk of the sequence (under sequence
    parallelism, again split over the tensor ranks)."""
    m, p = cfg.model, cfg.parallel
    cp = p.context
    if cp == 1:
        return
    _check(
        m.family == "llama" and cfg.finetune.task in ("none", "sft"),
        f"parallel.context {cp} is supported for llama pretraining and SFT (model.family {m.family}, "
        f"finetune.task {cfg.finetune.task})",
    )
    _check(
        p.pipeline == 1,
        f"parallel.context {cp} cannot be combined with parallel.pipeline {p.pipeline} yet: use "
        "tensor x context x data parallelism (ZeRO shards over data x context)",
    )
    # DeepSpeed's ZeRO-3 partitions parameters over the MPU's data-parallel group without the context
    # ranks (deepspeed/runtime/zero/parameter_offload.py ``_convert_to_zero_parameters``), so the
    # context ranks' gradients are never summed: each updates its own copy from its chunk alone
    # (measured: 1.9e-2 relative loss error by step 6, grad_norm 1/sqrt(2) of the true one at context 2)
    _check(
        cfg.zero.stage != 3,
        f"parallel.context {cp} cannot be combined with zero.stage 3 yet (DeepSpeed would partition the "
        "parameters over the data-parallel ranks only and never sum the context ranks' gradients): use "
        "zero.stage 1 or 2, which shard over data x context",
    )
    local_kv = m.kv_heads // p.tensor
    _check(
        local_kv % cp == 0,
        f"parallel.context {cp}: the key/value heads per tensor rank (model.num_kv_heads {m.kv_heads} / "
        f"parallel.tensor {p.tensor} = {local_kv}) must be divisible by it (Ulysses splits heads over the "
        "context ranks)",
    )
    chunk = cp * (p.tensor if p.sequence_parallel else 1)
    _check(
        m.seq_length % chunk == 0,
        f"parallel.context {cp}: model.seq_length {m.seq_length} must be divisible by "
        + ("parallel.context*parallel.tensor (sequence parallel) = " if p.sequence_parallel else "")
        + f"{chunk} (each rank holds an equal chunk of the sequence)",
    )


def validate_moe_hf_type(m: ModelConfig) -> None:
    """``model.hf_model_type`` mixtral / qwen2_moe: the experts that HF class has (every block sparse, top-k
    renormalized, no shared expert / a gated shared expert in every sparse block)."""
    e = m.moe
    if m.hf_model_type == "mixtral":
        _check(e.num_experts > 0, "model.hf_model_type mixtral needs model.moe.num_experts > 0")
        _check(
            e.layer_freq == 1, "model.hf_model_type mixtral: every block is sparse (model.moe.layer_freq 1)"
        )
        _check(
            e.norm_topk_prob, "model.hf_model_type mixtral renormalizes the top-k (model.moe.norm_topk_prob)"
        )
        _check(
            e.shared_expert_ffn_size == 0,
            "model.hf_model_type mixtral has no shared expert (model.moe.shared_expert_ffn_size 0; qwen2_moe has)",
        )
    if m.hf_model_type == "qwen2_moe":
        _check(e.num_experts > 0, "model.hf_model_type qwen2_moe needs model.moe.num_experts > 0")
        _check(
            e.shared_expert_ffn_size > 0 and e.shared_expert_gate,
            "model.hf_model_type qwen2_moe has a gated shared expert in every sparse block "
            "(model.moe.shared_expert_ffn_size > 0 and model.moe.shared_expert_gate true)",
        )


def validate_moe(cfg: Config, data_parallel: int) -> None:
    """``model.moe`` and ``parallel.expert`` (ConfigError naming the field)."""
    m, e, p = cfg.model, cfg.model.moe, cfg.parallel
    _check(p.expert >= 1, f"parallel.expert must be >= 1, got {p.expert}")
    _check(
        not (cfg.debug.rotate_expert_ranks and p.expert == 1),
        "debug.rotate_expert_ranks needs parallel.expert > 1 (it is a control of that feature)",
    )
    _check(e.num_experts >= 0, f"model.moe.num_experts must be >= 0, got {e.num_experts}")
    if e.num_experts == 0:
        _check(p.expert == 1, f"parallel.expert {p.expert} needs model.moe.num_experts > 0")
        return
    _check(
        m.family == "llama",
        f"model.moe is a decoder option (model.family llama), got model.family {m.family}",
    )
    _check(
        1 <= e.top_k <= e.num_experts,
        f"model.moe.top_k must be in [1, model.moe.num_experts={e.num_experts}], got {e.top_k}",
    )
    # megatron-core's router refuses top-1 after a softmax over the top-k logits (which would weight every
    # token's expert by exactly 1): MoELayer raises "Please use --moe-router-pre-softmax when topk is 1"
    _check(
        e.top_k > 1 or not e.norm_topk_prob,
        "model.moe.top_k 1 needs model.moe.norm_topk_prob false (renormalizing one weight makes it 1; Switch "
        "weights the expert by its router probability)",
    )
    _check(e.layer_freq >= 1, f"model.moe.layer_freq must be >= 1, got {e.layer_freq}")
    _check(
        e.layer_freq <= m.num_layers,
        f"model.moe.layer_freq {e.layer_freq} > model.num_layers {m.num_layers}: no block would be a MoE block",
    )
    _check(
        e.ffn_hidden_size is None or e.ffn_hidden_size > 0,
        f"model.moe.ffn_hidden_size must be > 0 or null, got {e.ffn_hidden_size}",
    )
    _check(e.shared_expert_ffn_size >= 0, "model.moe.shared_expert_ffn_size must be >= 0")
    _check(
        not e.shared_expert_gate or e.shared_expert_ffn_size > 0,
        "model.moe.shared_expert_gate needs model.moe.shared_expert_ffn_size > 0",
    )
    _check(e.aux_loss_coeff >= 0, f"model.moe.aux_loss_coeff must be >= 0, got {e.aux_loss_coeff}")
    _check(e.z_loss_coeff >= 0, f"model.moe.z_loss_coeff must be >= 0, got {e.z_loss_coeff}")
    _check(
        e.capacity_factor is None or e.capacity_factor > 0,
        f"model.moe.capacity_factor must be > 0 or null (dropless), got {e.capacity_factor}",
    )
    _check(
        m.activation == "silu",
        f"model.moe: the experts are SwiGLU (model.activation silu), got {m.activation!r}",
    )
    # megatron-core's MoE layer refuses to train under tensor parallelism without sequence parallelism
    # (megatron/core/transformer/moe/moe_layer.py, MoELayer.forward)
    _check(
        p.tensor == 1 or p.sequence_parallel,
        f"model.moe with parallel.tensor {p.tensor} needs parallel.sequence_parallel true (megatron-core's MoE "
        "layer routes sequence shards)",
    )
    _check(p.context == 1, f"model.moe cannot be combined with parallel.context {p.context} yet")
    _check(
        e.num_experts % p.expert == 0,
        f"parallel.expert {p.expert} must divide model.moe.num_experts {e.num_experts}",
    )
    if p.expert > 1:
        _check(
            data_parallel % p.expert == 0,
            f"parallel.expert {p.expert} must divide the data-parallel size {data_parallel} (experts are split "
            "over data-parallel ranks)",
        )
        _check(
            cfg.zero.stage <= 2,
            f"parallel.expert {p.expert} needs zero.stage 0-2 (DeepSpeed shards expert weights over their "
            "expert-data-parallel group at stages 1-2 and refuses MoE at stage 3)",
        )
        _check(
            p.pipeline == 1,
            f"parallel.expert {p.expert} cannot be combined with parallel.pipeline {p.pipeline} yet",
        )


def validate(cfg: Config, world_size: int) -> None:
    """Every layout/shape inconsistency, each reported as one line."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _check(cfg.precision in PRECISION_DTYPES, f"precision must be bf16|fp16|fp32, got {cfg.precision!r}")
    _check(
        cfg.activation_checkpointing in ("none", "full", "selective"),
        f"activation_checkpointing must be none|full|selective, got {cfg.activation_checkpointing!r}",
    )
    _check(
        cfg.optim.decay in ("cosine", "linear", "constant"),
        f"optim.decay must be cosine|linear|constant, got {cfg.optim.decay!r}",
    )
    _check(
        cfg.optim.name in ("adamw", "adam", "sgd", "rmsprop"),
        f"optim.name must be adamw|adam|sgd|rmsprop, got {cfg.optim.name!r}",
    )
    o = cfg.optim
    for name, ok, rule in (  # what torch's optimizers refuse only after start-up, and what trains nothing
        ("lr", o.lr > 0, "> 0"),
        (
            "min_lr",
            0 <= o.min_lr and (o.min_lr <= o.lr or o.decay == "constant"),
            f">= 0 and <= optim.lr ({o.lr:g})",
        ),
        ("weight_decay", o.weight_decay >= 0, ">= 0"),
        ("beta1", 0 <= o.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= o.beta2 < 1, "in [0, 1)"),
        ("eps", o.eps > 0, "> 0"),
        ("momentum", 0 <= o.momentum < 1, "in [0, 1)"),
        ("grad_clip", o.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("warmup_steps", o.warmup_steps >= 0, ">= 0"),
    ):
        _check(ok, f"optim.{name} must be {rule}, got {getattr(o, name)!r}")
    _check(
        0 < cfg.optim.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}"
    )
    validate_finetune(cfg)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        _check(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _check(
        m.max_position_embeddings is None or m.max_position_embeddings >= m.seq_length,
        f"model.max_position_embeddings ({m.max_position_embeddings}) is below model.seq_length "
        f"({m.seq_length}): the export would declare a shorter context than the model trains at; raise it",
    )
    _check(
        m.vocab_size is not None and m.vocab_size > 0,
        "model.vocab_size is not set and no data.tokenizer gives it",
    )
    _check(
        p.tensor >= 1 and p.pipeline >= 1 and p.context >= 1,
        "parallel.tensor, parallel.pipeline and parallel.context must be >= 1",
    )
    model_parallel = p.tensor * p.pipeline * p.context
    _check(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by parallel.tensor*parallel.pipeline"
        + ("*parallel.context" if p.context > 1 else "")
        + f" = {p.tensor}*{p.pipeline}"
        + (f"*{p.context}" if p.context > 1 else ""),
    )
    _check(
        m.family in MODEL_FAMILIES,
        f"model.family {m.family!r} is not one of {', '.join(MODEL_FAMILIES)}",
    )
    validate_model_variant(m)
    if m.family == "bert":
        validate_masking(cfg.data.masking)
        _check(
            cfg.data.masking.sentence_pair == "none" or m.type_vocab_size >= 2,
            f"model.type_vocab_size {m.type_vocab_size}: data.masking.sentence_pair "
            f"{cfg.data.masking.sentence_pair} puts segment B at token type 1 (needs >= 2, or sentence_pair none)",
        )
    heads, kv_heads = ("model.num_attention_heads", m.num_attention_heads), ("model.num_kv_heads", m.kv_heads)
    tensor = ("parallel.tensor", p.tensor)
    pairs = [
        (heads, kv_heads),
        (heads, tensor),
        (kv_heads, tensor),
        (("model.ffn_hidden_size", m.ffn_size), tensor),
    ]
    if m.kv_channels is None:  # the head width is hidden/heads
        pairs.insert(0, (("model.hidden_size", m.hidden_size), heads))
    for (name, value), (divisor_name, divisor) in pairs:
        _check(value % divisor == 0, f"{name} {value} is not divisible by {divisor_name} {divisor}")
    _check(
        m.num_layers >= p.pipeline,
        f"model.num_layers {m.num_layers} is fewer than parallel.pipeline {p.pipeline} stages",
    )
    _check(cfg.zero.stage in (0, 1, 2, 3), f"zero.stage must be 0-3, got {cfg.zero.stage}")
    _check(
        cfg.zero.grad_reduce_dtype in ("fp32", "model"),
        f"zero.grad_reduce_dtype must be fp32|model, got {cfg.zero.grad_reduce_dtype!r}",
    )
    _check(
        not (p.pipeline > 1 and cfg.zero.stage >= 2),
        f"zero.stage {cfg.zero.stage} cannot be combined with parallel.pipeline {p.pipeline} "
        "(DeepSpeed's pipeline engine supports ZeRO 0-1)",
    )
    _check(
        not (cfg.zero.offload_optimizer and cfg.zero.stage == 0),
        "zero.offload_optimizer needs zero.stage >= 1",
    )
    _check(
        not (p.sequence_parallel and p.tensor == 1), "parallel.sequence_parallel needs parallel.tensor > 1"
    )
    _check(
        not (
            p.sequence_parallel and (cfg.model.family != "llama" or cfg.finetune.task not in ("none", "sft"))
        ),
        "parallel.sequence_parallel is supported for llama pretraining and SFT (model.family "
        f"{cfg.model.family}, finetune.task {cfg.finetune.task})",
    )
    _check(
        not (p.sequence_parallel and cfg.finetune.lora.rank),
        f"parallel.sequence_parallel cannot be combined with finetune.lora.rank {cfg.finetune.lora.rank} "
        "yet (the adapters would see a sequence shard of a column-parallel projection's input)",
    )
    _check(
        not (cfg.debug.skip_norm_grad_reduce and not p.sequence_parallel),
        "debug.skip_norm_grad_reduce needs parallel.sequence_parallel (it is a control of that feature)",
    )
    _check(
        not (p.sequence_parallel and cfg.model.seq_length % p.tensor),
        f"parallel.sequence_parallel: model.seq_length {cfg.model.seq_length} must be divisible by "
        f"parallel.tensor {p.tensor} (each tensor rank holds seq_length / tensor positions)",
    )
    _check(
        p.partition_method in ("parameters", "uniform"),
        "parallel.partition_method must be parameters|uniform",
    )
    validate_context_parallel(cfg)
    dp = world_size // model_parallel
    validate_moe(cfg, dp)
    _check(t.micro_batch_size > 0 and t.steps >= 0, "train.micro_batch_size must be > 0 and train.steps >= 0")
    _check(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        f"train.global_batch_size {t.global_batch_size} is not divisible by train.micro_batch_size*data-parallel "
        f"size = {t.micro_batch_size}*{dp}",
    )
    _check(t.log_interval > 0, "train.log_interval must be > 0")
    _check(t.nonfinite in ("skip", "stop"), f"train.nonfinite must be skip|stop, got {t.nonfinite!r}")
    _check(t.max_consecutive_skips >= 1, "train.max_consecutive_skips must be >= 1")
    _check(t.dist_timeout_minutes > 0, "train.dist_timeout_minutes must be > 0")
    _check(
        t.spike_sigma >= 0 and t.spike_window >= 2, "train.spike_sigma must be >= 0, train.spike_window >= 2"
    )
    _check(
        not t.spike_rollback or (cfg.checkpoint.save and t.spike_sigma > 0),
        "train.spike_rollback needs train.spike_sigma > 0 and checkpoint.save (it reloads the last checkpoint)",
    )
    from bigtrain.checkpoint_files import SAVE_FAULT_POINTS

    _check(
        cfg.debug.kill_in_save in ("", *SAVE_FAULT_POINTS),
        f"debug.kill_in_save must be one of {', '.join(SAVE_FAULT_POINTS)}, got {cfg.debug.kill_in_save!r}",
    )
    _check(
        not (cfg.data.mock and cfg.data.train is not None and cfg.finetune.task == "none"),
        f"data.mock=true trains on random tokens and ignores data.train={cfg.data.train}: set data.mock=false "
        "(or drop data.train)",
    )
    _check(
        not cfg.data.document_mask or (m.family == "llama" and cfg.finetune.task == "none"),
        f"data.document_mask is for llama pretraining (model.family {m.family}, finetune.task "
        f"{cfg.finetune.task}); fine-tuning masks per example with finetune.packing",
    )
    _check(
        cfg.data.mock or cfg.data.train is not None or cfg.finetune.task != "none",
        "data.train is not set (a prefix, a glob, or [[weight, prefix], ...]); data.mock=true for random tokens",
    )


def validate_finetune(cfg: Config) -> None:
    f, lora = cfg.finetune, cfg.finetune.lora
    _check(f.task in FINETUNE_TASKS, f"finetune.task must be {'|'.join(FINETUNE_TASKS)}, got {f.task!r}")
    if f.task == "none":
        return
    family_tasks = {"llama": ("sft", "classify"), "bert": ("classify", "token_classify")}
    tasks = family_tasks.get(cfg.model.family, ())
    _check(
        f.task in tasks,
        f"finetune.task {f.task} is not available for model.family {cfg.model.family} (it has: {', '.join(tasks)})",
    )
    _check(f.train is not None, "finetune.train is not set (JSONL path, glob or list)")
    _check(cfg.data.tokenizer is not None, "data.tokenizer is not set (fine-tuning reads text)")
    _check(f.overlong in ("truncate", "drop"), f"finetune.overlong must be truncate|drop, got {f.overlong!r}")
    _check(f.epochs >= 0 and f.patience >= 0, "finetune.epochs and finetune.patience must be >= 0")
    _check(
        0 <= f.freeze_layers <= cfg.model.num_layers,
        f"finetune.freeze_layers {f.freeze_layers} is not in 0..model.num_layers",
    )
    metrics = ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1")
    _check(
        f.metric in (metrics if f.task in ("classify", "token_classify") else metrics[:1]),
        f"finetune.metric {f.metric!r} is not available for task {f.task}",
    )
    _check(lora.rank >= 0 and 0 <= lora.dropout < 1, "finetune.lora.rank must be >= 0, dropout in [0, 1)")
    bad = [t for t in lora.targets if t not in ("qkv", "proj", "gate_up", "down")]
    _check(not bad and bool(lora.targets), f"finetune.lora.targets: unknown {bad} (qkv|proj|gate_up|down)")
    _check(
        not (lora.rank and (f.freeze_layers or f.freeze_embeddings or f.freeze_router)),
        "finetune.lora freezes the whole base model already; drop finetune.freeze_*",
    )
    _check(
        not f.freeze_router or cfg.model.moe.num_experts > 0,
        "finetune.freeze_router needs a MoE model (model.moe.num_experts > 0)",
    )
    dense = [t for t in lora.targets if t in ("gate_up", "down")]
    _check(
        not (lora.rank and dense and cfg.model.moe.num_experts),
        f"finetune.lora.targets {dense}: a MoE model's blocks route to experts, which take no LoRA adapters yet; "
        "target the attention (qkv, proj)",
    )


# ---------------------------------------------------------------------------- loading and overrides
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")
_EXAMPLES = {int: "an integer like 1000 or 1e5", float: "a number like 3e-4, 0.0003 or 1e5"}


def _number(value: Any, tp: type, key: str) -> int | float:
    """A YAML value for an int/float field. PyYAML (YAML 1.1) reads ``3e-4`` and ``1e5`` as strings
    (its floats need a dot: ``3.0e-4``), so decimal strings are numbers here; an int field takes only
    integral values (``1e5``, ``2.0``). Anything else raises ConfigError showing an accepted form."""
    wrong = ConfigError(f"{key}: expected {tp.__name__} ({_EXAMPLES[tp]}), got {value!r}")
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        value = int(text) if text.lstrip("+-").isdigit() else float(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong
    if not math.isfinite(value):  # .inf/.nan: no field means them (an inf LR trained NaN weights silently)
        raise ConfigError(f"{key}: expected a finite {tp.__name__} ({_EXAMPLES[tp]}), got {value!r}")
    if tp is float:
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise wrong
        value = int(value)
    if abs(value) >= 2**63:  # 1e100 steps: megatron would try to index that many samples
        raise ConfigError(f"{key}: {value:.3g} does not fit a 64-bit integer")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML value against a field's annotation. Numbers written as YAML strings (``3e-4``) and
    integral floats for int fields are converted; nothing else is (see :func:`_number`)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(args) == 1:  # ``X | None``: X's own message, which shows an accepted form
            raise ConfigError(
                errors[0].replace(f"expected {args[0].__name__}", f"expected null or {args[0].__name__}", 1)
            )
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp in (int, float):
        return _number(value, tp, key)
    if tp in (str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known under {prefix or 'top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` with the value parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or defaults), apply ``--set`` overrides, type-check. Call ``resolve`` next."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    tree.pop("derived", None)  # a saved, resolved config can be loaded back
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return _build(Config, tree)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with a checkpoint (``derived`` is recomputed by ``resolve``)."""
    data = {k: v for k, v in data.items() if k != "derived"}
    return _build(Config, data)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """Every key with its default and documentation, for ``--help-config``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "derived":
            continue
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            lines += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{prefix}{f.name} = {default!r}    # {f.metadata.get('help', '')}")
    return lines
