"""Checkpoints that resume the same run, and that are never half-written: `save(run, state)` and
`resume(run) -> state`, and the fingerprint that tells a checkpoint of this run from another's.

    checkpoint-STEP/
        adapter_model.safetensors + adapter_config.json   (LoRA)   or   model.safetensors (full)
        optimizer.pt            torch.save of the optimizer state, read back with weights_only=True
        scheduler.json          LR scheduler state
        rng_state_RANK.json     python + numpy RNG of each process
        rng_torch_RANK.safetensors   torch CPU (and CUDA) RNG of each process
        trainer_state.json      the RunState (state.py): step, best eval, metric window, fingerprint
        data_state.json + data_examples.safetensors   streaming/mixtures: each source's position, the
                                packing queue and read-ahead (examples as int64 tensors)
        config.yaml, chat_template.jinja
        manifest.json           every file with size and SHA-256, written last

Everything is written into `.tmp-checkpoint-STEP/` and renamed into place once complete, so a crash
mid-save never leaves a directory that resume would take for a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sftkit.config import SFTConfig, redacted, save_config
from sftkit.errors import SftkitError
from sftkit.rng import capture_rng, restore_rng
from sftkit.train.distributed import is_sharded
from sftkit.train.errors import CheckpointWriteError
from sftkit.train.outputs import write_chat_template
from sftkit.train.state import RunState

if TYPE_CHECKING:
    from sftkit.train.setup import Run

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(SftkitError, ValueError):
    """A checkpoint cannot be resumed from: the message names the file and why."""


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    match = CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else -1


# --------------------------------------------------------------------------- save


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_dir_for(output_dir: Path, step: int) -> Path:
    return output_dir / f".tmp-checkpoint-{step}"


def write_weights(model: Any, directory: Path, finetuning: str) -> None:
    """Adapter (PEFT format) or the full model's state dict, as safetensors (a peft or transformers model)."""
    if finetuning == "full":
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))
    else:
        model.save_pretrained(directory, safe_serialization=True)
        (directory / "README.md").unlink(missing_ok=True)


def write_process_state(directory: Path, rank: int) -> None:
    """Each process writes its own RNG state into the (shared) temporary directory."""
    plain, tensors = capture_rng()
    (directory / f"rng_state_{rank}.json").write_text(json.dumps(plain))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"rng_torch_{rank}.safetensors"))


