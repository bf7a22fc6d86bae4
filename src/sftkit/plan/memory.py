"""Memory per GPU of one training step, from the model's config alone (no weights are read).

The model is built on the `meta` device, where tensors have shapes and dtypes but no storage, and
wrapped by the same `apply_adapters` the trainer uses, so parameter, adapter, gradient and
optimizer-state bytes are sums over the very tensors training would create:

    weights     base parameters, by dtype (QLoRA: NF4 4-bit + absmax constants, see `nf4_bytes`)
    adapters    trainable LoRA matrices (peft keeps them in fp32)
    gradients   one per trainable parameter, in the parameter's dtype
    optimizer   AdamW: exp_avg + exp_avg_sq like the parameter, plus a 4-byte `step` per tensor;
                the optimizer updates weights in their own dtype, so there is no fp32 master copy
                (bf16 weights train in bf16; fp32 weights under bf16 autocast are the master copy)

Activations are traced, not guessed: one forward of the decoder on meta tensors of shape
(micro batch, max_seq_length) runs inside `saved_tensors_hooks`, which sees every tensor autograd
keeps for backward. Each decoder layer's share is recorded, so gradient checkpointing is
(everything outside the layers) + (one input per layer) + (one layer recomputed in backward).
Attention: eager keeps (batch, heads, seq, seq) probabilities, which the trace sees; the fused
kernels (sdpa, varlen, flash, flex) on a GPU keep only q, k, v, the output and a logsumexp per row,
which the trace reproduces by standing in for `scaled_dot_product_attention` (on meta it would fall
back to the math kernel and keep the scores). Only sdpa and eager carry the batch's dense
(batch, 1, seq, seq) mask; varlen and flash get per-example boundaries (a few bytes per example),
flex a block mask (seq² / 128² entries), so their trace holds no seq² term.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from sftkit.model.adapters import AdapterOptions, apply_adapters
from sftkit.model.attention import MASK_FREE
from sftkit.model.load import embedding_weight, transformers_model

GIB = 2**30
NF4_BLOCK = 64  # weights per fp absmax (bitsandbytes blocksize for 4-bit)
NF4_ABSMAX_BLOCK = 256  # absmax values per fp32 constant under double quantisation
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS/cuDNN workspaces, measured 0.5–1 GiB
FRAGMENTATION = 0.05  # caching-allocator slack on top of what tensors hold


@dataclass(frozen=True)
class MemoryInputs:
    """What the estimate depends on besides the model built (`MetaModel`)."""

    gradient_checkpointing: bool
    autocast_dtype: torch.dtype | None  # bf16/fp16 autocast, or None
    attn_implementation: str  # varlen | sdpa | eager | flash_attention_2/3 | flex_attention
    micro_batch: int
    seq_len: int
    chunked_loss: bool
    loss_chunk_size: int
    shards: int = 1  # FSDP: weights, gradients and optimizer states split across this many GPUs
    activation_offloading: bool = False  # saved activations wait in pinned host memory (sftkit.train.offload)


@dataclass(frozen=True)
class ParameterBytes:
    base_params: int  # the model's own parameters (what a model card counts)
    total_params: int
    trainable_params: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    weights_by_dtype: dict[str, int]
    head_trainable: bool


@dataclass(frozen=True)
class ActivationTrace:
    outside_layers: int  # embeddings, final norm: kept whatever the checkpointing
    per_layer: list[int]  # saved for backward inside each decoder layer
    layer_input: int  # the hidden state entering one layer (what checkpointing keeps)
    hidden_dtype_bytes: int  # element size of that hidden state
    largest: int  # the largest single tensor a layer keeps (usually the MLP intermediate)
    adapters_upcast: bool = False  # fp32 adapters under autocast: peft casts their inputs to fp32 first


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU; `parts` in the order they are shown, `counted` those held at the peak."""

    parts: dict[str, int]
    counted: set[str]
    params: ParameterBytes
    loss: int  # head + cross-entropy peak
    activations: dict[bool, int]  # kept + backward working set, by gradient checkpointing off / on
    host_activations: int = 0  # with activation offloading: what waits in pinned host memory instead

    @property
    def total(self) -> int:
        return sum(self.parts[name] for name in self.counted)


# --------------------------------------------------------------------------- building on meta


