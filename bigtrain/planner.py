"""Per-GPU memory estimate and layout planner.

Memory is predicted term by term from what bigtrain and DeepSpeed really allocate (names below are
DeepSpeed's): the tests compare the model-state terms with tensors accounted on every rank of a
DP=2 run (ZeRO 0-3, :mod:`bigtrain.memory`), and the activation terms with the bytes autograd saves in
one forward of bigtrain's model (none/selective/full).

- **States** (held from one step to the next, at the end of the backward pass): parameters,
  gradients (or this rank's gradient partition), optimizer states (fp32 masters + Adam moments,
  partitioned over the data x context ranks from ZeRO-1 on), and ZeRO-3's gradient bucket
  (``reduce_bucket_size`` elements, allocated once) and its always-gathered small parameters.
- **Activations** (saved for backward, per micro-batch, summed over the micro-batches a pipeline
  stage holds in flight under 1F1B). Per block and token, with ``a`` bytes per activation element:
  two RMSNorms each keep an fp32 copy of their input, an fp32 ``rsqrt`` per token, the normalized
  input and the scaled output (``4h + 4 + 2ah``); attention keeps SDPA's q, k, v (contiguous copies
  of the rotated q and k and of v), its output and fp32 log-sum-exp, and the out-projection input (a
  copy of that output in ``[s, b, heads*d]``): ``a(3h + 2kvd)/tp + 4 nq/tp`` on every device; SwiGLU
  keeps ``[gate; up]``, silu(gate) and their product (``4af/tp``). ``selective`` recomputes the
  attention core, dropping its output and log-sum-exp; with fused SDPA there is no ``seq x seq``
  matrix to drop, so it saves little. ``full`` keeps only each block's input (``ah``). The output
  layer adds the fp32 (log-)softmax of the logits (``4V/tp``, V the rows it multiplies) and the final
  norm. Verified on CPU in fp32 and bf16 (tests/test_planner.py). Per rank under sequence parallelism the
  norms (and full recomputation's block inputs) hold ``s/tp`` positions; under context parallelism
  (Ulysses) every term holds this rank's ``s/cp`` positions, the attention core's ``[s, heads/cp]``
  being the same bytes; the all-to-alls save nothing. Measured per rank on 2 gloo processes (DP2, TP2,
  TP2+SP, CP2; tools/bench_activation_memory.py) within 8 bytes.
- **Transient** (alive only around the peak): full recompute rebuilds one block in backward; the
  logits' gradient (fp32, plus a bf16 copy under bf16); the gathered parameters of ZeRO-3; the
  gradient reduction buckets of ZeRO-1/2.

The bert family (``model.family: bert``; the terms in :func:`block_activation_bytes` and
:func:`output_activation_bytes` say what each keeps): parameters from :func:`bigtrain.flops.layer_parameters`
(word/position/token-type embeddings and their LayerNorm, biased post-LN blocks, pooler, MLM transform and
decoder bias, NSP; the MLM decoder weight is the tied word embedding), activations of the post-LN block
(LayerNorm inputs and statistics, the GELU MLP's input and output, SDPA's tensors and its padding bias),
no rotary tables, the MLM head's activations and fp32 log-softmax over every position. Communication: the
same TP all-reduces per block as the decoder (the pooler, MLM transform and NSP are replicated), DP reduces
of the parameter bytes, the padding mask riding with the pipeline's activations. Held against transformers
until bigtrain's own encoder can be measured: ``BertForPreTraining``'s parameter count exactly, and the
bytes one fp32 ``BertLayer`` saves exactly, less the out-projection input copy HF's ``[b, s, h]`` layout
does not make (tests/test_planner.py).

Mixture of experts (``model.moe``, :class:`Layout` ``expert``): parameters per rank hold
``num_experts / expert`` experts of each MoE block (:func:`bigtrain.flops.layer_parameters`); ZeRO-1/2
partition the experts' gradients and optimizer state over their expert-data-parallel group (``data /
expert`` ranks, :attr:`Layout.expert_shards`), the dense ones over all data ranks (checked by hand against
bigtrain's model in tests/test_planner.py). The MoE MLP's activations are an estimate
(:func:`moe_mlp_activation_bytes`, not yet held to saved-tensor accounting), and the dispatcher's
all-to-alls are ``expert_all_to_all`` in :func:`comm_bytes` (timed over the intra-node bandwidth when
tensor x expert fits a node). The expert gradients' reduction over the smaller expert-data group is
counted with the dense ones (``data_*``), not apart.

GPU plans also reserve a fixed overhead (CUDA context, NCCL buffers) and an allocator margin.

Throughput is a model too, for ranking layouts; it does not replace a measurement (``tools/bench.py``).
Seconds per optimizer step (:func:`step_time`): compute at a matmul efficiency that grows with tokens
per micro-batch, the 1F1B bubble ``(pp-1)/(m+pp-1)``, the collectives' payload (:func:`comm_bytes`:
DP gradient all-reduces, reduce-scatters and parameter all-gathers, ZeRO-3's gathers, TP all-reduces
or, under SP, all-gathers and reduce-scatters, CP's Ulysses all-to-alls)
times the ring factor over a bus bandwidth, DP traffic partly hidden by overlap, and for optimizer
offload the gradient and parameter copies over the host link plus Adam on the host's cores
(:func:`offload_time`). :func:`rank` orders the layouts and demotes offload where a layout fits without
it (``OFFLOAD_MARGIN``).

Validated on CPU: the collective volumes, byte for byte, against the ``torch.distributed`` calls of real
2-rank gloo pretraining steps (DP2 ZeRO-0/1/2/3, TP2, TP2+SP, CP2; tests/test_comm_volume.py), and the CPU-Adam rate
against DeepSpeedCPUAdam timed here (tests/test_planner.py::test_cpu_adam_default_matches_a_measurement_here).
Awaiting a GPU: the bandwidths (NVLink/InfiniBand bus bandwidth, host link), how much DP traffic overlap
hides, the matmul efficiency curve, the ZeRO-3 hook overhead, pipeline p2p (its payload is
:func:`pipeline_p2p_bytes`, shown by ``--explain``; not timed), and the
re-gather beyond DeepSpeed's reuse distance, which a model this small never reaches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from itertools import product
from typing import Any

from bigtrain import flops
from bigtrain.config import Config, ConfigError, ModelConfig, padded_vocab_size, torch_dtype, validate

GIB = 2**30
CHECKPOINTING = ("none", "selective", "full")
# GPU planning: CUDA context + NCCL communicators + cuBLAS workspaces, and allocator fragmentation.
GPU_OVERHEAD_BYTES = 1.5 * GIB
ALLOCATOR_MARGIN = 0.08
# Ranking policy for optimizer offload. Its terms above are optimistic: effective host-link bandwidth is
# often far below PCIe peak (pageable copies, a link shared with NICs and data loading), DeepSpeedCPUAdam
# slows when its threads are not pinned to the rank's cores (DeepSpeed PR #7474 measured 1.3x from
# --bind_cores_to_rank), and data loading competes for the same host cores and memory bandwidth. So an
# offload layout ranks after every fitting no-offload layout unless it is predicted faster than the best
# of them by more than this fraction; the numbers shown stay the model's.
OFFLOAD_MARGIN = 0.10


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero: int = 0
    micro_batch: int = 1
    checkpointing: str = "none"
    offload: bool = False
    sequence_parallel: bool = False  # Megatron SP over the tensor group (TP > 1)
    context: int = 1  # context-parallel size (DeepSpeed-Ulysses): each rank holds seq / context positions
    expert: int = 1  # expert-parallel size (MoE): each rank holds num_experts / expert experts, within data

    @classmethod
    def of(cls, cfg: Config) -> Layout:
        """The layout ``cfg`` (resolved) trains at."""
        p = cfg.parallel
        return cls(
            tensor=p.tensor,
            pipeline=p.pipeline,
            data=cfg.derived.data_parallel_size,
            zero=cfg.zero.stage,
            micro_batch=cfg.train.micro_batch_size,
            checkpointing=cfg.activation_checkpointing,
            offload=cfg.zero.offload_optimizer,
            sequence_parallel=p.sequence_parallel,
            context=p.context,
            expert=p.expert,
        )

    @property
    def gpus(self) -> int:
        """The world: tensor x context x data x pipeline (expert parallelism is carved out of data)."""
        return self.tensor * self.context * self.data * self.pipeline

    @property
    def shards(self) -> int:
        """Ranks ZeRO partitions over and the gradient reduction spans: data x context (as Megatron)."""
        return self.data * self.context

    @property
    def expert_shards(self) -> int:
        """Ranks holding the same experts (the expert-data-parallel group): ZeRO partitions the expert
        parameters' optimizer state and gradients over these, data / expert."""
        return self.shards // self.expert

    def describe(self) -> str:
        off = "+offload" if self.offload else ""
        sp = "+SP" if self.sequence_parallel else ""
        cp = f" CP{self.context}" if self.context > 1 else ""
        ep = f" EP{self.expert}" if self.expert > 1 else ""
        return (
            f"TP{self.tensor}{sp}{cp} PP{self.pipeline} DP{self.data}{ep} ZeRO-{self.zero}{off} "
            f"mbs{self.micro_batch} ckpt={self.checkpointing}"
        )


