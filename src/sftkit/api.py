"""The Python API: the functions the `sftkit` commands call, for notebooks and scripts.

    import sftkit
    result = sftkit.train("cfg.yaml", max_steps=20)        # RunResult: paths, status, final loss
    sftkit.generate(result.final_dir, ["What is 2+2?"])      # [{prompt, completion, ended}]
    sftkit.export(result.output_dir, "out", to="gguf", quant="q8_0")

A config is a YAML path, a dict of config keys or an `SFTConfig`; keyword overrides use the config's
keys (dotted for nested ones, as on the command line). Nothing here exits the process: input the user
can fix raises a `SftkitError` subclass whose message is what the CLI prints. Output goes to a rich
Console, which renders in Jupyter as well as in a terminal; pass `console=Console(quiet=True)` to
silence it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from sftkit.config import SFTConfig, config_from_dict, load_config
from sftkit.errors import SftkitError
from sftkit.export import export  # a GGUF file + Ollama Modelfile, or a folder `vllm serve` loads

if TYPE_CHECKING:
    from sftkit.data.dataset import PreparedData
    from sftkit.evaluate import EvalResult
    from sftkit.train.loop import RunResult

__all__ = [
    "USER_ERRORS",
    "DataInspection",
    "evaluate",
    "export",
    "generate",
    "inspect_data",
    "load",
    "merge",
    "plan",
    "report",
    "train",
]

ConfigLike = str | Path | dict[str, Any] | SFTConfig


# Every error the CLI reports as `error: MESSAGE` and exit code 2, without a traceback. Errors of a run in
# progress are defined beside the loop and do not derive from SftkitError.
USER_ERRORS: tuple[type[Exception], ...] = (SftkitError, FileNotFoundError)


def load(config_or_path: ConfigLike, **overrides: Any) -> SFTConfig:
    """A validated config from a YAML path, a dict or an SFTConfig, with `key=value` overrides applied."""
    if isinstance(config_or_path, SFTConfig):
        if not overrides:
            return config_or_path  # validated already; the CLI passes its config through here
        return config_from_dict(config_or_path.model_dump(exclude_unset=True), overrides, "SFTConfig")
    if isinstance(config_or_path, dict):
        return config_from_dict(config_or_path, overrides, "config dict")
    return load_config(config_or_path, overrides)


def train(config_or_path: ConfigLike, console: Console | None = None, **overrides: Any) -> RunResult:
    """Fine-tune in this process; returns the run's paths (output_dir, final_dir), status and final loss.

    `sftkit train --nproc_per_node N` forks data-parallel processes; from Python, run one process per
    notebook (or launch a script with torchrun)."""
    from sftkit.train.loop import train as run_training

    return run_training(load(config_or_path, **overrides), console)


def plan(
    config_or_path: ConfigLike,
    gpu: str | None = None,
    gpu_memory: str | None = None,
    num_gpus: int = 1,
    probe: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Memory, schedule and time estimate of a run, as plain JSON-able values (what `sftkit plan --json` prints)."""
    from sftkit.plan import build_plan
    from sftkit.plan.gpus import resolve_gpu

    return build_plan(load(config_or_path, **overrides), resolve_gpu(gpu, gpu_memory), num_gpus, probe)


class DataInspection:
    """What `sftkit data inspect` shows: `stats` (JSON-able figures), the prepared `data` and its `tokenizer`."""

    def __init__(self, stats: dict[str, Any], data: PreparedData, tokenizer: Any) -> None:
        self.stats, self.data, self.tokenizer = stats, data, tokenizer

    def first_example(self) -> list[tuple[str, bool]]:
        """The first training example as (text, trained) runs."""
        from sftkit.data.inspect import masked_segments

        if self.data.train is None or len(self.data.train.dataset) == 0:
            return []
        first = self.data.train.dataset[0]
        return masked_segments(first["input_ids"], first["labels"], self.tokenizer)

    def show(self, console: Console | None = None) -> None:
        """Rich tables of the figures and the first example with its trained tokens highlighted."""
        from sftkit.data.inspect import print_stats

        print_stats(self.stats, self.first_example(), console or Console())