def build_meta_model(
    model_config: Any,
    weight_dtype: torch.dtype,
    adapter: AdapterOptions,
    attn_implementation: str,
    vocab_size: int | None = None,
) -> tuple[nn.Module, set[int]]:
    """The model training would build, on `meta`; and the ids of the weights QLoRA stores in 4 bits.

    The mask-free kernels (varlen, flash, flex) are built as sdpa: the parameters are the same, and the
    trace then runs the fused stand-in without a mask.
    """
    from transformers import AutoModelForCausalLM

    model_config = copy.deepcopy(model_config)
    if vocab_size is not None and vocab_size > model_config.vocab_size:
        model_config.vocab_size = vocab_size  # load_model grows the embedding when the tokenizer added a pad token
    attn = "sdpa" if attn_implementation in MASK_FREE else attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=weight_dtype, attn_implementation=attn)
        model.config.use_cache = False
        head = model.get_output_embeddings()
        # bitsandbytes quantizes every linear layer but the output head, which stays in the compute dtype.
        quantized = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
        model = apply_adapters(model, replace(adapter, gradient_checkpointing=False))
    return model, quantized if adapter.finetuning == "qlora" else set()


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight stored as bitsandbytes NF4 with double quantisation.

    Two 4-bit codes per byte; one uint8 absmax per block of 64 weights; those absmax values
    quantized again with one fp32 constant per 256 of them; plus the 16-entry NF4 code, the 256-entry
    absmax code (fp32 each) and an fp32 offset.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_ABSMAX_BLOCK) + 4 * (16 + 256 + 1)


def parameter_bytes(model: nn.Module, quantized: set[int]) -> ParameterBytes:
    """Exact bytes of weights, adapters, gradients and AdamW states of `model` as training holds them."""
    head = transformers_model(model).get_output_embeddings()
    head_trainable = head is not None and head.weight.requires_grad
    weights = adapters = gradients = optimizer = 0
    total = trainable = adapter_params = 0
    by_dtype: dict[str, int] = {}
    for name, param in model.named_parameters():
        numel, size = param.numel(), param.numel() * param.element_size()
        total += numel
        if id(param) in quantized:
            size, dtype = nf4_bytes(numel), "nf4"
        else:
            dtype = str(param.dtype).removeprefix("torch.")
        if param.requires_grad:
            trainable += numel
            gradients += size
            optimizer += 2 * size + 4  # exp_avg, exp_avg_sq like the parameter; `step` is an fp32 scalar
        if param.requires_grad and "lora_" in name:
            adapters += size
            adapter_params += numel
        else:
            weights += size
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    return ParameterBytes(
        total - adapter_params, total, trainable, weights, adapters, gradients, optimizer, by_dtype, head_trainable
    )


# --------------------------------------------------------------------------- activations


class _FusedAttention(torch.autograd.Function):
    """Stands in for the fused sdpa kernels on meta: keeps q, k, v, the output, an fp32 logsumexp per
    row and, with a mask, the additive float mask sdpa converts a boolean one into."""

    @staticmethod
    def forward(ctx, query, key, value, mask):  # (batch, heads, seq, head_dim); key/value may have fewer heads
        out = torch.empty(query.shape[:-1] + value.shape[-1:], dtype=query.dtype, device=query.device)
        logsumexp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)  # (batch, heads, seq)
        kept = [query, key, value, out, logsumexp]
        if mask is not None:
            kept.append(
                mask if mask.dtype == query.dtype else torch.empty(mask.shape, dtype=query.dtype, device="meta")
            )
        ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run, only traced
        query, key, value = ctx.saved_tensors[:3]
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


@contextlib.contextmanager
def _meta_friendly_attention(fused: bool) -> Iterator[None]:
    """Fused sdpa stand-in, and no packed-sequence detection from position_ids (it reads values).

    Swaps module attributes for the duration of one trace: `plan` runs single-threaded."""
    import transformers.masking_utils as masking

    functional, find_packed = torch.nn.functional.scaled_dot_product_attention, masking.find_packed_sequence_indices
    if fused:
        torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, attn_mask=None, **kwargs: (
            _FusedAttention.apply(q, k, v, attn_mask)
        )
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = functional
        masking.find_packed_sequence_indices = find_packed


@contextlib.contextmanager
def _adapters_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[bool]:
    """Under autocast the LoRA matmuls run (and keep their inputs) in the autocast dtype; meta tensors
    know no autocast, so the trace casts the trainable fp32 adapters for its duration. Yields whether
    any were cast."""
    changed = [(p, p.data) for n, p in model.named_parameters() if dtype and "lora_" in n and p.dtype != dtype]
    for param, data in changed:
        param.data = data.to(dtype)
    try:
        yield bool(changed)
    finally:
        for param, data in changed:
            param.data = data


def _decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"no list of {num_layers} decoder layers found in {type(model).__name__}")


