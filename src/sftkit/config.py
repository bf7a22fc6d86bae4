"""The run configuration: one YAML file, validated by a schema, overridable from the command line.

Training keys keep the names of Hugging Face `TrainingArguments` so a config moves over unchanged.
Everything is checked here, before any model or data is loaded: unknown keys get a "did you mean",
wrong values name the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sftkit.errors import SftkitError


class ConfigError(SftkitError, ValueError):
    """A mistake in the user's config: the message says where and what to do."""


class DatasetSpec(BaseModel):
    """One training (or eval) data source."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    path: str = Field(description="Local file (.json, .jsonl, .parquet, .csv), folder, or hub dataset id.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto", description="Row layout; `auto` detects it from the columns."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map of the format's column names to yours, e.g. {prompt: question, completion: answer}.",
    )
    split: str = Field("train", description="Split to read from a hub dataset or folder.")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    label: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="The source's name in metrics: per-source loss for training data (default: the file's stem), "
        "eval_<label>_loss and eval_<label>_token_accuracy for eval sets.",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Training data only: this source's share of trained tokens in a mixture (weights are "
        "normalised; give every source one, or none to concatenate).",
    )


class SFTConfig(BaseModel):
    """Every key of a run. Field descriptions generate the README's reference."""

    # `--output_dir 2024` reaches us as the YAML int 2024: text keys take numbers as text.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    # --- model ---
    model_name_or_path: str = Field(description="Hub id or local folder of the base causal LM.")
    gguf_file: str | None = Field(
        None, description="A .gguf file inside model_name_or_path to fine-tune, dequantized (needs the gguf package)."
    )
    tokenizer_name_or_path: str | None = Field(
        None, description="Tokenizer to use; default: the model's (or the GGUF file's)."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you trust it.")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the weights are loaded in; `auto`: bf16 with `bf16`, fp16 with `fp16`, else fp32."
    )
    attn_implementation: Literal[
        "varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "varlen",
        description="Attention kernel; `varlen`: per-example kernel without a seq² mask (flash-attn or "
        "torch varlen on CUDA, SDPA per example on CPU). Packed examples never attend to each other on any of them.",
    )

    # --- adapters ---
    finetuning: Literal["lora", "qlora", "full"] = Field(
        "lora", description="LoRA adapters, 4-bit QLoRA, or all weights."
    )
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; `all-linear`: every linear layer but the output head."
    )
    use_dora: bool = Field(False, description="DoRA: LoRA plus a learned magnitude per output feature (slower step).")
    use_rslora: bool = Field(False, description="rsLoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r.")
    lora_modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens]."
    )
    init_lora_weights: bool | str = Field(
        True, description="Adapter init: true (B = 0), false, gaussian, orthogonal, pissa, pissa_niter_N or olora."
    )
    trainable_tokens: Literal["auto", "none"] | list[str] = Field(
        "none",
        description="Tokens whose embedding and output-head rows LoRA trains too; "
        "`auto`: the chat template's special tokens.",
    )

    # --- data ---
    datasets: list[DatasetSpec] = Field(
        min_length=1,
        description="Training data sources: concatenated, or mixed by trained tokens when each has a `weight`.",
    )
    eval_dataset: DatasetSpec | list[DatasetSpec] | None = Field(
        None,
        description="Held-out data for eval loss, token accuracy and sample prompts; a list of entries with "
        "a `label` each is evaluated set by set.",
    )
    eval_split_ratio: float = Field(
        0.0, ge=0, lt=1, description="Fraction of training rows held out for eval when no eval_dataset."
    )
    chat_template: str | None = Field(
        None,
        description="Built-in name (llama2, chatml, llama3, zephyr, mistral, plain), a .jinja file, or unset for the "
        "tokenizer's own (plain when it has none: prompt, completion, EOS).",
    )
    assistant_only_loss: bool = Field(True, description="Train only on assistant turns and their end-of-turn token.")
    train_on_reasoning: bool = Field(
        True,
        description="Train on assistant reasoning (reasoning_content / thinking); false masks the reasoning text, "
        "training the answer and the rest of the turn.",
    )
    packing: bool = Field(
        True, description="Pack whole examples into max_seq_length sequences (no cross-example attention)."
    )
    system_prompt: str | None = Field(None, description="System message added to conversations that have none.")
    truncation: Literal["truncate_right", "drop", "error"] = Field(
        "truncate_right", description="What to do with examples longer than max_seq_length."
    )
    skip_bad_rows: bool = Field(
        False, description="Skip rows that fit no format (counted and reported) instead of stopping."
    )
    streaming: bool = Field(
        False,
        description="Read the datasets as streams: tokenized and packed on the fly, no full pass before "
        "training; needs max_steps.",
    )
    packing_buffer: int = Field(
        2000,
        ge=1,
        description="Streaming and mixtures: examples gathered before they are packed (larger packs "
        "tighter, holds more in memory).",
    )
    on_exhausted: Literal["repeat", "stop"] = Field(
        "repeat",
        description="Streaming and mixtures: when a source runs out before max_steps, read it again or stop the run.",
    )
    dataset_num_proc: int | None = Field(
        None,
        ge=1,
        description="Processes for tokenization (datasets.map); unset: one per CPU core this process may use.",
    )

    # --- schedule and optimizer (HF TrainingArguments names) ---
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Sequences per micro-batch per process.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Sequences per eval batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(
        3.0, ge=0, description="Epochs over the training data (ignored when max_steps > 0)."
    )
    max_steps: int = Field(-1, ge=-1, description="Total optimizer steps; overrides num_train_epochs when > 0.")
    max_seq_length: int = Field(2048, ge=8, description="Longest sequence in tokens (packed or padded).")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Steps of linear warmup (instead of warmup_ratio).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never applied to biases and norms).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of the peak LR.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 disables).")
    bf16: bool = Field(False, description="bfloat16 autocast.")
    fp16: bool = Field(False, description="float16 autocast with loss scaling.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    activation_offloading: bool = Field(
        False, description="Keep activations saved for backward in pinned host memory (CUDA only; a no-op on CPU)."
    )
    torch_compile: bool = Field(
        False,
        description="Compile each decoder layer with torch.compile (on the first step; one graph for all layers).",
    )
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: uniform noise of scale alpha / sqrt(seq × hidden) on input embeddings, training only.",
    )
    chunked_loss: bool | Literal["auto"] = Field(
        "auto", description="Cross-entropy over sequence chunks, never holding all logits; `auto`: on where exact."
    )
    loss_chunk_size: int = Field(1024, ge=16, description="Tokens per chunk of the chunked loss.")
    max_bad_steps: int = Field(0, ge=0, description="Non-finite steps to skip before stopping the run.")
    seed: int = Field(42, description="Seed for init, data order and dropout.")

    # --- logging, eval, checkpoints ---
    output_dir: str = Field("runs/sft", description="Run directory: metrics, checkpoints, final weights, report.")
    overwrite_output_dir: bool = Field(False, description="Allow writing into a directory that holds another run.")
    logging_steps: int = Field(10, ge=1, description="Optimizer steps between metric rows.")
    eval_steps: int | None = Field(
        None, ge=1, description="Steps between evals; default: logging_steps × 10 when there is eval data."
    )
    save_steps: int = Field(500, ge=1, description="Steps between checkpoints.")
    save_total_limit: int | None = Field(None, ge=1, description="Checkpoints kept (the best is never deleted).")
    resume_from_checkpoint: bool | str | None = Field(
        None, description="`true`/`latest`: newest valid checkpoint in output_dir; or a checkpoint path."
    )
    save_on_interrupt: bool = Field(
        True,
        description="On Ctrl-C, save a checkpoint at the current step before "
        "exiting (several processes: after the step all of them are in).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evals without improvement."
    )
    metric_for_best_model: str | None = Field(
        None,
        description="Eval metric that picks the best checkpoint and early stopping, e.g. eval_gsm8k_loss or "
        "eval_token_accuracy (higher is better for accuracy); default: the first eval set's loss.",
    )
    eval_metric: list[str] | str | None = Field(
        None,
        description="Task metrics generated on every eval set during training and scored as `sftkit eval` scores "
        "them: exact, contains, extract (with eval_extract), rouge, bleu, chrf; logged as eval_<label>_<metric> "
        "beside the eval loss, and metric_for_best_model may pick one (e.g. eval_gsm8k_extract).",
    )
    eval_extract: str | None = Field(
        None, description="The regex of the `extract` metric, with one group: the answer (e.g. '#### (\\S+)')."
    )
    eval_generation_steps: int | None = Field(
        None, ge=1, description="Steps between task-metric generations (eval_metric); default: eval_steps."
    )
    eval_generation_examples: int = Field(
        100, ge=1, description="Examples of each eval set generated for eval_metric: its first N rows."
    )
    report_to: (
        Literal["tensorboard", "wandb", "mlflow", "trackio", "none"]
        | list[Literal["tensorboard", "wandb", "mlflow", "trackio"]]
    ) = Field(
        "tensorboard",
        description="Metric sinks besides metrics.jsonl (mlflow and trackio store locally unless "
        "their own environment variables point elsewhere).",
    )

    # --- monitoring ---
    sample_prompts: list[str] | str | None = Field(
        None, description="Prompts generated during training (a list or a file); default: a few eval prompts."
    )
    sample_steps: int | None = Field(None, ge=1, description="Steps between sample generations; default: eval_steps.")
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per sample and per eval_metric example.")
    sample_holdout: int = Field(
        4,
        ge=0,
        description="With no eval data and no sample_prompts: training rows held back (never trained on) whose "
        "prompts are sampled every sample_steps; 0 trains on every row and takes no samples.",
    )

    @model_validator(mode="after")
    def _contradictions(self) -> SFTConfig:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both on; choose one (bf16 where the GPU supports it)")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError(
                f"warmup_ratio ({self.warmup_ratio}) and warmup_steps ({self.warmup_steps}) are both set; keep one"
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("max_steps and num_train_epochs are both zero: nothing to train; set one of them")
        if self.eval_dataset is not None and self.eval_split_ratio > 0:
            raise ValueError("eval_dataset and eval_split_ratio are both set; keep one")
        if isinstance(self.trainable_tokens, list) and self.finetuning == "full":
            raise ValueError(
                f"trainable_tokens ({self.trainable_tokens}) with finetuning: full: full fine-tuning already "
                "trains every token row; remove trainable_tokens (or set it to auto or none)"
            )
        if self.gguf_file and self.finetuning == "qlora":
            raise ValueError(
                f"gguf_file ({self.gguf_file}) with finetuning: qlora: a GGUF base is dequantized and "
                "cannot be quantized again; use finetuning: lora, or a safetensors base for qlora"
            )
        self._check_sources()
        self._check_eval_sets()
        self._check_lora_variant()
        return self

    def _check_sources(self) -> None:
        weighted = [spec.weight is not None for spec in self.datasets]
        if any(weighted) and not all(weighted):
            missing = ", ".join(f"datasets.{i}" for i, has in enumerate(weighted) if not has)
            raise ValueError(
                f"{missing} has no weight while others have one; give every training source a weight "
                "(its share of trained tokens), or none to concatenate them"
            )
        names = self.source_names
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"two training sources are both named {repeated[0]!r}; give them distinct labels "
                "(datasets.N.label), which name their per-source metrics"
            )
        if (self.streaming or self.is_mixture) and self.max_steps <= 0:
            what = "streaming: true" if self.streaming else "weights on datasets"
            raise ValueError(f"{what} needs max_steps: a stream or a mixture has no epoch to count; set max_steps")
        if self.streaming and self.eval_split_ratio > 0:
            raise ValueError(
                "eval_split_ratio cannot hold rows out of a stream; set eval_dataset instead (or streaming: false)"
            )

    def _check_eval_sets(self) -> None:
        specs = (
            self.eval_dataset
            if isinstance(self.eval_dataset, list)
            else [self.eval_dataset]
            if self.eval_dataset
            else []
        )
        for spec in specs:
            if spec.weight is not None:
                raise ValueError(f"eval_dataset weight = {spec.weight}: weights mix training sources only; remove it")
        if isinstance(self.eval_dataset, list):
            labels = [spec.label for spec in self.eval_dataset]
            if not labels:
                raise ValueError("eval_dataset is an empty list; give at least one entry or remove the key")
            for index, label in enumerate(labels):
                if label is None:
                    raise ValueError(
                        f"eval_dataset.{index} has no label; in a list every eval set needs one "
                        "(e.g. label: gsm8k), which names its metrics eval_<label>_loss"
                    )
            repeated = sorted({label for label in labels if label is not None and labels.count(label) > 1})
            if repeated:
                raise ValueError(f"eval_dataset: label {repeated[0]!r} is used twice; each eval set needs its own")
        if self.eval_metric is not None:
            self._check_task_metrics()
        if self.metric_for_best_model is not None:
            names = self.eval_metric_names
            if not names:
                raise ValueError(
                    f"metric_for_best_model = {self.metric_for_best_model!r} but there is no eval data; "
                    "set eval_dataset or eval_split_ratio, or remove metric_for_best_model"
                )
            if self.best_model_metric not in names:
                raise ValueError(
                    f"metric_for_best_model = {self.metric_for_best_model!r} names no eval metric of this "
                    f"config; choose one of: {', '.join(names)}"
                )

    def _check_task_metrics(self) -> None:
        from sftkit.evaluate.metrics import parse_metrics  # metrics reads ConfigError from here

        if not self.has_eval:
            raise ValueError(
                "eval_metric is set but there is no eval data to generate from; set eval_dataset (or "
                "eval_split_ratio), or remove eval_metric"
            )
        try:
            specs = parse_metrics(self.task_metrics, self.eval_extract)
        except ConfigError as error:
            raise ValueError(f"eval_metric: {error}") from None
        if any(spec.name == "loss" for spec in specs):
            raise ValueError(
                "eval_metric: `loss` is logged at every eval already (eval_<label>_loss, over every trained "
                "token); remove it, and name the metrics to generate"
            )
        if len({spec.name for spec in specs}) < len(specs):
            raise ValueError(f"eval_metric names a metric twice: {self.task_metrics}")

    def _check_lora_variant(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, str) and not _LORA_INITS.match(init):
            raise ValueError(
                f"init_lora_weights = {init!r} is not supported; use true, false, gaussian, orthogonal, "
                "pissa, pissa_niter_N (N iterations of fast SVD) or olora"
            )
        variant = {
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "lora_modules_to_save": bool(self.lora_modules_to_save),
            "init_lora_weights": init is not True,
        }
        if self.finetuning == "full" and any(variant.values()):
            keys = ", ".join(k for k, on in variant.items() if on)
            raise ValueError(f"{keys} only apply to LoRA, but finetuning = 'full'; remove them or use finetuning: lora")
        mutates_base = isinstance(init, str) and init.startswith(("pissa", "olora"))
        if mutates_base and self.use_dora:
            raise ValueError(
                f"init_lora_weights = {init!r} with use_dora: the trained DoRA adapter cannot be written as "
                "an adapter of the original base; choose one of them"
            )
        if mutates_base and self.finetuning == "qlora":
            raise ValueError(
                f"init_lora_weights = {init!r} with finetuning: qlora would quantize the residual base "
                "weights, so the saved adapter would not fit the original base; use lora, or the default init"
            )

    # Derived values, never stored: the config stays what the user wrote.
    @property
    def model_source(self) -> str:
        """The base as the loaders take it: model_name_or_path, or `model_name_or_path/gguf_file`."""
        return f"{self.model_name_or_path.rstrip('/')}/{self.gguf_file}" if self.gguf_file else self.model_name_or_path

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer_name_or_path or self.model_source

    @property
    def report_sinks(self) -> list[str]:
        sinks = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [s for s in sinks if s != "none"]

    @property
    def source_names(self) -> list[str]:
        """Each training source's name in per-source metrics: its label, else the file's (or hub id's) stem."""
        return [spec.label or source_stem(spec.path) for spec in self.datasets]

    @property
    def is_mixture(self) -> bool:
        """True when the training sources are mixed by trained-token weights instead of concatenated."""
        return self.datasets[0].weight is not None

    @property
    def mixture_weights(self) -> dict[str, float]:
        """A mixture's weight per source path; empty when the sources are concatenated."""
        return {spec.path: spec.weight for spec in self.datasets if spec.weight is not None}

    @property
    def has_eval(self) -> bool:
        return self.eval_dataset is not None or self.eval_split_ratio > 0

    @property
    def eval_sets(self) -> list[tuple[str, DatasetSpec | None]]:
        """(label, source) of each eval set in config order; label '' for the unnamed one, source None
        for the share held out of the training data."""
        if self.eval_dataset is None:
            return [("", None)] if self.eval_split_ratio > 0 else []
        specs = self.eval_dataset if isinstance(self.eval_dataset, list) else [self.eval_dataset]
        return [(spec.label or "", spec) for spec in specs]

    @property
    def task_metrics(self) -> list[str]:
        """eval_metric as a list: the metrics generated on each eval set during training."""
        return [self.eval_metric] if isinstance(self.eval_metric, str) else list(self.eval_metric or [])

    @property
    def eval_metric_names(self) -> list[str]:
        names = [*EVAL_METRICS, *(metric.split(":", 1)[0] for metric in self.task_metrics)]
        return [eval_metric_key(label, metric) for label, _ in self.eval_sets for metric in names]

    @property
    def best_model_metric(self) -> str | None:
        """The eval metric key that picks the best checkpoint (`loss` is read as `eval_loss`, as in transformers)."""
        if not self.has_eval:
            return None
        if self.metric_for_best_model is None:
            return self.eval_metric_names[0]
        name = self.metric_for_best_model
        return name if name.startswith("eval_") else f"eval_{name}"

    @property
    def resolved_eval_steps(self) -> int | None:
        if not self.has_eval:
            return None
        return self.eval_steps or self.logging_steps * 10

    @property
    def resolved_generation_steps(self) -> int | None:
        """Steps between task-metric generations; None when no eval_metric is set."""
        if not self.task_metrics or not self.has_eval:
            return None
        return self.eval_generation_steps or self.resolved_eval_steps

    @property
    def warmup_fraction_or_steps(self) -> tuple[float, int]:
        return self.warmup_ratio or 0.0, self.warmup_steps or 0


