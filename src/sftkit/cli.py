"""The `sftkit` command line: parse, call the typed functions of `sftkit.api`, print. Every error the user
can fix (sftkit.api.USER_ERRORS) is shown as `error: MESSAGE` without a traceback, exit code 2."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.console import Console

from sftkit import api
from sftkit.api import USER_ERRORS
from sftkit.config import SFTConfig, load_config, parse_cli_overrides
from sftkit.data.dataset import STREAMING_SAMPLE_ROWS

# peft asks transformers a deprecated question on every LoRA setup; the user can do nothing about it.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Supervised fine-tuning of causal language models: plan, train, monitor, report, merge, export.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at training data before training on it.")
app.add_typer(data_app, name="data")
console = Console()
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
    raise SystemExit(2)


def _config(path: Path, extra: list[str]) -> SFTConfig:
    return load_config(path, parse_cli_overrides(extra))


@app.command(context_settings=EXTRA_ARGS)
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config"),
    nproc_per_node: int = typer.Option(
        1,
        "--nproc_per_node",
        min=1,
        help="Data-parallel processes on this machine (one per GPU), forked "
        "from this one so they share its libraries: no torchrun needed.",
    ),
) -> None:
    """Fine-tune: `sftkit train cfg.yaml [--key value ...]` (any config key can be overridden)."""
    from sftkit.train.launch import launch

    try:
        launch(_config(config, ctx.args), nproc_per_node, _train)
    except USER_ERRORS as err:
        _fail(err)


def _train(config: SFTConfig) -> None:
    """One training process; a user error is printed, not raised, and ends the process with code 2."""
    try:
        api.train(config, console)
    except USER_ERRORS as err:
        _fail(err)


@data_app.command("inspect", context_settings=EXTRA_ARGS)
def data_inspect(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    dump: tuple[int, Path] | None = typer.Option(None, help="Write the first N tokenized examples to FILE (JSONL)."),
    sample_rows: int | None = typer.Option(
        None,
        "--sample_rows",
        min=1,
        help="Read only the first N rows of each source (with `streaming: true`, "
        f"where no source is read whole: {STREAMING_SAMPLE_ROWS} unless given).",
    ),
) -> None:
    """Rows, formats, token lengths, trained-token fraction, padding vs packing waste, one masked example."""
    from sftkit.data.inspect import dump_examples

    try:
        cfg = _config(config, ctx.args)
        found = api.inspect_data(cfg, sample_rows=sample_rows, progress=not as_json)
    except USER_ERRORS as err:
        _fail(err)
    stats = found.stats
    if dump is not None:
        written = dump_examples(found.data, dump[0], dump[1])
        # With --json, stdout holds the JSON document only, so `| jq` works.
        (Console(stderr=True) if as_json else console).print(f"wrote {written} examples to {dump[1]}", soft_wrap=True)
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    if "sample" in stats:
        console.print(
            f"[bold]Sampled:[/bold] the figures below come from the first {stats['sample']['rows_per_source']} "
            "rows of each source, not from the whole data (--sample_rows N reads more)",
            soft_wrap=True,
        )
    found.show(console)


@app.command(context_settings=EXTRA_ARGS)
def plan(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config"),
    gpu: str | None = typer.Option(None, help="GPU name, e.g. A100-80GB, H100, RTX4090, L40S."),
    gpu_memory: str | None = typer.Option(None, help="GPU memory, e.g. 80GiB (instead of --gpu)."),
    num_gpus: int = typer.Option(1, help="GPUs the run will use."),
    probe: bool = typer.Option(False, help="Measure throughput with a few real steps on this machine."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Pre-flight: will it fit, how long will it take, what schedule, and what to change."""
    try:
        found = api.plan(_config(config, ctx.args), gpu=gpu, gpu_memory=gpu_memory, num_gpus=num_gpus, probe=probe)
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(found, indent=2))
        return
    from sftkit.plan.render import print_plan

    print_plan(found, console)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="Run directory (output_dir of a run).")) -> None:
    """Write RUN_DIR/report.html (curves, diagnosis, samples) and print a summary."""
    try:
        api.report(run_dir, console=console)
    except USER_ERRORS as err:
        _fail(err)


