"""Import a Hugging Face ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``Phi3ForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` (text),
``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM`` directory as a weights-only bigtrain checkpoint at a
chosen tensor x pipeline layout (the families are bigtrain's decoder with config-driven variants: rotary
scaling, q/k/v biases, q/k norm, head width, sliding window, Phi-3's fused tensors, Gemma 2/3's block,
``model.moe`` experts, every expert in the weight files, which expert-parallel ranks split at load;
``OlmoeForCausalLM`` is refused: its q/k norm spans all heads); ``model.hf_model_type``
keeps the family for the export), or a BERT encoder (``BertForPreTraining``; ``BertForMaskedLM`` and
``BertModel``, whose missing pooler / heads start from the layout table's init, seeded by
``train.seed``, and are listed in the output) as ``model.family: bert``.

    python tools/convert_from_hf.py --hf HF_DIR --output CKPT_DIR --tensor-parallel 2 --pipeline-parallel 2

Writes, in the format ``checkpoint.load=CKPT_DIR`` (and the exporter, inspector and generator) read:

    CKPT_DIR/latest                        -> step_00000000
    CKPT_DIR/config.yaml                   bigtrain config reproducing the HF architecture
                                           (--config for training/evaluation; checkpoint.load points here)
    CKPT_DIR/step_00000000/bigtrain.json   {step 0, consumed_samples 0, layout, config, source}
    CKPT_DIR/step_00000000/weights/tpTT_ppPP.safetensors   fp32, by layout key
    CKPT_DIR/step_00000000/tokenizer/      the HF directory's tokenizer files (data.tokenizer points here)

Names, fused QKV/gate-up layouts, vocab padding and tensor-parallel slicing all come from the one
table in ``bigtrain.models.layout`` (the exporter uses the same table backwards).

Pipeline stages: each ``ppPP`` file holds exactly the layers that DeepSpeed's ``PipelineModule`` with the
config's ``parallel.partition_method`` puts on stage PP (computed with DeepSpeed's own partitioners from
the table's per-layer parameter counts; with tied embeddings the last stage holds the embedding too, as
``TiedLayerSpec`` does), so the files look like a checkpoint trained at that layout. Loading does not
depend on it: ``WeightReader`` maps every key to its file.

Memory: one pipeline stage's shards (1/P of the model, fp32) plus the HF tensors of one parameter.
Nothing is written to CKPT_DIR until everything has succeeded (temporary directory, then rename).
Unsupported architectures (other families, output/MLP biases, dynamic or other rotary scaling, partial
rotary, other activations, per-layer attention types other than Qwen's window rule; for BERT relative
positions, decoder or cross-attention use, an untied MLM decoder, ...) stop the import with the field
named (exit status 2; other failures: 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from bigtrain.config import Config, ConfigError, config_from_dict
from bigtrain.models import layout

SUPPORTED = layout.HF_IMPORT_ARCHITECTURES
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",  # WordPiece (BERT) vocabularies ship it beside tokenizer.json
    "bigtrain_tokenizer.json",  # the bigtrain Tokenizer's own record, when the directory came from bigtrain
)
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")  # buffers old exports carry


# HF architectures close to a supported one that bigtrain cannot compute, and why (named in the refusal)
NOT_EXPRESSIBLE = {
    "olmoe": "OlmoeForCausalLM's q_norm/k_norm are RMSNorms over the whole query/key projection (one "
    "statistic over all heads, weights [heads*head_dim]); bigtrain's model.qk_norm normalizes each head on "
    "its own (Qwen3, Gemma 3), which computes something else",
}


class ConversionError(ValueError):
    """The HF directory cannot be imported; the message names the cause."""


class UnsupportedModel(ConversionError):
    """The HF model is not an architecture bigtrain computes (the message names the field); exit 2."""


# ---------------------------------------------------------------------------- config
def unsupported_fields(hf: dict) -> list[str]:
    """Every reason this HF config is not bigtrain's architecture, each naming the field."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or [SUPPORTED.get(model_type, ("?",))[0]]
    if model_type in NOT_EXPRESSIBLE:
        return [f"architecture {archs[0]} (model_type {model_type!r}): {NOT_EXPRESSIBLE[model_type]}"]
    if model_type not in SUPPORTED or archs[0] not in SUPPORTED[model_type]:
        return [
            f"architecture {archs[0]} (model_type {model_type!r}) is not supported; "
            f"supported: {', '.join(a for names in SUPPORTED.values() for a in names)}"
        ]
    if model_type == "bert":
        return unsupported_bert_fields(hf)
    problems = []
    act, want = (
        ("hidden_activation", "gelu_pytorch_tanh")
        if model_type in ("gemma2", "gemma3_text")
        else ("hidden_act", "silu")
    )
    if hf.get(act, want) != want:
        problems.append(f"{act}={hf[act]!r} ({model_type}'s MLP in bigtrain is gated with {want})")
    if hf.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=true (bigtrain's decoder is causal)")
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (a bias on the attention output projection; bigtrain has none)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (bigtrain's MLP has no bias)")
    for dropout in ("resid_pdrop", "embd_pdrop"):
        if hf.get(dropout):
            problems.append(f"{dropout}={hf[dropout]} (bigtrain has no dropout)")
    if model_type in layout.MOE_HF_TYPES:
        problems += unsupported_moe_fields(hf)
    rope = layout.hf_rope_scaling(hf)
    kind = rope.get("type", "default")
    if kind == "dynamic":
        problems.append(
            "rope scaling type 'dynamic' (dynamic NTK rescales rotary only at inference past "
            "max_position_embeddings; not a training setting)"
        )
    elif kind not in ROPE_TYPES:
        problems.append(
            f"rope scaling type {kind!r} (rope_scaling/rope_parameters; supported: {', '.join(ROPE_TYPES)})"
        )
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={partial} (bigtrain rotates the whole head)")
    layer_types = hf.get("layer_types")
    if layer_types and not problems:
        try:
            m = config_from_dict({"model": layout.model_values_from_hf(hf)}).model
        except ConfigError as e:  # bigtrain_config names it
            return [str(e)]
        expected = layout.hf_layer_types(m)
        if list(layer_types) != expected:
            problems.append(
                f"layer_types {layer_types} (bigtrain's window rule gives {expected}: the window from block "
                "max_window_layers on, or all but every sliding_window_pattern-th block for Gemma)"
            )
    return problems


def unsupported_moe_fields(hf: dict) -> list[str]:
    """What bigtrain's MoE blocks (``bigtrain.models.moe``) do not compute in a Mixtral / Qwen2-MoE config."""
    problems = []
    if hf.get("router_jitter_noise"):
        problems.append(
            f"router_jitter_noise={hf['router_jitter_noise']} (multiplicative noise on the router input while "
            "training; bigtrain's router has none)"
        )
    if hf["model_type"] != "qwen2_moe":
        return problems
    if hf.get("use_sliding_window"):
        problems.append(
            "use_sliding_window=true (Qwen2-MoE windows every other block below max_window_layers; bigtrain's "
            "window rule is another)"
        )
    if not hf.get("num_experts", 60):
        problems.append("num_experts=0 (a Qwen2-MoE without experts; import it as a dense qwen2)")
    if not hf.get("shared_expert_intermediate_size", 5632):
        problems.append("shared_expert_intermediate_size=0 (bigtrain's qwen2_moe has a gated shared expert)")
    step, layers = hf.get("decoder_sparse_step") or 1, hf.get("num_hidden_layers", 0)
    sparse = {i for i in range(int(layers)) if (i + 1) % step == 0}
    forced = sorted(sparse & set(hf.get("mlp_only_layers") or ()))
    if forced:
        problems.append(
            f"mlp_only_layers={hf['mlp_only_layers']} makes sparse block(s) {forced} dense (bigtrain's sparse "
            f"blocks are exactly every decoder_sparse_step={step}-th, model.moe.layer_freq)"
        )
    return problems


def unsupported_bert_fields(hf: dict) -> list[str]:
    """What bigtrain's bert (``bigtrain.models.bert``: absolute learned positions, exact GELU, a
    bidirectional encoder with the MLM decoder tied to the word embeddings) does not compute."""
    problems = []
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        problems.append(
            f"position_embedding_type={position!r} (bigtrain's bert has absolute learned positions)"
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (bigtrain's bert MLP uses the exact GELU, 'gelu')")
    if hf.get("is_decoder"):
        problems.append("is_decoder=true (bigtrain's bert is a bidirectional encoder)")
    if hf.get("add_cross_attention"):
        problems.append("add_cross_attention=true (bigtrain's bert has no cross-attention)")
    if hf.get("tie_word_embeddings") is False:
        problems.append(
            "tie_word_embeddings=false (an untied MLM decoder; bigtrain's bert decodes with the word embeddings)"
        )
    return problems


def complete_config(raw: dict) -> dict:
    """config.json plus transformers' defaults for the fields it leaves out (what ``from_pretrained``
    would use: e.g. Mistral's default sliding window and kv heads differ from Llama's)."""
    if raw.get("model_type") not in SUPPORTED:
        return dict(raw)
    try:
        from transformers import AutoConfig

        full = AutoConfig.for_model(**raw).to_dict()
    except Exception:  # transformers rejects it (e.g. incomplete rope scaling): check the raw fields
        return dict(raw)
    return {**full, **{k: v for k, v in raw.items() if full.get(k) is None}}


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    hf = complete_config(json.loads(path.read_text()))
    problems = unsupported_fields(hf)
    if problems:
        raise UnsupportedModel(f"{hf_dir / 'config.json'}: cannot import: " + "; ".join(problems))
    return hf


# The training length an import's config.yaml starts with when the model declares a longer context
# (Llama 3.2: 131072): windows that long would rarely be what continued pretraining wants, and the
# export keeps declaring the model's own context (model.max_position_embeddings).
IMPORT_SEQ_LENGTH = 4096


def bigtrain_config(hf: dict, tensor: int, pipeline: int, partition_method: str) -> Config:
    """A resolved bigtrain config whose model section is the HF architecture (raises ConfigError);
    ``model.seq_length`` is the declared context capped at :data:`IMPORT_SEQ_LENGTH`; a MoE model at
    ``tensor`` > 1 gets ``parallel.sequence_parallel`` (what megatron-core's MoE layer needs there)."""
    model = layout.model_values_from_hf(hf)
    if "max_position_embeddings" in model:
        model["seq_length"] = min(int(model["max_position_embeddings"]), IMPORT_SEQ_LENGTH)  # type: ignore[call-overload]
    parallel = {"tensor": tensor, "pipeline": pipeline, "partition_method": partition_method}
    if tensor > 1 and "moe" in model:  # megatron-core's MoE layer under TP needs sequence parallelism
        parallel["sequence_parallel"] = True
    tree = {
        "model": model,
        "parallel": parallel,
        "data": {"mock": True},  # weights only: set data.train (and data.mock=false) to train on it
    }
    return config_from_dict(tree).resolve(tensor * pipeline)


# ---------------------------------------------------------------------------- weights
class HFWeights:
    """Tensors by HF name from a directory's safetensors files (sharded with an index, or one file).
    ``architecture``: the HF class that saved them; names are the table's (``BertModel``'s lack the
    ``bert.`` prefix the table's carry: :data:`layout.HF_STRIPPED_PREFIX`)."""

    def __init__(self, hf_dir: Path, architecture: str = ""):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            found = sorted(p.name for p in hf_dir.glob("*.bin")) or ["no weight files"]
            raise ConversionError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json ({', '.join(found)}); "
                "re-save the model with save_pretrained(safe_serialization=True)"
            )
        missing_files = sorted({f for f in weight_map.values() if not (hf_dir / f).is_file()})
        if missing_files:
            raise ConversionError(
                f"{hf_dir}: weight file(s) listed in the index are missing: {', '.join(missing_files)}"
            )
        self.dir, self.architecture = hf_dir, architecture
        stripped = layout.HF_STRIPPED_PREFIX.get(architecture, "")
        self.weight_map = {stripped + name: f for name, f in weight_map.items()}  # by the table's names
        self.stored = {stripped + name: name for name in weight_map}
        self.absent = layout.HF_ABSENT_PREFIXES.get(architecture, ())

    def fresh(self, lp: layout.LayerParam, m) -> bool:
        """The parameter is not in checkpoints of this architecture (initialized from the table)."""
        names = layout.hf_names(lp, m)
        return bool(names) and all(n.startswith(self.absent) for n in names)  # startswith(()): False

    def check_names(self, m) -> None:
        """Exactly the table's tensors that this architecture stores (tied copies: see :meth:`check_tied`)."""
        expected = {n for n in layout.hf_tensor_names(m) if not n.startswith(self.absent)}
        tied = layout.HF_TIED_ALIASES.get(m.hf_model_type, {})
        present = {n for n in self.weight_map if not n.endswith(IGNORED_TENSOR_SUFFIXES) and n not in tied}
        if m.tie_embeddings:
            present.discard("lm_head.weight")  # tied: transformers ignores a saved copy too
        missing, unexpected = sorted(expected - present), sorted(present - expected)
        if unexpected:
            hint = (
                " (bigtrain's architecture has biases only on qwen2's q/k/v projections)"
                if any(".bias" in n for n in unexpected)
                else ""
            )
            raise ConversionError(f"{self.dir}: unsupported tensor(s) {', '.join(unexpected[:6])}{hint}")
        if missing:
            raise ConversionError(f"{self.dir}: tensor(s) missing from the weights: {', '.join(missing[:6])}")

    def check_tied(self, m) -> None:
        """A stored copy of a tied tensor (bert's MLM decoder) must equal what it is tied to: an untied
        decoder is another model."""
        for alias, target in layout.HF_TIED_ALIASES.get(m.hf_model_type, {}).items():
            if alias in self.weight_map and not torch.equal(self.get(alias), self.get(target)):
                raise UnsupportedModel(
                    f"{self.dir}: {alias} differs from {target} (an untied MLM decoder; "
                    "bigtrain's bert decodes with the word embeddings)"
                )

    def get(self, name: str) -> torch.Tensor:
        """The tensor of the table's HF name ``name``, as fp32."""
        from safetensors import safe_open

        with safe_open(str(self.dir / self.weight_map[name]), "pt") as f:
            return f.get_tensor(self.stored[name]).float()


def tokenizer_files(hf_dir: Path) -> list[Path]:
    return [hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]


def convert(
    hf_dir: str | Path,
    output: str | Path,
    tensor: int = 1,
    pipeline: int = 1,
    partition_method: str = "parameters",
    progress: bool | None = None,
) -> Path:
    """Write the bigtrain checkpoint; returns CKPT_DIR. Nothing is left at ``output`` on failure."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    hf_dir, out = Path(hf_dir).resolve(), Path(output).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not empty; choose a new --output directory")
    hf = read_hf_config(hf_dir)
    cfg = bigtrain_config(hf, tensor, pipeline, partition_method)
    m, padded = cfg.model, cfg.derived.padded_vocab_size
    if m.seq_length < m.context_length:
        print(
            f"convert_from_hf: config.yaml trains at model.seq_length={m.seq_length} (the model declares "
            f"{m.context_length}, kept for the export); set model.seq_length to train on longer windows"
        )
    weights = HFWeights(hf_dir, (hf.get("architectures") or [""])[0])
    weights.check_names(m)
    weights.check_tied(m)
    dropout = {k: hf[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if hf.get(k)}
    if m.family == "bert" and dropout:
        listed = ", ".join(f"{k}={v}" for k, v in dropout.items())
        print(
            f"convert_from_hf: note: bigtrain's bert trains without dropout; {listed} kept for the export only"
        )
    fresh = [lp for lp in layout.iter_layer_params(m) if weights.fresh(lp, m)]
    if fresh:
        names = ", ".join(n for lp in fresh for n in layout.hf_names(lp, m))
        print(
            f"convert_from_hf: {weights.architecture} has no {names}: initialized fresh "
            f"(the layout table's init, train.seed {cfg.train.seed})"
        )
    from bigtrain.checkpoint import LATEST, META, tag_for  # heavy (megatron-core): after the cheap checks
    from bigtrain.checkpoint_files import write_manifest

    tag = tag_for(0)
    toks = tokenizer_files(hf_dir)
    cfg.data.tokenizer = str(out / tag / "tokenizer") if toks else None
    cfg.checkpoint.load = str(out)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / tag / "weights").mkdir(parents=True)
        parts = layout.pipeline_parts(m, padded, tensor, pipeline, partition_method)
        total = sum(len(layout.stage_params(m, parts, s)) for s in range(pipeline))
        bar = tqdm(
            total=total, desc="import", unit="tensor", disable=None if progress is None else not progress
        )
        for stage in range(pipeline):
            shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor)]
            for lp in layout.stage_params(m, parts, stage):
                bar.set_postfix_str(f"stage {stage} {lp.key}")
                if weights.fresh(lp, m):
                    full = layout.init_full(lp.spec, lp.index, m, padded, cfg.train.seed)
                else:
                    full = layout.from_hf(lp, {n: weights.get(n) for n in layout.hf_names(lp, m)}, m, padded)
                for rank in range(tensor):
                    shards[rank][lp.key] = layout.shard(full, lp.spec.split, rank, tensor).clone()
                bar.update()
            for rank, tensors in enumerate(shards):
                save_file(tensors, str(tmp / tag / "weights" / f"tp{rank:02d}_pp{stage:02d}.safetensors"))
        bar.close()
        if toks:
            (tmp / tag / "tokenizer").mkdir()
            for f in toks:
                shutil.copy2(f, tmp / tag / "tokenizer" / f.name)
        else:
            print(
                f"convert_from_hf: warning: {hf_dir} has no tokenizer files; data.tokenizer is unset",
                file=sys.stderr,
            )
        meta = {
            "step": 0,
            "consumed_samples": 0,
            "layout": {"tensor": tensor, "pipeline": pipeline},
            "config": cfg.to_dict(),
            "source": {"hf": str(hf_dir), "hf_config": hf, "pipeline_parts": parts},
        }
        (tmp / tag / META).write_text(json.dumps(meta, indent=2))
        write_manifest(tmp / tag, {}, step=0)  # sizes + checksums, so loads can verify the import
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        (tmp / LATEST).write_text(tag)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf", required=True, help="Hugging Face model directory (config.json + safetensors)"
    )
    parser.add_argument("--output", required=True, help="new checkpoint directory (checkpoint.load=OUTPUT)")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--partition-method", choices=("parameters", "uniform"), default="parameters")
    args = parser.parse_args(argv)
    try:
        out = convert(
            args.hf, args.output, args.tensor_parallel, args.pipeline_parallel, args.partition_method
        )
    except UnsupportedModel as e:
        print(f"convert_from_hf: {e}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        print(f"convert_from_hf: the HF model does not fit this layout: {e}", file=sys.stderr)
        sys.exit(1)
    except (ConversionError, FileNotFoundError, KeyError) as e:
        print(f"convert_from_hf: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out} (tensor={args.tensor_parallel}, pipeline={args.pipeline_parallel})")


if __name__ == "__main__":
    main()