@dataclass
class MemoryEstimate:
    """Bytes per GPU (the heaviest rank)."""

    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    buffers: float = 0.0
    activations: float = 0.0
    transient: float = 0.0
    cpu_offloaded: float = 0.0  # optimizer state kept in host memory (not in the total)

    @property
    def states(self) -> float:
        """Model + optimizer state held between steps (what ZeRO partitions)."""
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def total(self) -> float:
        return self.states + self.activations + self.transient

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "states": self.states, "total": self.total}


# ---------------------------------------------------------------------------- parameters per rank
def _balanced_max(weights: list[int], parts: int) -> int:
    """Smallest possible heaviest part when cutting ``weights`` into ``parts`` contiguous parts
    (what DeepSpeed's ``partition_method: parameters`` aims for)."""
    lo, hi = max(weights), sum(weights)
    while lo < hi:
        cap = (lo + hi) // 2
        count, load = 1, 0
        for w in weights:
            if load + w > cap:
                count, load = count + 1, 0
            load += w
        if count <= parts:
            hi = cap
        else:
            lo = cap + 1
    return lo


def stage_parameters(m: ModelConfig, vocab: int, tp: int, pp: int, ep: int = 1) -> int:
    """Parameters on the heaviest pipeline stage of one tensor (and ``ep`` expert-parallel) rank."""
    layers = flops.layer_parameters(m, vocab, tp, ep)
    heaviest = _balanced_max(layers, pp)
    if pp > 1 and m.tie_embeddings:  # the last stage holds a copy of the tied word embedding (DeepSpeed's
        # TiedLayerSpec: the decoder's whole embedding module; bert's tied head owns the word embedding
        # only), at least the last block, and the entries after it
        word = flops.embedding_parameters(m, vocab, tp)[0]
        heaviest = max(heaviest, word + sum(layers[m.num_layers :]))
    return heaviest


def _small_parameters(m: ModelConfig, vocab: int, tp: int, pp: int, threshold: int) -> int:
    """ZeRO-3 keeps tensors under ``stage3_param_persistence_threshold`` elements whole on every rank."""
    blocks = math.ceil(m.num_layers / pp)
    small = blocks * sum(n for n in flops.block_parameters(m, tp) if n < threshold)
    # embedding, final norm, output layer (bert: the embedding's tensors and the heads')
    return small + sum(n for n in flops.end_tensors(m, vocab, tp) if 0 < n < threshold)


# ---------------------------------------------------------------------------- model states
def reduce_bucket_elements(cfg: Config, tp: int, pp: int) -> int:
    """The gradient bucket handed to DeepSpeed: ``zero.reduce_bucket_size`` capped at the parameters of
    one pipeline stage's tensor-parallel shard, since no bucket ever holds more (ZeRO-3 allocates the
    bucket whole: 500M elements would be 1-2 GB even for a tiny model)."""
    vocab = padded_vocab_size(cfg.model, tp)
    return min(cfg.zero.reduce_bucket_size, stage_parameters(cfg.model, vocab, tp, pp))


def reduce_bytes(cfg: Config) -> int:
    """Bytes per gradient element in the data-parallel reduction (DeepSpeed's communication_data_type)."""
    return 4 if cfg.precision == "fp32" or cfg.zero.grad_reduce_dtype == "fp32" else 2


def state_memory(cfg: Config, layout: Layout) -> MemoryEstimate:
    """Parameters, gradients, optimizer states and ZeRO buffers per GPU (heaviest rank)."""
    m, z = cfg.model, cfg.zero
    vocab = padded_vocab_size(cfg.model, layout.tensor)
    p = stage_parameters(m, vocab, layout.tensor, layout.pipeline, layout.expert)
    # ZeRO partitions over data x context; a rank's experts (num_experts / expert of them, EP needs one
    # pipeline stage) over the data / expert ranks holding the same ones: ``n`` is the one partition
    # count giving the same partition, p / n = (p - p_e) / shards + p_e / expert_shards
    n: float = layout.shards
    if layout.expert > 1:
        p_e = flops.expert_parameters(m, layout.tensor, layout.expert)
        n = p / ((p - p_e) / layout.shards + p_e / layout.expert_shards)
    stage = layout.zero
    mixed = cfg.precision != "fp32"
    if mixed and stage == 0:
        stage = 1  # bigtrain runs bf16/fp16 ZeRO-0 as ZeRO-1 (engine.deepspeed_config)
    w = torch_dtype(cfg.precision).itemsize  # parameter / gradient element bytes
    est = MemoryEstimate()
    adam = 8.0 * p  # exp_avg + exp_avg_sq, fp32
    # fp32 training: the master *is* the parameter (compat.share_fp32_master_partitions)
    master = 4.0 * p if mixed else 0.0
    if stage == 0:  # fp32 only
        est.parameters, est.gradients = w * p, w * p
        est.optimizer = adam + master
    elif stage in (1, 2):
        est.parameters = w * p
        if cfg.precision == "bf16" and stage == 1:
            est.gradients = 4.0 * p  # full fp32 accumulation buffer (data_types.grad_accum_dtype)
        else:
            est.gradients = w * p / n  # this rank's reduced partition
        est.optimizer = (adam + master) / n
    else:
        small = _small_parameters(
            m, vocab, layout.tensor, layout.pipeline, z.stage3_param_persistence_threshold
        )
        est.parameters = w * ((p - small) / n + small)
        est.gradients = w * p / n
        est.optimizer = (adam + master) / n
        # the gradient bucket, allocated whole in the reduction's dtype
        est.buffers = reduce_bytes(cfg) * reduce_bucket_elements(cfg, layout.tensor, layout.pipeline)
    if layout.offload and stage >= 1:
        est.cpu_offloaded = est.optimizer + (4.0 * p / n if mixed else 0.0)
        est.optimizer = 0.0
    return est


