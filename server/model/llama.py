"""Our Llama-family forward pass (Llama, Mistral, Qwen2), gpt-fast style.

Module and parameter names mirror Hugging Face's `LlamaForCausalLM` exactly
(`model.layers.{i}.self_attn.q_proj.weight`, ...), so a checkpoint's safetensors
load by name with no renaming, and adapter code can address target modules by the
names PEFT uses.

Differences from HF that matter for serving:
- the KV cache is owned by the caller (`KVCache`, paged) and addressed through each
  row's block table; every row in a forward has its own length, so requests of different ages share a
  batch (continuous batching);
- rope positions and cache positions are separate inputs, so a row may hold
  tokens that are not part of its rope sequence (prefix-tuning KV written before
  the prompt);
- logits are computed only where asked (the last token of each row by default).

Shapes: B batch rows, T new tokens per row, L attended cache length,
H query heads, Hkv key/value heads, D head dim, E hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.model import fused_ops
from server.model.attention import attend, decode_attend
from server.model.gate_layers import group_gates
from server.model.kv_cache import KVCache


@dataclass(frozen=True)
class ModelArgs:
    """The parts of a HF config the forward needs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        model_type = config.model_type
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(
                f"unsupported model_type {model_type!r}: this server runs llama, mistral and qwen2 checkpoints"
            )
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}: only silu is implemented")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            attention_bias = bool(getattr(config, "attention_bias", False))
            qkv_bias = o_bias = attention_bias
            mlp_bias = bool(getattr(config, "mlp_bias", False))
        sliding_window = getattr(config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            sliding_window = None
        return cls(
            architecture=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding_window,
        )


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the cos/sin scaling factor, as transformers computes them.

    Uses transformers' own rope initialisers so that llama3, linear and yarn scaling
    match the reference exactly. Dynamic NTK changes with the sequence length and is
    not supported.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' is not supported: its frequencies change with sequence length")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, then scale in the input dtype: HF's exact order of casts (fused_ops.rms_norm_reference).
        return fused_ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, acc: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(acc + other), acc + other) in one kernel call where it can; acc's storage may hold the sum."""
        return fused_ops.add_rms_norm(acc, other, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.sliding_window = args.sliding_window
        e, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(e, args.num_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(e, args.num_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(e, args.num_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * d, e, bias=args.o_bias)
        # server.model.gate_layers.PrefixGateSlots once adapter slots are installed (UniPELT's gated prefix)
        self.prefix_gate = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: "StepInputs") -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*D], [B, T, Hkv*D] x2
        gate = None if self.prefix_gate is None else self.prefix_gate.gates(x)  # rows with a gated prefix (UniPELT)
        if gate is None and not isinstance(step, FlatStep):  # decode on CPU: the compiled kernel, views only
            out = decode_attend(self.layer_idx, q, k, v, cos, sin, step, self.sliding_window, self.num_kv_heads)
            if out is not None:
                return self.o_proj(out)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if isinstance(step, FlatStep):  # b tokens of t = 1, attention per group of rows
            out = torch.cat([self._attend(g, *(x[g.start:g.stop] for x in (q, k, v, cos, sin)), gate=gate)
                             for g in step.groups])  # [N, H*D]
            return self.o_proj(out.view(b, t, -1))
        return self.o_proj(attend(self.layer_idx, q, k, v, cos, sin, step, self.sliding_window, gate))  # [B, T, E]

    def _attend(self, g: "StepInputs", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, gate=None) -> torch.Tensor:
        """One group of a flat forward: q [n, H, 1, D], k/v [n, Hkv, 1, D], cos/sin [n, 1, 1, D] with
        n = rows * t, row-major -> [n, H*D]."""
        rows, t = g.cache_pos.shape
        def grouped(x):  # [n, h, 1, D] -> [rows, h, t, D]
            return x[:, :, 0].reshape(rows, t, x.shape[1], self.head_dim).transpose(1, 2)
        out = attend(self.layer_idx, grouped(q), grouped(k), grouped(v), grouped(cos), grouped(sin), g,
                     self.sliding_window, group_gates(gate, g.start, rows, t))  # [rows, t, H*D]
        return out.reshape(rows * t, self.num_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused_ops.silu_mul(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # server.model.bottleneck_layers.BottleneckSlots once adapter slots are installed: the rows' bottleneck
        # adapters (AdapterHub houlsby / pfeiffer / parallel), added after the attention block and the MLP
        self.bottleneck = None

    def forward(self, x, cos, sin, step: "StepInputs"):
        bn = self.bottleneck
        if bn is None:  # the residual add fused with the next norm (fused_ops), the attention output its storage
            h, x = self.post_attention_layernorm.add_forward(self.self_attn(self.input_layernorm(x), cos, sin, step), x)
            return x + self.mlp(h)
        x = bn.add("attn", x, self.self_attn(self.input_layernorm(x), cos, sin, step))
        return bn.add("out", x, self.mlp(self.post_attention_layernorm(x)))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


@dataclass
class StepInputs:
    """Everything a forward needs besides token ids.

    rows:      cache rows of the B batch rows (KVCache.row_tables), a slice; None when block_tables is given
    rope_pos:  [B, T] rope position of each new token
    cache_pos: [B, T] cache slot each new token's K/V is written to
    kv_len:    L, the cache length every row attends over (max over rows)
    attn_mask: [B, 1, T, L] bool, True where a query may attend: key j for the query at cache position p
               iff j <= p (and j > p - sliding_window); decode on CPU derives it from cache_pos (attention.py)
    kv_index:  [B*Hkv*T] flat cache index of each new K/V vector, the same in every layer
    block_tables: [B, M] int64 block of each row's cache positions (position p: block_tables[b, p // block_size]);
               default: the rows' fixed tables
    """

    cache: KVCache
    rows: slice
    rope_pos: torch.Tensor
    cache_pos: torch.Tensor
    kv_len: int
    attn_mask: torch.Tensor
    kv_index: torch.Tensor | None = None  # [B*Hkv*T] where the new K/V go in a layer's flat cache (computed once)

    start: int = 0  # in a FlatStep: the group's first token in the flat batch
    block_tables: torch.Tensor | None = None
    decode_inputs: tuple | None = None  # attention.decode_attend's per-step views, made by the first layer

    def __post_init__(self) -> None:
        if self.block_tables is None:
            self.block_tables = self.cache.tables_of_rows(self.rows)
        if self.kv_index is None:
            self.kv_index = self.cache.flat_index(self.block_tables, self.cache_pos)

    @property
    def stop(self) -> int:
        return self.start + self.cache_pos.numel()


@dataclass
class FlatStep:
    """One forward over several groups of rows (e.g. a prefill chunk and the decode rows), so the weights are
    read once for all of them: input_ids are [N, 1], every token its own "row" for the linears (so adapter
    routing is per token), and attention runs per group, each a StepInputs over its own cache rows whose
    tokens are [start, stop) of the N, row-major.

    rope_pos: [N, 1] rope position of each token
    groups:   StepInputs with `start` set, covering 0..N in order
    """

    cache: KVCache
    rope_pos: torch.Tensor
    groups: list[StepInputs]


class Transformer(nn.Module):
    """A Llama-family causal LM whose state_dict keys equal HF's."""

    def __init__(self, args: ModelArgs, inv_freq: torch.Tensor, rope_scaling: float):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = rope_scaling

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings and type(self.lm_head) is nn.Linear:  # not once quantized or packed
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, D] for positions [B, T], computed in fp32 like HF, then cast."""
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_scaling).to(dtype).unsqueeze(1)
        return cos, sin

    def forward(self, input_ids: torch.Tensor | None, step: StepInputs, logits_index: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits.

        logits_index: [K] flat indices into the B*T tokens (row-major: row b's token t is
        b*T + t) whose logits are wanted (-> [K, V]); None returns logits for every token
        ([B, T, V]). The lm_head runs on those tokens only. inputs_embeds [B, T, E] replaces
        the token embeddings (prompt-tuning virtual tokens; input_ids is then None).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, E]
        cos, sin = self.rope(step.rope_pos, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, step)
        if logits_index is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_index)  # [K, E]
        return self.lm_head(self.model.norm(x)).float()