def trace_activations(
    model: nn.Module, micro_batch: int, seq_len: int, attn_implementation: str, autocast_dtype: torch.dtype | None
) -> ActivationTrace:
    """Bytes autograd keeps from one forward of the decoder body (embeddings → final norm) on meta."""
    base = transformers_model(model)
    body = base.base_model  # e.g. LlamaModel: no head, the loss is counted apart
    layers = _decoder_layers(body, base.config.num_hidden_layers)
    saved: dict[int, torch.Tensor] = {}
    marks: list[int] = []
    layer_input: list[tuple[int, int]] = []

    def bytes_saved() -> int:
        return sum(t.numel() * t.element_size() for t in saved.values())

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        root = tensor._base if tensor._base is not None else tensor
        if not isinstance(root, nn.Parameter) and root.device.type == "meta":
            saved.setdefault(id(root), root)  # keeping it alive keeps its id unique
        return tensor

    def before(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        layer_input.append((hidden.numel() * hidden.element_size(), hidden.element_size()))
        marks.append(bytes_saved())

    def after(module, args, output):
        marks.append(bytes_saved())

    handles = [
        h
        for layer in layers
        for h in (layer.register_forward_pre_hook(before, with_kwargs=True), layer.register_forward_hook(after))
    ]
    input_ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    # sftkit's batches carry a (batch, 1, seq, seq) block-causal mask for sdpa (boolean) and eager
    # (additive, in the hidden states' dtype); the mask-free kernels read per-example boundaries.
    mask = None
    if attn_implementation == "sdpa":
        mask = torch.ones(micro_batch, 1, seq_len, seq_len, dtype=torch.bool, device="meta")
    elif attn_implementation == "eager":
        mask = torch.zeros(micro_batch, 1, seq_len, seq_len, dtype=embedding_weight(base).dtype, device="meta")
    try:
        was_training = model.training
        model.train()
        with (
            _meta_friendly_attention(fused=attn_implementation != "eager"),
            _adapters_in(model, autocast_dtype) as adapters_upcast,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        ):
            body(input_ids=input_ids, attention_mask=mask, use_cache=False)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [marks[2 * i + 1] - marks[2 * i] for i in range(len(layers))]
    mask_bytes = mask.numel() * mask.element_size() if mask is not None else 0  # the batch's own mask
    largest = max(t.numel() * t.element_size() for t in saved.values() if t.dim() == 3)  # (batch, seq, features)
    return ActivationTrace(
        outside_layers=bytes_saved() - sum(per_layer) + mask_bytes,
        per_layer=per_layer,
        layer_input=layer_input[-1][0],
        hidden_dtype_bytes=layer_input[-1][1],
        largest=largest,
        adapters_upcast=adapters_upcast,
    )


def kept_for_backward(trace: ActivationTrace, gradient_checkpointing: bool) -> int:
    """Held from the end of forward: everything saved, or with checkpointing each layer's input."""
    if gradient_checkpointing:
        return trace.outside_layers + len(trace.per_layer) * trace.layer_input
    return trace.outside_layers + sum(trace.per_layer)


def kept_while_offloading(trace: ActivationTrace, gradient_checkpointing: bool) -> int:
    """On the GPU with activation offloading: the layer whose saved tensors are in flight (copied out in
    forward, back in backward), the layer input with checkpointing, else a whole layer's share."""
    return trace.layer_input if gradient_checkpointing else max(trace.per_layer)


def backward_working_set(trace: ActivationTrace, gradient_checkpointing: bool) -> int:
    """On top of what is kept: one layer recomputed (checkpointing) and the gradients flowing through it:
    two of its largest intermediate (into and out of the MLP activation) and two of the hidden state
    in fp32 (the norms compute in fp32 whatever the dtype). With fp32 adapters under autocast, peft
    first casts a LoRA layer's input to fp32 and drops out on that: two fp32 copies of the largest
    input live at once while a layer is recomputed."""
    recomputed = max(trace.per_layer) if gradient_checkpointing else 0
    hidden_fp32 = trace.layer_input // trace.hidden_dtype_bytes * 4
    largest_fp32 = trace.largest // trace.hidden_dtype_bytes * 4
    upcast = 2 * largest_fp32 if trace.adapters_upcast else 0
    return recomputed + 2 * trace.largest + 2 * hidden_fp32 + upcast


def loss_bytes(
    tokens: int,
    vocab: int,
    hidden: int,
    logits_dtype_bytes: int,
    chunked: bool,
    chunk_size: int,
    head_trainable: bool,
    hidden_dtype_bytes: int,
) -> int:
    """Peak of the head + cross-entropy.

    Unchunked: the logits (tokens × vocab) in the head's dtype, the fp32 log-softmax that CE keeps,
    and in its backward the fp32 gradient from nll_loss, exp(log-softmax) and the gradient of the
    logits: tokens × vocab × (dtype + 12), as measured (bench/plan_accuracy.py).
    Chunked (sftkit.train.loss): one chunk's fp32 logits and softmax-gradient, plus that gradient's
    copy in the hidden dtype when it is not fp32; the gradient w.r.t. the hidden states
    (tokens × hidden); and an fp32 gradient of the head weight when the head is trained.
    """
    if not chunked:
        return tokens * vocab * (logits_dtype_bytes + 12)
    chunk = min(chunk_size, tokens)
    copy_bytes = hidden_dtype_bytes if hidden_dtype_bytes != 4 else 0
    total = chunk * vocab * (8 + copy_bytes) + tokens * hidden * hidden_dtype_bytes
    return total + (vocab * hidden * 4 if head_trainable else 0)


# --------------------------------------------------------------------------- the estimate


@dataclass
class MetaModel:
    """A model built once on meta, estimated for as many micro-batch / sequence settings as asked.

    Every tensor autograd keeps has the micro batch as its first dimension (hidden states, masks,
    attention rows), so one trace at micro batch 1 per sequence length serves every micro batch;
    only the rotary cos/sin tables (seq × head_dim, shared by all rows) are over-counted, by
    (micro batch − 1) × a few hundred KiB.
    """

    model: nn.Module
    quantized: set[int]
    params: ParameterBytes
    traces: dict[tuple, ActivationTrace] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        model_config: Any,
        weight_dtype: torch.dtype,
        adapter: AdapterOptions,
        attn_implementation: str,
        vocab_size: int | None = None,
    ) -> MetaModel:
        model, quantized = build_meta_model(model_config, weight_dtype, adapter, attn_implementation, vocab_size)
        return cls(model, quantized, parameter_bytes(model, quantized))

    def activations(
        self, micro_batch: int, seq_len: int, attn_implementation: str, autocast_dtype: torch.dtype | None
    ) -> ActivationTrace:
        key = (seq_len, attn_implementation, autocast_dtype)
        if key not in self.traces:
            self.traces[key] = trace_activations(self.model, 1, seq_len, attn_implementation, autocast_dtype)
        one = self.traces[key]
        return ActivationTrace(
            one.outside_layers * micro_batch,
            [n * micro_batch for n in one.per_layer],
            one.layer_input * micro_batch,
            one.hidden_dtype_bytes,
            one.largest * micro_batch,
            one.adapters_upcast,
        )