# ---------------------------------------------------------------------------- activations
def block_activation_bytes(
    m: ModelConfig, tokens: int, a: int, tp: int, checkpointing: str, sp: int = 1, context: int = 1
) -> float:
    """Bytes one transformer block saves for backward for ``tokens`` tokens of a micro-batch (this rank's:
    ``micro_batch x seq_length / context``).

    Sequence parallelism (``sp`` = the tensor size under ``parallel.sequence_parallel``, else 1): what lies
    outside the tensor-parallel regions holds ``tokens / sp`` positions: the two RMSNorms (their fp32
    input copies, statistics, normalized input and output; the QKV and MLP matmuls save that output, the
    shard megatron's linears gather again in backward), and under full recomputation the block input.
    Attention and MLP are the tensor-parallel regions: whole sequence, ``1/tp`` of the heads and features,
    as without SP (Korthikanti et al. 2022: ``sbh(10 + 24/t)`` -> ``sbh(34/t)`` without recomputation;
    the measured split here is the norms' ``24h + 8`` bytes per token in fp32). So SP alone at TP2 saves
    about a quarter without recomputation and half under full recomputation (tests/test_planner.py).

    Context parallelism (``context``, DeepSpeed-Ulysses): ``tokens`` already counts this rank's
    ``seq/context`` positions; the attention core runs on the whole sequence for ``heads/context`` of the
    heads, ``[s, b, heads/(tp context), d]``: the same bytes as ``[s/context, b, heads/tp, d]``, so
    every term keeps its per-token form; the rotary copies cover this rank's ``seq/context`` rows.

    Attention keeps SDPA's q, k, v (contiguous ``[b, heads, s, d]`` copies), its output and log-sum-exp,
    and the out-projection's input (a copy: ``[b, heads, s, d]`` -> ``[s, b, heads*d]``); the QKV input
    is the norm's output (counted there). Selective recomputation drops SDPA's output and log-sum-exp.
    Held to saved-tensor accounting on CPU (tests/test_planner.py).

    bert (post-LN, no rotary; ``model.family: bert``): the QKV input is the block input (the previous
    LayerNorm's output, saved by nothing else) ``ah``; attention as the decoder's with ``kvd = h`` (q, k, v
    as SDPA is given them, its output and log-sum-exp, the out-projection input) plus the padding mask as
    the attention bias SDPA keeps (``[b, 1, 1, s]``, ``a`` per token); each LayerNorm keeps its input (the
    residual sum, ``ah``) and fp32 mean and rstd (8), the MLP its input (the first LayerNorm's output,
    ``ah``), the GELU input and output (``2af/tp``). Biases keep nothing (their gradient is a sum of the
    output gradient). No dropout is assumed (bigtrain's bert has no dropout setting); each hidden dropout
    would add a 1-byte mask per element. Checked against HF ``BertLayer`` (dropout 0, fp32) in
    tests/test_planner.py."""
    h, kvd, nq, f = m.hidden_size, m.kv_heads * m.head_dim, m.num_attention_heads, m.ffn_size
    if checkpointing == "full":
        return tokens * a * h / sp  # the block input only
    if flops.is_encoder(m):
        kept = a * (5 * h + 2 * f) / tp + 4 * nq / tp + a  # SDPA's tensors and bias, the GELU MLP
        if checkpointing == "selective":  # the core is recomputed: its output and log-sum-exp
            kept -= a * h / tp + 4 * nq / tp
        return tokens * (kept + 4 * a * h + 16)  # QKV and MLP inputs, the two LayerNorms
    norms = 2 * (4 * h + 4 + 2 * a * h) / sp
    attention = a * (3 * h + 2 * kvd) / tp + 4 * nq / tp
    if checkpointing == "selective":  # the core is recomputed: its output and log-sum-exp
        attention -= a * h / tp + 4 * nq / tp
    mlp = 4 * a * f / tp
    if m.moe.num_experts:  # the mean over blocks of the MoE blocks' and the dense ones' MLP terms
        share = sum(m.moe.is_moe_block(i) for i in range(m.num_layers)) / m.num_layers
        mlp = share * moe_mlp_activation_bytes(m, a, tp) + (1 - share) * mlp
    # cos/sin: the cached fp32 tables are shared (counted once, in activation_memory); other dtypes
    # keep a converted copy per use (q and k), i.e. 4 x [s, d] per block, this rank's rows under CP
    rotary = 0 if a == 4 else 4 * m.seq_length // context * m.head_dim * a
    return tokens * (norms + attention + mlp) + rotary


def moe_mlp_activation_bytes(m: ModelConfig, a: int, tp: int) -> float:
    """Bytes per token a MoE block's MLP saves (an estimate, not yet held to saved-tensor accounting):
    each of the token's ``top_k`` expert copies keeps what a SwiGLU of width ``fe`` keeps (``4 a fe/tp``),
    the dispatcher's permuted input and the experts' output before combining (``2 k a h``), the router's
    fp32 logits, probabilities and routing weights (``12 E``); a shared expert as the dense SwiGLU."""
    e = m.moe
    experts = e.top_k * (4 * a * m.expert_ffn_size / tp + 2 * a * m.hidden_size)
    return experts + 12 * e.num_experts + 4 * a * e.shared_expert_ffn_size / tp


def output_activation_bytes(m: ModelConfig, tokens: int, a: int, vocab: int, tp: int, sp: int = 1) -> float:
    """Final norm, the fp32 (log-)softmax the cross entropy keeps, loss bookkeeping. ``vocab``: the
    rows the output layer multiplies (:func:`bigtrain.flops.output_vocab`). ``sp``: the final norm holds
    ``tokens / sp`` positions under sequence parallelism (the output layer gathers the sequence: logits
    and loss are whole-sequence, ``1/tp`` of the vocabulary).

    bert: the MLM head on every position keeps the transform's input (the last block's output) and output
    (the GELU input), the GELU output (the LayerNorm input) with the LayerNorm's fp32 statistics, and the
    decoder's input (``4ah + 8``); pooler and NSP keep the [CLS] input, the tanh output and the fp32 NSP
    log-softmax once per sequence (``(2ah + 8) / s`` per token), no final norm."""
    h = m.hidden_size
    if flops.is_encoder(m):
        head = 4 * a * h + 8 + (2 * a * h + 8) / m.seq_length
    else:
        head = (4 * h + 4 + 2 * a * h) / sp  # the final RMSNorm
    # + the loss's bookkeeping: int64 target ids and the float loss mask; megatron's vocab-parallel
    # cross entropy (tensor size > 1) also keeps a bool target mask: 12 or 13 bytes/token
    bookkeeping = 12 if tp == 1 else 13
    return tokens * (head + 4 * vocab / tp + bookkeeping)


def embedding_activation_bytes(m: ModelConfig, tokens: int, a: int, tp: int = 1) -> float:
    """Bytes the embedding keeps for ``tokens`` tokens: the int64 token ids, and at ``tp`` > 1 megatron's
    vocab-parallel bool mask of the ids outside this rank's rows (whole sequence, also under SP); bert
    also the int64 token type ids and its LayerNorm's input (the sum of the three embeddings, ``ah``) and
    fp32 statistics."""
    mask = 1 if tp > 1 else 0
    if flops.is_encoder(m):
        return tokens * (16 + a * m.hidden_size + 8 + mask)
    return (8 + mask) * tokens


