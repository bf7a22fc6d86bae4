"""The data side of a run, set up from the config: eval sets, and the feed the loop draws steps from.

concatenated sources           → PlannedFeed (tokenized up front; order = f(seed, step))
weighted sources (a mixture)   → OnlineFeed over the tokenized Arrow sources
streaming: true                → OnlineFeed over streams, tokenized on the fly (only eval sets up front)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sftkit.config import SFTConfig
from sftkit.data.dataset import DataOptions, PreparedData, prepare_data
from sftkit.data.examples import TrainingExamples
from sftkit.data.inspect import data_stats, with_mixture
from sftkit.data.packing import Packs, padding_efficiency
from sftkit.data.template import require_chat_template
from sftkit.data.tokenize import RowTokenizer, default_num_proc
from sftkit.train.batches import BatchPlan
from sftkit.train.distributed import main_process_first_on_each_machine
from sftkit.train.feed import Feed, OnlineFeed, OnlineOptions, PlannedFeed
from sftkit.train.schedule import warmup_steps_for
from sftkit.train.sources import ArrowSource, ExampleSource, Exchange, StreamSource


@dataclass
class EvalSet:
    """One eval set, packed like the training data, in micro-batches of sequence ids."""

    examples: TrainingExamples
    sequences: Packs
    micro_batches: list[range]

    @classmethod
    def from_dataset(cls, dataset: Any, max_seq_length: int, packing: bool, batch_size: int) -> EvalSet:
        examples = TrainingExamples.from_dataset(dataset)
        sequences = examples.sequences(max_seq_length, packing)
        count = len(sequences)
        return cls(examples, sequences, [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)])


@dataclass
class RunData:
    feed: Feed
    prepared: PreparedData  # eval sets and their prompts (and the tokenized train set unless streaming)
    total_steps: int
    steps_per_epoch: int | None  # None: an online feed has no epoch of known length
    sequences: int | None  # packed training sequences of a planned feed
    weights: dict[str, float]  # a mixture's weight per source path; empty when sources are concatenated
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)  # label ('' when unnamed) → its batches
    warmup_steps: int = 0

    def stats(self, max_seq_length: int, batch_size: int, packing: bool) -> dict[str, Any]:
        """What `data inspect` reports; for a stream, over the examples read so far (the first buffer)."""
        if isinstance(self.feed, PlannedFeed):
            return data_stats(self.prepared, max_seq_length, batch_size, self.feed.sequences if packing else None)
        if self.prepared.train is not None:  # a mixture of tokenized sources
            return with_mixture(data_stats(self.prepared, max_seq_length, batch_size), self.weights)
        assert isinstance(self.feed, OnlineFeed)  # a stream: neither planned nor tokenized up front
        return sampled_stats(self.feed, batch_size)


def exchange_for(world: int) -> Exchange:
    """How processes swap the examples each tokenized (a stream's rows are tokenized once per run)."""
    if world == 1:
        return lambda mine: [mine]

    def exchange(mine: Any) -> list[Any]:
        shares: list[Any] = [None] * world
        torch.distributed.all_gather_object(shares, mine)
        return shares

    return exchange


def load_run_data(
    config: SFTConfig, tokenizer: Any, template: str, accelerator: Any, tell: Callable[[str], None]
) -> RunData:
    """The feed, and each eval set in micro-batches of `per_device_eval_batch_size`."""
    data = _load_feed(config, tokenizer, template, accelerator, tell)
    data.eval_sets = {
        label: EvalSet.from_dataset(
            tokenized.dataset, config.max_seq_length, config.packing, config.per_device_eval_batch_size
        )
        for label, tokenized in data.prepared.eval_sets.items()
    }
    data.warmup_steps = warmup_steps_for(data.total_steps, *config.warmup_fraction_or_steps)
    return data


def _load_feed(
    config: SFTConfig, tokenizer: Any, template: str, accelerator: Any, tell: Callable[[str], None]
) -> RunData:
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    data_options = DataOptions.from_config(config, template, training=True)
    with main_process_first_on_each_machine(accelerator):  # tokenize once; the other processes read the cache
        prepared = prepare_data(data_options, tokenizer)
    names = config.source_names
    paths = [spec.path for spec in config.datasets]
    if not config.streaming and not config.is_mixture:
        assert prepared.train is not None  # tokenized up front unless streaming
        examples = TrainingExamples.from_dataset(prepared.train.dataset, paths)
        sequences = examples.sequences(config.max_seq_length, config.packing, progress=main)
        plan = BatchPlan(
            sequences, config.per_device_train_batch_size, config.gradient_accumulation_steps, world, config.seed
        )
        return RunData(
            PlannedFeed(examples, sequences, plan, rank, names),
            prepared,
            plan.total_steps(config.num_train_epochs, config.max_steps),
            plan.steps_per_epoch,
            len(sequences),
            {},
        )
    options = OnlineOptions(
        capacity=config.max_seq_length,
        packing=config.packing,
        buffer=config.packing_buffer,
        micro_batch_size=config.per_device_train_batch_size,
        accumulation=config.gradient_accumulation_steps,
        world_size=world,
        rank=rank,
        seed=config.seed,
        on_exhausted=config.on_exhausted,
        weights=tuple(spec.weight or 0.0 for spec in config.datasets) if config.is_mixture else None,
    )
    if config.streaming:
        from sftkit.data.stream import SourceStream

        # the machine's cores are shared by its processes (torchrun sets LOCAL_WORLD_SIZE); one stays with the loop
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = config.dataset_num_proc or max(1, default_num_proc() // local_world - 1)
        sources: list[ExampleSource] = []
        for index, (spec, name) in enumerate(zip(config.datasets, names, strict=True)):
            stream = SourceStream(spec, name, config.system_prompt, config.skip_bad_rows)
            require_chat_template(template, stream.format, spec.path, tokenizer)
            sources.append(
                StreamSource(
                    stream,
                    index,
                    RowTokenizer(tokenizer, data_options.tokenize, spec.path),
                    exchange_for(world),
                    rank,
                    world,
                    workers,
                )
            )
    else:
        assert prepared.train is not None
        examples = TrainingExamples.from_dataset(prepared.train.dataset, paths)
        sources = [
            ArrowSource(examples, np.flatnonzero(examples.sources == index), index, name, config.seed)
            for index, name in enumerate(names)
        ]
    return RunData(OnlineFeed(sources, options, tell), prepared, config.max_steps, None, None, config.mixture_weights)


def sampled_stats(feed: OnlineFeed, batch_size: int) -> dict[str, Any]:
    """Figures over the examples a stream has queued so far: its first buffer at the start of a run."""
    feed.prime()
    lengths = np.array([len(example["input_ids"]) for sequence in feed.queue for example in sequence], np.int64)
    trained = sum(example["trained"] for sequence in feed.queue for example in sequence)
    total = int(lengths.sum())
    sequence_lengths = [sum(len(example["input_ids"]) for example in sequence) for sequence in feed.queue]
    efficiency = padding_efficiency(sequence_lengths, batch_size)  # micro-batches in the queue's order
    return {
        "streaming": True,
        "sampled_examples": len(lengths),
        "total_tokens": total,
        "trained_tokens": trained,
        "trained_token_fraction": trained / total if total else 0.0,
        "packed_sequences": len(feed.queue),
        "packing_efficiency": efficiency,
        "packing_waste": 1 - efficiency,
    }