def estimate_memory(meta: MetaModel, inputs: MemoryInputs, cuda_overhead: bool = True) -> MemoryEstimate:
    """Per-GPU bytes of one training step; `cuda_overhead` adds context and allocator slack."""
    params = meta.params
    trace = meta.activations(inputs.micro_batch, inputs.seq_len, inputs.attn_implementation, inputs.autocast_dtype)
    checkpointing = inputs.gradient_checkpointing
    head = transformers_model(meta.model).get_output_embeddings()
    vocab, hidden = head.weight.shape
    logits_dtype = inputs.autocast_dtype or head.weight.dtype  # QLoRA's head is fp32 (peft upcasts it)
    loss = loss_bytes(
        inputs.micro_batch * inputs.seq_len,
        vocab,
        hidden,
        logits_dtype.itemsize,
        inputs.chunked_loss,
        inputs.loss_chunk_size,
        params.head_trainable,
        trace.hidden_dtype_bytes,
    )
    shards = inputs.shards
    gradients = math.ceil(params.gradients / shards)
    kept = kept_for_backward(trace, checkpointing)
    parts = {
        "weights": math.ceil(params.weights / shards),
        "adapters": math.ceil(params.adapters / shards),
        "optimizer states": math.ceil(params.optimizer / shards),
        "activations": kept_while_offloading(trace, checkpointing) if inputs.activation_offloading else kept,
        # The loss peaks at the end of forward, a checkpointed layer's recomputation in backward: never together.
        "loss or backward working set": max(loss, backward_working_set(trace, checkpointing)),
        "gradients": gradients,
        "AdamW step buffers": gradients,  # foreach AdamW's sqrt(exp_avg_sq): one copy of the trainable weights
    }
    # Gradients are freed after each step (zero_grad(set_to_none=True)) and grow during backward
    # while activations are released layer by layer, so the peak is the larger of two moments:
    # the end of forward (activations + loss) and the optimizer step (gradients + AdamW buffers).
    forward_end = parts["activations"] + parts["loss or backward working set"]
    peak_moment = (
        ("activations", "loss or backward working set")
        if forward_end >= 2 * gradients
        else ("gradients", "AdamW step buffers")
    )
    counted = {"weights", "adapters", "optimizer states", *peak_moment}
    if cuda_overhead:
        held = sum(parts[name] for name in counted)
        parts["CUDA context + allocator"] = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * held)
        counted.add("CUDA context + allocator")
    return MemoryEstimate(
        parts,
        counted,
        params,
        loss,
        {on: kept_for_backward(trace, on) + backward_working_set(trace, on) for on in (False, True)},
        kept if inputs.activation_offloading else 0,
    )