def activation_memory(cfg: Config, layout: Layout) -> tuple[float, float]:
    """(saved activations, transient peak on top) in bytes on the heaviest pipeline stage: this rank's
    ``micro_batch x seq_length / context`` tokens; the sequence-parallel terms as
    :func:`block_activation_bytes` says."""
    m = cfg.model
    a = torch_dtype(cfg.precision).itemsize
    vocab = padded_vocab_size(cfg.model, layout.tensor)
    tokens = layout.micro_batch * m.seq_length // layout.context
    sp = layout.tensor if layout.sequence_parallel else 1
    pp = layout.pipeline
    accum = max(1, cfg.train.global_batch_size // (layout.micro_batch * layout.data))
    in_flight = min(pp, accum)  # 1F1B: the first stage holds pp micro-batches
    blocks_per_stage = math.ceil(m.num_layers / pp)
    block = block_activation_bytes(m, tokens, a, layout.tensor, layout.checkpointing, sp, layout.context)
    embedding = embedding_activation_bytes(m, tokens, a, layout.tensor)
    first = in_flight * (blocks_per_stage * block + embedding)
    out_vocab = flops.output_vocab(m, vocab, layout.tensor)
    out = output_activation_bytes(m, tokens, a, out_vocab, layout.tensor, sp)
    last = blocks_per_stage * block + out
    saved = max(first, last) if pp > 1 else blocks_per_stage * block + out + embedding
    if layout.checkpointing != "full" and not flops.is_encoder(m):
        # the cached fp32 rotary tables of the whole sequence (inside the recompute otherwise)
        saved += 8 * m.seq_length * m.head_dim
    # transient: gradient of the logits (fp32, plus the activation-dtype copy the matmul takes)
    transient = tokens * vocab / layout.tensor * (4 + (a if a != 4 else 0))
    if layout.checkpointing == "full":
        # one block rebuilt
        transient += block_activation_bytes(m, tokens, a, layout.tensor, "none", sp, layout.context)
    return saved, transient


def estimate(cfg: Config, layout: Layout) -> MemoryEstimate:
    """Everything per GPU for ``layout`` (model states + activations + transient peaks)."""
    est = state_memory(cfg, layout)
    est.activations, est.transient = activation_memory(cfg, layout)
    m = cfg.model
    vocab = padded_vocab_size(cfg.model, layout.tensor)
    w = torch_dtype(cfg.precision).itemsize  # parameter bytes
    if layout.zero == 3:  # gathered parameters in flight: one block + the prefetch bucket
        block = flops.block_matmul_params(m) // layout.tensor
        est.transient += w * (2 * block + min(cfg.zero.stage3_prefetch_bucket_size, vocab * m.hidden_size))
    elif cfg.precision == "bf16" and layout.zero <= 1:
        # DeepSpeed's bf16 optimizer reduces its fp32 gradients through the engine's all-reduce, flattened
        # in buckets of 500M elements (not zero.reduce_bucket_size), cast to the reduction's dtype; one
        # data-parallel rank skips it (compat.skip_identity_allreduce)
        if layout.shards > 1:
            p = stage_parameters(m, vocab, layout.tensor, layout.pipeline)
            est.transient += (4 + reduce_bytes(cfg)) * min(500_000_000, p)
    elif layout.zero in (1, 2) or (cfg.precision != "fp32" and layout.zero == 0):
        est.transient += w * reduce_bucket_elements(cfg, layout.tensor, layout.pipeline)  # reduction bucket
    return est


# ---------------------------------------------------------------------------- throughput model
# DeepSpeedCPUAdam (AVX-512 build), measured by measure_cpu_adam() on the 2-core development VM
# (Intel Xeon, 2 threads, 16M fp32 parameters, fastest of 5 steps): 7.0-7.4e8 parameters/s per thread
# in three runs. The planner scales it by Hardware.host_cores_per_gpu, capped by the host memory
# bandwidth of one GPU's share: Adam reads fp32 parameter, gradient and both moments and writes
# three of them back (CPU_ADAM_BYTES per parameter).
CPU_ADAM_PARAMS_PER_S_PER_CORE = 7.0e8
CPU_ADAM_BYTES = 28


def measure_cpu_adam(params: int = 16 * 2**20, steps: int = 5) -> tuple[float, str]:
    """(fp32 parameters updated per second per thread, backend) for one Adam step on this machine.

    Times DeepSpeed's ``DeepSpeedCPUAdam`` (the optimizer ZeRO offload runs) when its C++ op builds or
    loads here; otherwise falls back to ``torch.optim.AdamW(foreach=True)`` and says so in the backend
    name. Threads: ``torch.get_num_threads()``."""
    import time

    import torch

    p = torch.nn.Parameter(torch.zeros(params))
    p.grad = torch.randn(params)
    backend = "deepspeed-cpu-adam"
    opt: torch.optim.Optimizer
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam([p], lr=1e-3)
    except Exception:  # no compiler / op not loadable: the plain PyTorch path
        backend = "torch-adamw-foreach"
        opt = torch.optim.AdamW([p], lr=1e-3, foreach=True)
    opt.step()  # state allocation
    seconds = math.inf
    for _ in range(steps):  # the fastest step: the machine's rate, not its other load
        start = time.perf_counter()
        opt.step()
        seconds = min(seconds, time.perf_counter() - start)
    return params / seconds / torch.get_num_threads(), backend


@dataclass
class Hardware:
    peak_tflops: float = 989.0
    gpus_per_node: int = 8
    intra_node_gbps: float = 300.0  # effective all-reduce bus bandwidth, GB/s (NVLink)
    inter_node_gbps: float = 40.0  # per GPU (400 Gb/s InfiniBand)
    # optimizer offload (ZeRO-1/2 ``offload_optimizer``): every step each data-parallel rank sends its
    # gradient partition to the host and receives its updated parameter partition over its own link,
    # and the host runs Adam on that partition with its share of the cores
    host_link_gbps: float = 25.0  # effective GPU<->host copy bandwidth, GB/s (PCIe Gen4 x16; Gen5 ~50)
    host_cores_per_gpu: int = 12  # e.g. 2 x 48-core CPUs for 8 GPUs
    host_memory_gbps: float = 75.0  # host DRAM bandwidth per GPU's share (2 x ~300 GB/s for 8 GPUs)
    # DeepSpeed CPU Adam, fp32 parameters updated per second per core (measure_cpu_adam)
    cpu_adam_params_per_s_per_core: float = CPU_ADAM_PARAMS_PER_S_PER_CORE

    @property
    def cpu_adam_params_per_s(self) -> float:
        """CPU Adam throughput of one GPU's share of the host: its cores, capped by its memory bandwidth."""
        cores = self.cpu_adam_params_per_s_per_core * self.host_cores_per_gpu
        return min(cores, self.host_memory_gbps * 1e9 / CPU_ADAM_BYTES)


def matmul_efficiency(tokens_per_microbatch: int, hidden: int) -> float:
    """Fraction of peak a dense bf16 transformer step reaches; large GEMMs approach ~0.62 on H100
    (798/989 measured GEMM ceiling times non-matmul overheads), small ones fall off."""
    size = tokens_per_microbatch * hidden
    return 0.62 * size / (size + 2.0e6)


def offload_time(cfg: Config, layout: Layout, hw: Hardware, p: int) -> tuple[float, float]:
    """(host-link seconds, CPU Adam seconds) per optimizer step for optimizer offload, both exposed.

    Bytes per parameter of this data-parallel rank's partition (``p/n``) over its GPU's own link at
    ``hw.host_link_gbps``, as DeepSpeed 0.19 moves them with ``accum`` micro-batches per step and
    ``w``-byte parameters:

    - ZeRO-1 (bf16: fp32 gradient accumulation on the GPU): the gradient partition at the boundary,
      cast on the GPU to the fp32 master dtype (4), and the updated parameters back (``w``).
    - ZeRO-2 (no fp32 accumulation buffer): the same, plus, when ``accum > 1``, the gradients
      accumulated through a pinned host buffer: out after the first micro-batch, in and out after each
      later one (``async_accumulate_grad_in_cpu_via_gpu``): ``(2 accum - 1) w``.
    - ZeRO-3: the gradient partition buffer itself lives on the host: ``(2 accum - 1) w``, and the
      parameters back (``w``).

    The host runs Adam on ``p/n`` parameters at ``hw.cpu_adam_params_per_s``. Adam and the copy back
    run after backward; the gradient copies are issued during backward, but no DeepSpeed option
    overlaps them with compute (``overlap_comm`` concerns the reduction), so all are counted exposed."""
    part = p / layout.shards
    w = torch_dtype(cfg.precision).itemsize
    accum = max(1, cfg.train.global_batch_size // (layout.micro_batch * layout.data))
    host_accumulation = (2 * accum - 1) * w
    if layout.zero == 3:
        per_element = float(host_accumulation + w)
    else:
        per_element = 4.0 + w + (host_accumulation if layout.zero == 2 and accum > 1 else 0.0)
    pcie = part * per_element / (hw.host_link_gbps * 1e9)
    adam = part / hw.cpu_adam_params_per_s
    return pcie, adam


# DeepSpeed's stage3_max_reuse_distance default (bigtrain does not set it): a ZeRO-3 parameter stays
# gathered from its forward to its backward use when fewer elements are fetched in between
DS_MAX_REUSE_DISTANCE = 1_000_000_000


def comm_bytes(cfg: Config, layout: Layout) -> dict[str, float]:  # noqa: C901 - one term per group
    """Collective payload bytes per rank per optimizer step, by group and operation, as bigtrain (DeepSpeed
    0.19, megatron-core 0.16) issues them. Payload: the full buffer a rank passes (all-reduce: the tensor;
    reduce-scatter: its input; all-gather: its output); :func:`wire_factor` turns it into bytes each rank
    sends. Scalars (token count, loss mean, gradient norm, overflow flag) are left out. ``accum``
    micro-batches per step, ``p`` parameters of this rank's stage shard, ``w`` bytes per parameter, ``g``
    per reduced gradient (:func:`reduce_bytes`), ``a`` per activation:

    - ``data_all_reduce``: ZeRO-0 (fp32) all-reduces every gradient once, at the accumulation boundary
      (``p g``); ZeRO-1 too, and ZeRO-2 after every micro-batch (``accum p g``): DeepSpeed's stage 1/2
      reduction all-reduces its buckets (``use_multi_rank_bucket_allreduce``), it does not reduce-scatter.
      Mixed precision at ZeRO-0 runs as ZeRO-1.
    - ``data_all_gather``: ZeRO-1/2 gather the updated parameter partitions after the step (``p w``);
      ZeRO-3 gathers the non-persistent parameters (``p - s``, ``s`` under
      ``stage3_param_persistence_threshold``) for every forward, again in backward those whose
      forward-to-backward distance exceeds DeepSpeed's reuse distance (``p - s - R/2`` when positive), and
      the persistent ones once after the step (they are partitioned for it).
    - ``data_reduce_scatter``: ZeRO-3 reduce-scatters every gradient after every micro-batch (``accum p g``).
    - ``tensor_all_reduce`` (TP > 1, no sequence parallelism): per micro-batch of ``t`` tokens, each block's
      attention and MLP all-reduce ``[t, h]`` forward (row-parallel outputs) and backward (column-parallel
      input gradients): 4 per block; the vocab-parallel embedding's output and the output layer's input
      gradient add one each (the one on the stage that holds it); the vocab-parallel cross entropy adds
      three fp32 ``[t]`` (max logit, target logit, sum of exponentials) on the last stage. Full
      recomputation runs each block's forward again: 2 more per block.
    - Sequence parallelism (TP > 1): megatron-core's linears all-gather the ``[t, h]`` sequence before
      each column-parallel matmul and reduce-scatter after each row-parallel one, in place of the
      all-reduces (the same bytes on the wire: all-gather + reduce-scatter = all-reduce). Per block
      ``tensor_all_gather`` 6: 2 forward, 2 in backward (the reduce-scatters' gradients) and 2 more as the
      column-parallel linears gather their saved input shard again for the weight gradient;
      ``tensor_reduce_scatter`` 4 (2 forward, the 2 column-parallel input gradients); full recomputation
      adds 2 + 2. The embedding reduce-scatters its output (gathered back in backward), the output layer
      gathers its input (forward and again for its weight gradient) and reduce-scatters its input
      gradient. The norm weights' gradients, partial sums over sequence shards, are all-reduced over the
      tensor group (``2L + 1`` of ``[h]`` in the parameter dtype, ``w``); the cross entropy as above.
    - ``context_all_to_all`` (CP > 1, DeepSpeed-Ulysses): per block q, k, v go from sequence shards to head
      shards and the attention output back: 4 all-to-alls of this rank's ``[t/cp, b, heads/tp, d]`` (k
      and v at ``kv_heads``) forward, the same 4 backward, 4 more under full recomputation. ``data_*``
      then span the ``data x context`` ranks ZeRO partitions over; ``t`` counts this rank's tokens.

    - ``expert_all_to_all`` (MoE models only): megatron's all-to-all token dispatcher, per MoE block and
      micro-batch, sends each of this rank's routed tokens' ``top_k`` copies ``[t k, h]`` to their
      experts' ranks (dispatch) and back (combine), forward, and both again for the gradients in
      backward: 4 all-to-alls of ``t k h a`` (full recomputation: 6), ``t`` the tokens the router sees
      (``t/tp`` under sequence parallelism). Over the expert-parallel group (0 at EP1): with balanced
      routing ``(ep-1)/ep`` of each leaves the rank (:func:`wire_factor`). Expert tensor parallelism's
      gathers inside the dispatcher are not counted.

    Measured exactly with gloo by tests/test_comm_volume.py (DP2 ZeRO-0/1/2/3, TP2, TP2+SP, CP2 with and
    without full recomputation)."""
    m = cfg.model
    n, tp, pp = layout.shards, layout.tensor, layout.pipeline
    vocab = padded_vocab_size(m, tp)
    p = stage_parameters(m, vocab, tp, pp, layout.expert)
    w = a = torch_dtype(cfg.precision).itemsize  # parameters and activations share the dtype
    g = reduce_bytes(cfg)
    accum = max(
        1, cfg.train.global_batch_size // (layout.micro_batch * layout.data)
    )  # CP ranks share samples
    out = {
        "data_all_reduce": 0.0,
        "data_reduce_scatter": 0.0,
        "data_all_gather": 0.0,
        "tensor_all_reduce": 0.0,
        "tensor_all_gather": 0.0,
        "tensor_reduce_scatter": 0.0,
        "context_all_to_all": 0.0,
    }
    if n > 1:
        stage = 1 if layout.zero == 0 and cfg.precision != "fp32" else layout.zero
        if stage in (0, 1):
            out["data_all_reduce"] = p * g
        elif stage == 2:
            out["data_all_reduce"] = accum * p * g
        if stage in (1, 2):
            out["data_all_gather"] = p * w
        if stage == 3:
            s = _small_parameters(m, vocab, tp, pp, cfg.zero.stage3_param_persistence_threshold)
            regathered = max(0.0, p - s - DS_MAX_REUSE_DISTANCE / 2)
            out["data_all_gather"] = (accum * (p - s + regathered) + s) * w
            out["data_reduce_scatter"] = accum * p * g
    tokens = layout.micro_batch * m.seq_length // layout.context  # this rank's
    blocks = math.ceil(m.num_layers / pp)
    full = layout.checkpointing == "full"
    th = tokens * m.hidden_size * a  # one [t, h] activation
    if tp > 1 and not layout.sequence_parallel:
        ends = 2 if pp == 1 else 1  # embedding output, output-layer input gradient
        activation = ((6 if full else 4) * blocks + ends) * th
        out["tensor_all_reduce"] = accum * (activation + 3 * tokens * 4)
    elif tp > 1:
        embedding = 1 if pp == 1 else 0  # PP > 1: the last stage (output layer, final norm, loss)
        out["tensor_all_gather"] = accum * ((8 if full else 6) * blocks + embedding + 2) * th
        out["tensor_reduce_scatter"] = accum * ((6 if full else 4) * blocks + embedding + 1) * th
        norms = (2 * blocks + 1) * m.hidden_size * w
        out["tensor_all_reduce"] = accum * (norms + 3 * tokens * 4)
    if layout.context > 1:
        per_block = tokens * (2 * m.num_attention_heads + 2 * m.kv_heads) * m.head_dim // tp * a
        out["context_all_to_all"] = accum * (3 if full else 2) * blocks * per_block
    if m.moe.num_experts:
        out["expert_all_to_all"] = expert_all_to_all_bytes(cfg, layout) if layout.expert > 1 else 0.0
    return out


def expert_all_to_all_bytes(cfg: Config, layout: Layout) -> float:
    """Payload of the MoE token dispatcher's all-to-alls per rank and step (see :func:`comm_bytes`):
    ``accum x moe_blocks x (4, full recomputation 6) x t k h a``."""
    m = cfg.model
    sp = layout.tensor if layout.sequence_parallel else 1
    tokens = layout.micro_batch * m.seq_length // layout.context // sp  # the router's
    accum = max(1, cfg.train.global_batch_size // (layout.micro_batch * layout.data))
    moe_blocks = sum(m.moe.is_moe_block(i) for i in range(m.num_layers))
    moe_blocks = math.ceil(moe_blocks / layout.pipeline)
    per = tokens * m.moe.top_k * m.hidden_size * torch_dtype(cfg.precision).itemsize
    return accum * moe_blocks * (6 if layout.checkpointing == "full" else 4) * per


def pipeline_p2p_bytes(cfg: Config, layout: Layout) -> float:
    """Bytes a pipeline rank sends to its neighbour stages per optimizer step (0 at PP=1): per micro-batch
    the ``[t, h]`` activations forward and their gradient backward, both in the activation dtype; an inner
    stage sends both (``2 accum t h a``), the first and the last one each (``accum t h a``); under
    sequence parallelism each tensor rank sends its ``t/tp`` positions. bert also
    forwards its padding mask (assumed bool ``[b, s]``: ``t`` bytes, no gradient) with the activations.
    Reported, not timed by :func:`step_time` (point-to-point over NVLink, small beside compute at the
    layouts the planner ranks first; awaiting a measurement)."""
    pp = layout.pipeline
    if pp == 1:
        return 0.0
    m = cfg.model
    tokens = layout.micro_batch * m.seq_length
    accum = max(1, cfg.train.global_batch_size // (layout.micro_batch * layout.data))
    sp = layout.tensor if layout.sequence_parallel else 1  # stages exchange [t/tp, h] under SP
    hidden = tokens // sp * m.hidden_size * torch_dtype(cfg.precision).itemsize
    mask = tokens if flops.is_encoder(m) else 0
    return accum * ((2 if pp > 2 else 1) * hidden + mask)


def wire_factor(op: str, n: int) -> float:
    """Bytes each of ``n`` ranks sends per payload byte with ring algorithms: all-reduce ``2(n-1)/n``,
    reduce-scatter, all-gather and all-to-all ``(n-1)/n`` (what NCCL's bus bandwidth is quoted against)."""
    if n <= 1:
        return 0.0
    return (2.0 if op.endswith("all_reduce") else 1.0) * (n - 1) / n


def step_time(cfg: Config, layout: Layout, hw: Hardware) -> dict[str, float]:
    """Predicted seconds per optimizer step, by component; communication is :func:`comm_bytes` over the
    bus bandwidth of its group."""
    m = cfg.model
    vocab = padded_vocab_size(cfg.model, layout.tensor)
    gpus = layout.gpus
    tokens = cfg.train.global_batch_size * m.seq_length
    out_vocab = flops.output_vocab(m, vocab, layout.tensor)
    # every rank runs 1/gpus of the step's FLOPs: context ranks each compute the attention of heads/cp over
    # the whole sequence (flops.attention_flops_per_token counts it per token of the whole sequence)
    hw_flops = flops.hardware_flops_per_token(m, out_vocab, layout.checkpointing) * tokens
    rows = layout.micro_batch * m.seq_length // layout.context  # the matmuls' rows on one rank
    eff = matmul_efficiency(rows, m.hidden_size // layout.tensor)
    compute = hw_flops / gpus / (hw.peak_tflops * 1e12 * eff)
    accum = cfg.train.global_batch_size // (layout.micro_batch * layout.data)
    volume = comm_bytes(cfg, layout)
    tp_bw = (hw.intra_node_gbps if layout.tensor <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9
    tp_comm = (
        sum(volume[k] * wire_factor(k, layout.tensor) for k in volume if k.startswith("tensor_")) / tp_bw
    )
    # Ulysses all-to-all: each rank sends (cp-1)/cp of its buffer, within a node when TP x CP fits one
    cp_bw = (
        hw.intra_node_gbps if layout.tensor * layout.context <= hw.gpus_per_node else hw.inter_node_gbps
    ) * 1e9
    cp_comm = volume["context_all_to_all"] * wire_factor("all_to_all", layout.context) / cp_bw
    # expert parallelism: ranks tp apart in the data dimension, within a node when TP x EP fits one
    ep_bw = (
        hw.intra_node_gbps if layout.tensor * layout.expert <= hw.gpus_per_node else hw.inter_node_gbps
    ) * 1e9
    ep_comm = volume.get("expert_all_to_all", 0.0) * wire_factor("all_to_all", layout.expert) / ep_bw
    bubble = (layout.pipeline - 1) / (accum + layout.pipeline - 1) if layout.pipeline > 1 else 0.0
    p = stage_parameters(m, vocab, layout.tensor, layout.pipeline)
    dp_nodes = gpus > hw.gpus_per_node
    dp_bw = (hw.inter_node_gbps if dp_nodes else hw.intra_node_gbps) * 1e9
    dp_comm = sum(volume[k] * wire_factor(k, layout.shards) for k in volume if k.startswith("data_")) / dp_bw
    exposed_dp = max(0.0, dp_comm - 0.5 * compute) if cfg.zero.overlap_comm else dp_comm
    zero3_overhead = 0.04 * compute if layout.zero == 3 else 0.0  # per-parameter hooks
    offload_pcie, offload_adam = offload_time(cfg, layout, hw, p) if layout.offload else (0.0, 0.0)
    busy = compute + tp_comm + cp_comm + ep_comm
    bubble_seconds = busy / (1 - bubble) - busy
    total = busy + bubble_seconds + exposed_dp + zero3_overhead + offload_pcie + offload_adam
    return {
        "compute": compute,
        "tensor_comm": tp_comm,
        "context_comm": cp_comm,
        "expert_comm": ep_comm,
        "bubble_fraction": bubble,
        "bubble": bubble_seconds,
        "data_comm": dp_comm,
        "data_comm_exposed": exposed_dp,
        "zero3_overhead": zero3_overhead,
        "offload_pcie": offload_pcie,
        "offload_adam": offload_adam,
        "total": total,
        "matmul_efficiency": eff,
    }


# ---------------------------------------------------------------------------- planning
@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    fits: bool
    seconds: dict[str, float]
    tokens_per_sec_per_gpu: float
    mfu: float
    why: str = ""
    demoted: bool = False  # an offload layout ranked after the fitting no-offload ones (rank())

    def as_dict(self) -> dict[str, Any]:
        return {
            "layout": asdict(self.layout),
            "memory_gib": {k: v / GIB for k, v in self.memory.as_dict().items()},
            "fits": self.fits,
            "step_seconds": self.seconds,
            "tokens_per_sec_per_gpu": self.tokens_per_sec_per_gpu,
            "mfu": self.mfu,
            "why": self.why,
            "demoted": self.demoted,
        }


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def layout_config(cfg: Config, layout: Layout) -> Config:
    """A copy of ``cfg`` set to ``layout`` and resolved for its world size (raises ConfigError). The
    sections the layout sets are copied; the others (model, data, ...) are shared with ``cfg``, read only
    (a deep copy per layout was most of a plan's time once SP and CP multiplied the layouts)."""
    p = replace(
        cfg.parallel,
        tensor=layout.tensor,
        pipeline=layout.pipeline,
        sequence_parallel=layout.sequence_parallel,
        context=layout.context,
        expert=layout.expert,
    )
    z = replace(cfg.zero, stage=layout.zero, offload_optimizer=layout.offload)
    t = replace(cfg.train, micro_batch_size=layout.micro_batch)
    c = replace(cfg, parallel=p, zero=z, train=t, activation_checkpointing=layout.checkpointing)
    world = layout.gpus
    validate(c, world)
    return c.resolve(world)


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int) -> list[Layout]:
    """Every layout bigtrain accepts for this model on ``gpus`` GPUs: TP within a node, sequence parallelism
    on or off at TP > 1, context parallelism where the config's validation allows it (llama, no pipeline,
    key/value heads per tensor rank divisible by it), also across nodes (its all-to-alls then over the
    inter-node bandwidth, :func:`step_time`)."""
    out = []
    # MoE: expert-parallel sizes dividing the experts (validation keeps those dividing data)
    experts = [
        e for e in _powers_of_two(cfg.model.moe.num_experts) if cfg.model.moe.num_experts % e == 0
    ] or [1]
    for tp in _powers_of_two(min(gpus, gpus_per_node)):
        for cp in _powers_of_two(gpus // tp):
            for pp in [d for d in range(1, gpus // (tp * cp) + 1) if (gpus // (tp * cp)) % d == 0]:
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for sp in (False, True) if tp > 1 else (False,):
                    for mbs in _powers_of_two(max(1, cfg.train.global_batch_size // dp)):
                        for zero in (0, 1, 2, 3):
                            for offload in (False, True) if zero else (False,):
                                for ckpt, ep in product(CHECKPOINTING, experts):
                                    layout = Layout(tp, pp, dp, zero, mbs, ckpt, offload, sp, cp, ep)
                                    try:
                                        layout_config(cfg, layout)
                                    except ConfigError:
                                        continue
                                    out.append(layout)
    return out


def evaluate(cfg: Config, layout: Layout, gpu_memory_bytes: float, hw: Hardware) -> Candidate:
    c = layout_config(cfg, layout)
    mem = estimate(c, layout)
    budget = gpu_memory_bytes * (1 - ALLOCATOR_MARGIN) - GPU_OVERHEAD_BYTES
    secs = step_time(c, layout, hw)
    gpus = layout.gpus
    tokens = c.train.global_batch_size * c.model.seq_length
    tps = tokens / secs["total"] / gpus
    vocab = flops.output_vocab(c.model, c.derived.padded_vocab_size, layout.tensor)
    model_flops = flops.train_flops_per_token(c.model, vocab)
    mfu = tps * model_flops / (hw.peak_tflops * 1e12)
    return Candidate(layout, mem, mem.total <= budget, secs, tps, mfu)


def explain(
    best: Candidate, ranked: list[Candidate], budget: float, offload_margin: float = OFFLOAD_MARGIN
) -> str:
    mem = best.memory
    parts = [
        f"{best.layout.describe()}: {mem.total / GIB:.1f} GiB of {budget / GIB:.1f} usable "
        f"(params {mem.parameters / GIB:.1f}, grads {mem.gradients / GIB:.1f}, optimizer "
        f"{mem.optimizer / GIB:.1f}, buffers {mem.buffers / GIB:.1f}, activations {mem.activations / GIB:.1f}, "
        f"transient {mem.transient / GIB:.1f})",
        f"predicted {best.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU, MFU {best.mfu:.0%}",
    ]
    s = best.seconds
    if s["bubble_fraction"]:
        parts.append(f"pipeline bubble {s['bubble_fraction']:.0%}")
    if s["tensor_comm"]:
        ops = "all-gathers and reduce-scatters" if best.layout.sequence_parallel else "all-reduces"
        parts.append(f"tensor-parallel {ops} {s['tensor_comm'] / s['total']:.0%} of the step")
    if best.layout.sequence_parallel:
        parts.append("sequence parallelism splits the norms' activations over the tensor ranks")
    if best.layout.context > 1:
        parts.append(_why_context(best, ranked))
    if best.layout.checkpointing != "none":
        parts.append(f"{best.layout.checkpointing} recomputation because nothing cheaper fits")
    demoted = sum(c.demoted for c in ranked)
    if best.demoted:  # shown first only because a filter (--only) left no better layout
        parts.append(best.why)
    elif best.layout.offload:
        plain = [c for c in ranked if c.fits and not c.layout.offload]
        parts.append(
            f"optimizer offload: predicted more than {offload_margin:.0%} faster than the best fitting "
            "no-offload layout"
            if plain
            else "optimizer offload because nothing fits without it"
        )
    elif demoted:
        parts.append(
            f"{demoted} fitting offload layouts ranked after the no-offload ones (none predicted more than "
            f"{offload_margin:.0%} faster; the offload terms are optimistic)"
        )
    larger = [c for c in ranked if c.layout == replace(best.layout, micro_batch=2 * best.layout.micro_batch)]
    if larger and not larger[0].fits:
        parts.append(
            f"micro-batch {larger[0].layout.micro_batch} would need {larger[0].memory.total / GIB:.1f} GiB"
        )
    return "; ".join(parts)


def _why_context(best: Candidate, ranked: list[Candidate]) -> str:
    """Why ``best`` splits the sequence: nothing fits without context parallelism, or the best layout
    without it is predicted slower (and by how much)."""
    cp = best.layout.context
    s = best.seconds
    share = f"the Ulysses all-to-alls {s['context_comm'] / s['total']:.0%} of the step"
    plain = [c for c in ranked if c.layout.context == 1]
    fitting = [c for c in plain if c.fits]
    if not fitting:
        smallest = min((c.memory.total for c in plain), default=math.inf)
        return (
            f"context parallelism CP{cp} because no layout without it fits (the smallest needs "
            f"{smallest / GIB:.1f} GiB); {share}"
        )
    other = fitting[0]
    slower = best.tokens_per_sec_per_gpu / other.tokens_per_sec_per_gpu - 1
    return (
        f"context parallelism CP{cp}: each rank holds seq/{cp} positions; the best layout without it "
        f"({other.layout.describe()}, {other.memory.total / GIB:.1f} GiB) is predicted {slower:.0%} slower; "
        f"{share}"
    )


def breakdown(cand: Candidate, cfg: Config | None = None) -> str:
    """Seconds per optimizer step by term for one layout (``tools/plan.py --explain``); the exposed
    terms add up to ``total``. With ``cfg``, also the collective payload per rank (:func:`comm_bytes`) and
    the pipeline's point-to-point payload (:func:`pipeline_p2p_bytes`, not in the total)."""
    s = cand.seconds
    rows = [
        ("compute", s["compute"]),
        ("tensor-parallel comm", s["tensor_comm"]),
        ("context-parallel all-to-all", s["context_comm"]),
        ("expert-parallel all-to-all", s["expert_comm"]),
        (f"pipeline bubble ({s['bubble_fraction']:.0%})", s["bubble"]),
        ("data-parallel comm exposed", s["data_comm_exposed"]),
        ("ZeRO-3 overhead", s["zero3_overhead"]),
        ("offload host link (PCIe)", s["offload_pcie"]),
        ("offload CPU Adam", s["offload_adam"]),
        ("total", s["total"]),
        ("data-parallel comm, all", s["data_comm"]),  # before overlap with backward (not in the total)
    ]
    head = f"{cand.layout.describe()}: seconds per step (matmul efficiency {s['matmul_efficiency']:.2f})"
    lines = [head] + [f"  {name:<28} {value:>9.4f}" for name, value in rows]
    if cfg is not None:
        resolved = layout_config(cfg, cand.layout)
        volume = {
            **comm_bytes(resolved, cand.layout),
            "pipeline_p2p": pipeline_p2p_bytes(resolved, cand.layout),
        }
        lines.append(
            "  payload per rank per step (GB): "
            + ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.3g}" for k, v in volume.items())
        )
    return "\n".join(lines + ([f"  {cand.why}"] if cand.demoted else []))


def rank(candidates: list[Candidate], offload_margin: float = OFFLOAD_MARGIN) -> list[Candidate]:
    """``candidates`` sorted best first: fitting before not fitting; among the fitting ones an offload
    layout whose predicted tokens/s/GPU does not beat the best fitting no-offload layout's by more than
    ``offload_margin`` (a fraction) is demoted after every fitting no-offload layout (``demoted`` set, its
    ``why`` says so); otherwise by predicted throughput, then by memory. When nothing fits without offload,
    offload layouts rank by throughput like any other. Raises ValueError for a negative margin."""
    if offload_margin < 0:
        raise ValueError(f"offload_margin must be >= 0, got {offload_margin}")
    plain = [c.tokens_per_sec_per_gpu for c in candidates if c.fits and not c.layout.offload]
    bar = max(plain) * (1 + offload_margin) if plain else math.inf
    for c in candidates:
        c.demoted = bool(plain) and c.fits and c.layout.offload and c.tokens_per_sec_per_gpu <= bar
        if c.demoted:
            c.why = (
                f"offload demoted: predicted {c.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU does not beat the "
                f"best fitting no-offload layout ({max(plain):,.0f}) by more than {offload_margin:.0%} "
                "(--offload-margin); the host-link and CPU-Adam terms are optimistic (effective host "
                "bandwidth below PCIe peak, unpinned CPU-Adam threads, host contention with data loading)"
            )
    return sorted(
        candidates, key=lambda c: (not c.fits, c.demoted, -c.tokens_per_sec_per_gpu, c.memory.total)
    )


def _layout_filter(only: dict[str, str]) -> Callable[[Layout], bool]:
    """A predicate on layouts from ``{field: value}`` (``tools/plan.py --only``), values parsed by the
    field's type (``offload=true|false``); ConfigError naming the field otherwise."""
    types = {f.name: str(f.type) for f in fields(Layout)}  # "int" | "bool" | "str" (postponed annotations)
    wanted: dict[str, object] = {}
    for name, text in only.items():
        if name not in types:
            raise ConfigError(f"--only {name}: not a layout field (one of {', '.join(types)})")
        kind = types[name]
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                wanted[name] = text.lower() == "true"
            else:
                wanted[name] = int(text) if kind == "int" else text
        except ValueError:
            expected = "true or false" if kind == "bool" else "an integer"
            raise ConfigError(f"--only {name}={text}: expected {expected}") from None
    return lambda layout: all(getattr(layout, k) == v for k, v in wanted.items())


def plan(
    cfg: Config,
    gpus: int,
    gpu_memory_gib: float,
    nodes: int = 1,
    hw: Hardware | None = None,
    offload_margin: float = OFFLOAD_MARGIN,
    only: dict[str, str] | None = None,
) -> list[Candidate]:
    """Layouts ranked by :func:`rank` (fitting first, by predicted tokens/s/GPU, offload demoted within
    ``offload_margin`` of a fitting no-offload layout), kept where every ``only`` field (a :class:`Layout`
    field name -> its value as text) matches; the first has ``why`` filled. Demotion compares with every
    layout, filtered or not. ConfigError for an unknown field or a value of the wrong type."""
    keep = _layout_filter(only or {})
    hw = hw or Hardware()
    if gpus % nodes:
        raise ConfigError(f"--gpus {gpus} is not divisible by --nodes {nodes}")
    hw.gpus_per_node = gpus // nodes
    budget = gpu_memory_gib * GIB * (1 - ALLOCATOR_MARGIN) - GPU_OVERHEAD_BYTES
    ranked = rank(
        [
            evaluate(cfg, layout, gpu_memory_gib * GIB, hw)
            for layout in candidate_layouts(cfg, gpus, hw.gpus_per_node)
        ],
        offload_margin,
    )
    everything, ranked = ranked, [c for c in ranked if keep(c.layout)]
    if ranked and ranked[0].fits:
        ranked[0].why = explain(ranked[0], everything, budget, offload_margin)
    elif ranked:
        ranked[0].why = (
            f"nothing fits in {budget / GIB:.1f} usable GiB per GPU; smallest needs "
            f"{min(c.memory.total for c in ranked) / GIB:.1f} GiB"
        )
    return ranked