@app.command()
def generate(
    model: Path = typer.Argument(..., help="Run directory, adapter folder or merged model folder."),
    prompt: list[str] | None = typer.Option(None, help="A user message; repeat for several."),
    prompts_file: Path | None = typer.Option(None, help="JSONL ({'prompt': ...}) or text, one prompt per line."),
    max_new_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
) -> None:
    """Generate with the chat template the model was trained with."""
    try:
        api.generate(
            model,
            prompt or [],
            prompts_file,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            console=console,
        )
    except USER_ERRORS as err:
        _fail(err)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Run directory, adapter or model folder, or a GGUF file."),
    data: str = typer.Option(
        ..., help="Data file (any training format); the reference is the completion or last reply."
    ),
    metric: list[str] | None = typer.Option(
        None, help="exact, extract, contains, rouge, bleu, chrf or loss; repeat for several (default: exact)."
    ),
    extract: str | None = typer.Option(None, help="Regex with one group for `extract`, e.g. '#### (\\S+)'."),
    base: bool = typer.Option(False, "--base", help="Score the base model too, and the difference with its interval."),
    base_model: str | None = typer.Option(None, help="The base to compare with (default: the one the model names)."),
    max_new_tokens: int = typer.Option(256, min=1),
    batch_size: int = typer.Option(16, min=1, help="Examples generated (or scored) together."),
    max_length: int = typer.Option(2048, min=8, help="Tokens a `loss` example may take (cut on the left)."),
    limit: int | None = typer.Option(None, min=1, help="Score only the first N rows."),
    data_format: str = typer.Option("auto", "--format", help="auto, messages, sharegpt, alpaca or prompt_completion."),
    column: list[str] | None = typer.Option(None, help="KEY=NAME column mapping, e.g. prompt=question; repeatable."),
    out: Path | None = typer.Option(
        None, help="Folder for summary.json and predictions.jsonl (default: RUN_DIR/eval)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    engine: str = typer.Option(
        "transformers", help="transformers, or vllm: vLLM's offline engine on a GPU (pip install 'sftkit[vllm]')."
    ),
) -> None:
    """Score a fine-tuned model (and its base) on your task: one table with the difference and its 95% interval."""
    from sftkit.evaluate.table import parse_columns, print_result

    try:
        result = api.evaluate(
            model,
            data,
            metric or [],
            extract,
            base=base,
            base_model=base_model,
            out=out,
            limit=limit,
            data_format=data_format,
            columns=parse_columns(column or []),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            engine=engine,
        )
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print_result(result, console)


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="Run directory or adapter folder."),
    out: Path = typer.Option(..., help="Where to write the merged model."),
    dtype: str = typer.Option("auto", help="auto (the base's saved dtype), float32 or bfloat16; never 4-bit."),
) -> None:
    """Merge the LoRA adapter into the base weights and save a standalone model with its tokenizer."""
    try:
        path = api.merge(run_dir, out, dtype=dtype)
    except USER_ERRORS as err:
        _fail(err)
    console.print(f"merged model written to {path}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="Run directory, adapter folder or model folder."),
    to: str = typer.Option("gguf", "--to", help="gguf (llama.cpp, Ollama, LM Studio) or vllm."),
    quant: str = typer.Option("f16", help="GGUF tensor type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0."),
    out: Path = typer.Option(..., help="A new or empty folder for the export."),
    lora: bool = typer.Option(False, "--lora", help="vllm: write the adapter for vLLM's LoRA loader, not a merge."),
    push_to_hub: str | None = typer.Option(
        None, "--push_to_hub", help="Upload the export to this Hugging Face repo (token from HF_TOKEN)."
    ),
) -> None:
    """Merge the adapter and write a GGUF file with the trained chat template and an Ollama Modelfile, or a
    folder `vllm serve` loads."""
    try:
        result = api.export(model, out, to=to, quant=quant, lora=lora, push_to_hub=push_to_hub)  # type: ignore[arg-type]
    except USER_ERRORS as err:
        _fail(err)
    console.print(f"exported {'merged model' if result.merged else 'model'} to {result.path}", soft_wrap=True)
    for note in result.notes:
        console.print(f"  {note}", soft_wrap=True, highlight=False)
    if result.hub_url:
        console.print(f"uploaded to {result.hub_url}", soft_wrap=True)


@app.command()
def demo(
    quick: bool = typer.Option(False, help="A shorter run (under a minute) for tests."),
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo writes everything."),
) -> None:
    """Build a tiny model, fine-tune it on a bundled task, and show the whole pipeline."""
    from sftkit.demo.run import run_demo

    try:
        run_demo(quick=quick, output_dir=output_dir, console=console)
    except USER_ERRORS as err:
        _fail(err)


if __name__ == "__main__":  # pragma: no cover
    app()