EVAL_METRICS = ("loss", "token_accuracy")
GENERATED_METRICS = ("exact", "extract", "contains", "rouge", "bleu", "chrf")  # scored on generated text


def source_stem(path: str) -> str:
    """`data/chat.v2.jsonl` → `chat.v2`; `org/dataset` → `dataset`; a folder → its name."""
    name = Path(path.rstrip("/")).name
    return Path(name).stem if Path(name).suffix.lower() in (".json", ".jsonl", ".parquet", ".csv") else name


def eval_metric_key(label: str, metric: str) -> str:
    """eval_loss for the unnamed eval set, eval_<label>_loss for a named one."""
    return f"eval_{label}_{metric}" if label else f"eval_{metric}"


def eval_loss_key(metric: str) -> str:
    """The loss key of the eval set a metric belongs to: eval_gsm8k_token_accuracy (or eval_gsm8k_extract)
    → eval_gsm8k_loss."""
    for name in (*EVAL_METRICS, *GENERATED_METRICS):
        if metric.endswith(f"_{name}"):
            return metric.removesuffix(f"_{name}") + "_loss"
    return metric + "_loss"


def greater_is_better(metric: str) -> bool:
    """Losses improve downwards, accuracies upwards."""
    return not metric.endswith("loss")


# peft's init_lora_weights strings that need no data or extra config (eva, corda and loftq do).
_LORA_INITS = re.compile(r"^(gaussian|orthogonal|pissa|pissa_niter_\d+|olora)$")