def inspect_data(
    config_or_path: ConfigLike, sample_rows: int | None = None, progress: bool = False, **overrides: Any
) -> DataInspection:
    """Rows, formats, token lengths, trained-token fraction and padding vs packing waste of a config's data.

    `sample_rows`: read only the first N rows of each source (streaming configs default to a sample)."""
    from sftkit.data.dataset import STREAMING_SAMPLE_ROWS, DataOptions, prepare_data
    from sftkit.data.inspect import inspect_data as data_stats
    from sftkit.data.inspect import with_mixture
    from sftkit.data.template import describe_rendering, resolve_chat_template
    from sftkit.model.load import load_tokenizer

    config = load(config_or_path, **overrides)
    tokenizer = load_tokenizer(config.tokenizer_source, config.trust_remote_code)
    template = resolve_chat_template(config.chat_template, tokenizer)
    if sample_rows is None and config.streaming:
        sample_rows = STREAMING_SAMPLE_ROWS
    data = prepare_data(DataOptions.from_config(config, template, sample_rows), tokenizer)
    sample = (
        {
            "sample": {
                "rows_per_source": sample_rows,
                "note": f"figures from the first {sample_rows} rows of each source, not from the whole data",
            }
        }
        if sample_rows is not None
        else {}
    )
    stats = {
        "rendering": describe_rendering(config.chat_template, template),
        **sample,
        **data_stats(data, config.max_seq_length, config.per_device_train_batch_size, progress=progress),
    }
    return DataInspection(with_mixture(stats, config.mixture_weights), data, tokenizer)


def generate(
    model: str | Path,
    prompts: list[str],
    prompts_file: str | Path | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Reply to each prompt (single-turn) with the chat template the model was trained with.

    `model`: a run directory, adapter folder or model folder. Returns [{prompt, completion, ended}];
    prints them too where a `console` is given."""
    from sftkit.generate import generate_cli

    return generate_cli(
        Path(model),
        list(prompts),
        Path(prompts_file) if prompts_file is not None else None,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        console=console,
    )


def merge(model: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Fold a LoRA adapter into its base and save a standalone model folder; returns `out`."""
    from sftkit.merge import merge_adapter

    return merge_adapter(Path(model), Path(out), dtype=dtype)


def report(run_dir: str | Path, console: Console | None = None) -> Path:
    """Write RUN_DIR/report.html (curves, diagnosis, samples) and print a summary; returns the page's path."""
    from sftkit.report import build_report

    return build_report(Path(run_dir), console=console)


def evaluate(
    model: str | Path,
    data: str | Path,
    metrics: Sequence[str] = (),
    extract: str | None = None,
    base: bool = False,
    base_model: str | None = None,
    out: str | Path | None = None,
    limit: int | None = None,
    data_format: str = "auto",
    columns: dict[str, str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    max_length: int = 2048,
    engine: str = "transformers",
) -> EvalResult:
    """Score a fine-tuned model (and, with `base`, its base on the same examples) on a data file.

    `metrics`: exact, extract, contains, rouge, bleu, chrf, loss (none named: `extract` where a regex is
    given, else `exact`).
    The result holds each metric's figures and, with `base`, the difference and its 95% paired-bootstrap
    interval; summary.json and predictions.jsonl go to `out` (default: MODEL/eval for a run directory).
    `engine`: transformers, or vllm (vLLM's offline engine on a GPU, the `vllm` extra)."""
    from sftkit.evaluate import EvalOptions, parse_metrics
    from sftkit.evaluate import evaluate as run_evaluation

    return run_evaluation(
        EvalOptions(
            model=str(model),
            data=str(data),
            metrics=parse_metrics(list(metrics), extract),
            base=base,
            base_model=base_model,
            out=Path(out) if out is not None else None,
            limit=limit,
            data_format=data_format,
            columns=dict(columns or {}),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            engine=engine,
        )
    )