def write_main_state(
    directory: Path, run: Run, trainer_state: dict[str, Any], data_state: tuple[dict, dict] | None
) -> None:
    """Everything but the RNG; weights and optimizer only when not sharded (FSDP/DeepSpeed write
    theirs through `accelerator.save_state` into `sharded_state/`)."""
    model = run.model
    if not is_sharded(run.accelerator):
        write_weights(model.model, directory, run.config.finetuning)
        torch.save(model.optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "scheduler.json").write_text(json.dumps(model.scheduler.state_dict()))
    (directory / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    save_config(run.config, directory / "config.yaml")
    write_chat_template(directory, run.template)
    if data_state is not None:
        plain, tensors = data_state
        (directory / "data_state.json").write_text(json.dumps(plain))
        save_file(tensors, str(directory / "data_examples.safetensors"))


def load_data_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The data position a streaming or mixing run saved; None for a run whose order is f(seed, step)."""
    if not (path / "data_state.json").is_file():
        return None
    return json.loads((path / "data_state.json").read_text()), load_file(str(path / "data_examples.safetensors"))


def finalize(directory: Path, output_dir: Path, step: int) -> Path:
    """Write the manifest last, then rename the directory into place (atomic on one filesystem)."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    directory.rename(final)
    return final


def prune(output_dir: Path, limit: int | None, keep: set[Path]) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`, never one in `keep` (the best)."""
    if not limit:
        return []
    existing = checkpoint_dirs(output_dir)
    removable = [p for p in existing if p.resolve() not in {k.resolve() for k in keep}]
    excess = len(existing) - limit
    removed = removable[: max(0, excess)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------- resume


def validate(path: Path, fingerprint: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Check a checkpoint is complete, intact and from this run; return its trainer state."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{manifest_path}: damaged (not valid JSON)") from None
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the manifest lists it)")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"{file}: {file.stat().st_size} bytes, expected {meta['size']}; the file is truncated or was changed"
            )
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: content does not match its SHA-256 in the manifest; the file is damaged")
    sharded = any(name.startswith("sharded_state/") for name in manifest["files"])
    for name in ("trainer_state.json", "scheduler.json", *(() if sharded else ("optimizer.pt",))):
        if name not in manifest["files"]:
            raise CheckpointError(f"{path / name}: missing from the checkpoint")
    for rank in range(world_size):
        if f"rng_state_{rank}.json" not in manifest["files"]:
            raise CheckpointError(
                f"{path / f'rng_state_{rank}.json'}: missing; the checkpoint was written by "
                f"a run with fewer processes than {world_size}"
            )
    state = json.loads((path / "trainer_state.json").read_text())
    previous = state.get("fingerprint", {})
    changed = [
        f"{key}: checkpoint has {previous.get(key)!r}, this run has {value!r}"
        for key, value in fingerprint.items()
        if previous.get(key) != value
    ]
    if changed:
        raise CheckpointError(
            f"{path / 'trainer_state.json'}: the checkpoint is from a different run ("
            + "; ".join(changed)
            + "); resume with the same settings or start a new output_dir"
        )
    return state


def find_resume_checkpoint(
    output_dir: Path, setting: bool | str, fingerprint: dict[str, Any], world_size: int, warn: Any = print
) -> tuple[Path, dict[str, Any]] | None:
    """`true`: the newest checkpoint, refused if damaged; `latest`: the newest intact one; a path: that one."""
    if isinstance(setting, str) and setting not in ("latest", "true"):
        path = Path(setting)
        if not path.is_dir():
            raise CheckpointError(f"resume_from_checkpoint = {setting!r}: no such checkpoint directory")
        return path, validate(path, fingerprint, world_size)
    candidates = checkpoint_dirs(output_dir)
    if not candidates:
        return None
    if setting == "latest":
        for path in reversed(candidates):
            try:
                return path, validate(path, fingerprint, world_size)
            except CheckpointError as err:
                warn(f"skipping damaged checkpoint: {err}")
        raise CheckpointError(f"{output_dir}: no intact checkpoint to resume from")
    try:
        return candidates[-1], validate(candidates[-1], fingerprint, world_size)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. Set `resume_from_checkpoint: latest` to fall back to the newest intact "
            "checkpoint, or delete this one"
        ) from None


def load_weights(model: torch.nn.Module, path: Path, finetuning: str) -> None:
    if finetuning == "full":
        from safetensors.torch import load_model

        load_model(model, str(path / "model.safetensors"))
    else:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(
                f"{path / 'adapter_model.safetensors'}: does not fit this model ({unexpected[:3]} ...)"
            )


def load_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    finetuning: str,
    rank: int,
    accelerator: Any = None,
) -> None:
    """Restore weights, optimizer, scheduler and this process's RNG from a validated checkpoint."""
    if (path / "sharded_state").is_dir():
        accelerator.load_state(str(path / "sharded_state"))
    else:
        try:
            load_weights(model, path, finetuning)
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: the weights do not fit this model ({str(err).splitlines()[0]})") from None
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    plain = json.loads((path / f"rng_state_{rank}.json").read_text())
    with safe_open(str(path / f"rng_torch_{rank}.safetensors"), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    restore_rng(plain, tensors)


def save(run: Run, state: RunState, evaluation: dict[str, float] | None = None) -> Path:
    """checkpoint-STEP of the run as it stands, with the eval figures of this step if it was evaluated;
    then the oldest checkpoints beyond `save_total_limit` go, never the best one.

    Every process writes its RNG state (and its shard when sharded), the main process the rest; then
    one atomic rename."""
    accelerator, output_dir, step = run.accelerator, run.output_dir, state.step
    main = accelerator.is_main_process
    temp = temp_dir_for(output_dir, step)
    trainer_state = {**state.to_json(run.data.feed.epoch_of(step)), **(evaluation or {})}
    try:
        if main:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_process_state(temp, accelerator.process_index)
        if is_sharded(accelerator):  # FSDP/DeepSpeed: every process writes its shard
            accelerator.save_state(str(temp / "sharded_state"))
        if main:
            write_main_state(temp, run, trainer_state, run.data.feed.state_for(step))
        accelerator.wait_for_everyone()
        final = finalize(temp, output_dir, step) if main else output_dir / f"checkpoint-{step}"
        accelerator.wait_for_everyone()
    except OSError as err:
        shutil.rmtree(temp, ignore_errors=True)
        previous = [p.name for p in checkpoint_dirs(output_dir)]
        raise CheckpointWriteError(
            f"could not write checkpoint-{step} in {output_dir}: {err.strerror or err}. "
            f"Earlier checkpoints are intact ({', '.join(previous) or 'none yet'}); free disk space or fix "
            "permissions, then resume with `--resume_from_checkpoint true`"
        ) from None
    state.saved_step = step
    if main:
        prune(
            output_dir,
            run.config.save_total_limit,
            {output_dir / state.best_checkpoint} if state.best_checkpoint else set(),
        )
    return final


def resume(run: Run) -> RunState | None:
    """The state of the checkpoint `resume_from_checkpoint` names, with weights, optimizer, schedule,
    RNG and data position restored; None when resuming is off or there is no checkpoint yet."""
    setting = run.config.resume_from_checkpoint
    if setting is None or setting is False:
        return None
    found = find_resume_checkpoint(
        run.output_dir,
        "true" if setting is True else setting,
        run_fingerprint(run.config, run.world),
        run.world,
        run.say,
    )
    if found is None:
        run.say(f"[yellow]resume_from_checkpoint: no checkpoint in {run.output_dir}; starting from step 0[/yellow]")
        return None
    path, saved = found
    model, accelerator = run.model, run.accelerator
    load_state(
        path,
        model.model,
        model.optimizer,
        model.scheduler,
        run.config.finetuning,
        accelerator.process_index,
        accelerator,
    )
    run.data.feed.load_state(load_data_state(path))
    run.say(f"Resumed from {path} at step {saved['step']}")
    return RunState.from_json(saved)


def run_fingerprint(config: SFTConfig, world: int) -> dict[str, Any]:
    """Settings that must not change between a checkpoint and the run that resumes it."""
    lora = config.finetuning != "full"
    return {
        "model_name_or_path": config.model_name_or_path,
        "gguf_file": config.gguf_file,
        "finetuning": config.finetuning,
        "lora": [config.lora_r, config.lora_alpha, config.lora_target_modules] if lora else None,
        **(
            {
                "lora_variant": [
                    config.use_dora,
                    config.use_rslora,
                    config.lora_modules_to_save,
                    config.init_lora_weights,
                ]
            }
            if lora
            else {}
        ),
        "trainable_tokens": config.trainable_tokens if lora and config.trainable_tokens != "none" else None,
        # an unweighted source is written as before weights existed, so older checkpoints still resume
        "datasets": [
            {k: v for k, v in spec.items() if not (k == "weight" and v is None)}
            for spec in redacted(config)["datasets"]
        ],
        "max_seq_length": config.max_seq_length,
        "packing": config.packing,
        "seed": config.seed,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "world_size": world,
        **(
            {
                "streaming": config.streaming,
                "packing_buffer": config.packing_buffer,
                "on_exhausted": config.on_exhausted,
            }
            if config.streaming or config.is_mixture
            else {}
        ),
    }