# --------------------------------------------------------------------------- loading

_SECRET_KEY = re.compile(r"(token|secret|password|api[_-]?key|auth)", re.I)
_NOT_SECRET_KEYS = ("name_or_path", "trainable_tokens")  # keys that say "token" but hold names, never secrets
_SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|ghp_[A-Za-z0-9]{16,}|[A-Fa-f0-9]{40})")
_HUB_COMMIT = re.compile(r"(?<=/snapshots/)[A-Fa-f0-9]{40}")  # hub-cache folders are named by commit, not secrets


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SFTConfig:
    """Read a YAML config, apply `key: value` overrides (dotted keys reach nested values), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        where = str(err).replace('"<unicode string>"', str(path))
        raise ConfigError(
            f"{path}: not valid YAML (fix the syntax at the line shown; nested keys must line up): {where}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, str(path))


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "config") -> SFTConfig:
    """Validate a config given as a mapping (YAML's content, or a dict in Python) after applying overrides;
    `raw` itself is left unchanged."""
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, source=f"command line --{dotted}")
    flags = " ".join(f"--{key}" for key in overrides or {})
    return validate_config(raw, source=f"{source} with command-line {flags}" if flags else source)


def validate_config(raw: dict[str, Any], source: str = "config") -> SFTConfig:
    """Validate a plain dict; errors name the source, the key, the value and what is allowed."""
    try:
        return SFTConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, raw, source)) from None


def _eval_dataset_errors(errors: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """`eval_dataset` is one entry or a list of them: keep only the errors of the form the user wrote,
    without pydantic's branch names in their location."""
    kept: list[Mapping[str, Any]] = []
    dropped = None
    for e in errors:
        loc = e["loc"]
        if loc[:1] == ("eval_dataset",) and len(loc) > 1 and loc[1] in ("DatasetSpec", "list[DatasetSpec]"):
            if e["type"] in ("model_type", "list_type") and len(loc) == 2:
                dropped = e  # the other form: a mapping is not a list, a list is not a mapping
                continue
            e = {**e, "loc": (loc[0], *loc[2:])}
        kept.append(e)
    if dropped and not any(e["loc"][:1] == ("eval_dataset",) for e in kept):  # neither form
        kept.append(
            {
                **dropped,
                "loc": ("eval_dataset",),
                "msg": "give one entry ({path: ...}) or a list of entries with a label each",
            }
        )
    return kept


def _explain(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in _eval_dataset_errors(err.errors()):
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            valid = _valid_keys(e["loc"][:-1])
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else "; see the config reference in the README"
            lines.append(f"  unknown key '{loc}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{loc}'")
        elif not e["loc"]:
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            value = e.get("input")
            lines.append(f"  {loc} = {value!r}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _valid_keys(parent: tuple) -> list[str]:
    model: type[BaseModel] = SFTConfig
    if parent and parent[0] in ("datasets", "eval_dataset"):
        model = DatasetSpec
    return list(model.model_fields)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: '{part}' is not an index of the list at '{dotted}'")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: '{last}' is not an index of the list at '{dotted}'")
        node[int(last)] = value
    else:
        node[last] = value


def parse_cli_overrides(args: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs; values are parsed as YAML scalars (1e-4, true, [a, b])."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got '{arg}'")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"  # a bare flag turns a boolean on
            else:
                i += 1
                value = args[i]
        overrides[key.replace("-", "_") if "." not in key else key] = _parse_scalar(value)
        i += 1
    return overrides


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def redacted(config: SFTConfig) -> dict[str, Any]:
    """The config as a dict with secret-looking values replaced, for writing into run directories."""
    return _redact(config.model_dump(mode="json"))


def _redact(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _redact(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v, key) for v in node]
    if isinstance(node, str) and (
        (_SECRET_KEY.search(key) and not any(k in key for k in _NOT_SECRET_KEYS))
        or _SECRET_VALUE.search(_HUB_COMMIT.sub("", node))
    ):
        return "***redacted***"
    return node


def save_config(config: SFTConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(redacted(config), sort_keys=False), encoding="utf-8")
