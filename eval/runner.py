"""The few-shot evaluation loop: for each task, seed and shot count, build prompts, run the model, score, save.

Run it through the CLI (``flamingo-eval run ...``, see ``flamingo_eval.cli``) or from Python (``EvalConfig`` lives in
``flamingo_eval.config`` and is importable from here too)::

    config = EvalConfig(model=Path("my-flamingo"), tasks=["coco"], shots=[0, 4], seeds=[42], data_dir=Path("data"))
    results = Evaluator(config).run()           # also writes config.output (results JSON)

Each name in ``tasks`` is looked up in the registry (``flamingo_eval.tasks``); the runner asks the Task object for its
data, prompt (``spec``, with the config's decoding / separator overrides), demos (the support pool, random or RICES,
or the query's own episode for binding), decoding, predictions format and metric, and never tests a task's name.

Per trial (task, shots, seed): the queries (all, or ``num_samples`` drawn with the seed) are cut into batches of
``batch_size``; process r of W evaluates batches r, r+W, ... (the batches themselves never depend on W, so a
2-process run computes exactly what a 1-process run does), logs each finished batch for resumption
(``flamingo_eval.results``), and the main process gathers the records, scores and writes. Demo images are encoded
once per run (:class:`MediaCache`); classification reuses one KV-cached prompt for all class names.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flamingo import Flamingo, FlamingoProcessor
from flamingo.configuration import torch_dtype

from .config import EvalConfig
from .data import load_task_data
from .demos import ImageEmbedder, RandomDemos, RicesDemos, cached_features
from .generation import count_truncated
from .metrics.okvqa_stem import require_stem_backend
from .results import OutputLock, ProgressLog, check_output_paths, settings_hash, write_results
from .score import trial_scores, write_predictions
from .tasks import Task, TaskSpec, get_task, spec_for_data


class MediaCache:
    """Perceiver latents per image file, so a demo image shared by many queries is encoded once.

    ``media(image_lists)`` -> (B, T_max, n, d), zero-padded past each sample's own images (never attended).
    """

    # 8192 entries hold a 2048-example demo pool plus the queries that recur across shots and seeds; at 64 latents of
    # width 1024 in bf16 that is 1 GiB of accelerator memory. Least recently used entries go first.
    def __init__(self, model, processor, *, enabled: bool = True, max_items: int = 8192, chunk: int = 64):
        self.model, self.processor, self.enabled = model, processor, enabled
        self.max_items, self.chunk = max_items, chunk
        self._latents: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # images run through the vision tower + perceiver, for tests and benchmarks

    @torch.no_grad()
    def _encode(self, paths: list) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(paths), self.chunk):
            part = paths[start : start + self.chunk]
            pixels = self.processor.preprocess_images([[p] for p in part]).to(self.model.device, self.model.dtype)
            # (n, d) each; cloned, since a view would keep its whole chunk's latents alive after its own eviction.
            out.extend(latents.clone() for latents in self.model.encode_media(pixels)[:, 0])
            self.encoded += len(part)
        return out

    def media(self, image_lists: list[list]) -> torch.Tensor:
        if self.enabled:
            keys = list(dict.fromkeys(str(p) for images in image_lists for p in images))
            missing = [key for key in keys if key not in self._latents]
            for key, latents in zip(missing, self._encode(missing)):
                self._latents[key] = latents
            for key in keys:  # recently used: the demo pool's images stay while the queries stream past
                self._latents.move_to_end(key)
            # Look up before evicting, so a batch larger than the cache still gets all its images.
            lookup = {key: self._latents[key] for key in keys}
            while len(self._latents) > self.max_items:
                self._latents.popitem(last=False)
        else:
            flat = [p for images in image_lists for p in images]
            lookup = dict(zip(map(str, flat), self._encode(flat)))
        first = next(iter(lookup.values()))
        most = max(len(images) for images in image_lists)
        media = first.new_zeros(len(image_lists), most, *first.shape)
        for b, images in enumerate(image_lists):
            for t, p in enumerate(images):
                media[b, t] = lookup[str(p)]
        return media


class Evaluator:
    """Runs :class:`EvalConfig` (``flamingo_eval.config``). ``model``/``processor`` may be passed in (tests,
    benchmarks, training's in-loop evaluation) instead of loaded.

    The output paths are checked, and the main process locks the output (``flamingo_eval.results.OutputLock``),
    before the model loads; ``run`` releases the lock when it ends.
    """

    def __init__(self, config: EvalConfig, *, model=None, processor=None):
        from accelerate import PartialState

        self.config = config
        # On a machine without an accelerator, processes started by torchrun / ``accelerate launch --multi_gpu``
        # only join one gloo group if PartialState is told it runs on CPUs.
        self.state = PartialState(cpu=not torch.accelerator.is_available())
        check_output_paths(
            config.output,
            predictions_dir=config.predictions_dir,
            rices_cache_dir=config.rices_cache_dir if config.rices else None,
        )
        # Only the main process writes the results: the other processes of the same run must not contend for it.
        self.output_lock = OutputLock(config.output)
        if self.state.is_main_process:
            self.output_lock.acquire()
        try:
            self._set_up(config, model, processor)
        except BaseException:
            self.output_lock.release()
            raise

    def _set_up(self, config: EvalConfig, model, processor) -> None:
        if model is None:
            model, processor = load_model(
                config.model, dtype=torch_dtype(config.dtype), trust_remote_code=config.trust_remote_code
            )
        self.model = model.to(self.state.device).eval()
        self.processor = processor
        self.media_cache = MediaCache(self.model, processor, enabled=config.media_cache)
        self.batches_computed = 0
        self.progress_dir = Path(str(config.output) + ".progress")
        self._embedder = None

    # ------------------------------------------------------------------------------------------------ driver
    def run(self) -> dict | None:
        """Evaluate every (task, shots, seed); the main process writes and returns the results, others None."""
        if self.state.is_main_process:
            self.output_lock.acquire()  # held already, unless an earlier run() released it
        try:
            return self._run_all()
        finally:
            self.output_lock.release()

    def _run_all(self) -> dict | None:
        cfg = self.config
        trials: list[dict] = []
        run_config = {**dataclasses.asdict(cfg), "model_config": _model_identity(self.model)}
        tasks = [get_task(name, custom_kind=cfg.custom_kind) for name in cfg.tasks]
        # Every trial this run owes, in run order; results.json says which are still missing until the last one ends.
        missing = [{"task": t.name, "shots": k, "seed": s} for t in tasks for s in cfg.seeds for k in cfg.shots]
        if self.state.is_main_process:
            write_results(cfg.output, config=run_config, trials=trials, missing=missing)
        if any(task.spec.stem for task in tasks):
            # Fail before hours of generation if the stemming packages are missing, and record which rule ran.
            run_config["okvqa_stem_backend"] = require_stem_backend()
        for task in tasks:
            name = task.name
            data = load_task_data(
                task, data_dir=cfg.data_dir, paths=cfg.paths.get(name), allow_outside_paths=cfg.allow_outside_paths
            )
            spec = self._spec(task, data)
            episodes = task.kind.episode_demos(data)  # None: demos come from the support pool
            rices = cfg.rices and episodes is None
            support_features = self._features(data.support, f"{name} support") if rices else None
            for seed in cfg.seeds:
                query_positions = self._query_positions(len(data.query), seed)
                queries = [data.query[i] for i in query_positions]
                if episodes is not None:
                    sampler = episodes
                elif cfg.rices:
                    sampler = RicesDemos(
                        data.support,
                        support_features,
                        self._features(queries, f"{name} queries"),
                        max_k=max([*cfg.shots, spec.zero_shot_text_demos]),
                    )
                else:
                    sampler = RandomDemos(data.support, query_set_size=cfg.query_set_size, seed=seed)
                for shots in cfg.shots:
                    settings = self._settings(name, data, spec, shots=shots, seed=seed, num_queries=len(queries))
                    trial = self._run_trial(task, spec, queries, sampler, shots=shots, seed=seed, settings=settings)
                    missing.remove({"task": name, "shots": shots, "seed": seed})
                    if trial is not None:
                        trials.append({**trial, "trial": cfg.seeds.index(seed)})
                        write_results(cfg.output, config=run_config, trials=trials, missing=missing)
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            return None
        return write_results(cfg.output, config=run_config, trials=trials, missing=missing)

    def _spec(self, task: Task, data) -> TaskSpec:
        """The task's spec with the dataset's class names and the config's decoding / layout overrides."""
        cfg = self.config
        spec = spec_for_data(task, data, self.processor.tokenizer)  # custom: max_new_tokens from the answers
        # num_beams / max_new_tokens: 0 or None keep the task's value; any separator, "" included, replaces it.
        overrides = {k: v for k, v in (("num_beams", cfg.num_beams), ("max_new_tokens", cfg.max_new_tokens)) if v}
        if cfg.demo_separator is not None:
            overrides["demo_separator"] = cfg.demo_separator
        if cfg.zero_shot_text_demos is not None:  # 0 included: the query alone at 0 shots
            overrides["zero_shot_text_demos"] = cfg.zero_shot_text_demos
        return dataclasses.replace(spec, **overrides)

    def _settings(self, task: str, data, spec: TaskSpec, *, shots: int, seed: int, num_queries: int) -> dict:
        """Everything that changes a trial's batches; its hash names the progress log, so a rerun with other
        settings (or a retrained checkpoint in the same directory) never resumes from stale lines."""
        cfg = self.config
        weights = Path(cfg.model) / "model.safetensors" if cfg.model else None
        stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights and weights.is_file() else None
        return {
            "model": [str(Path(cfg.model).resolve()) if cfg.model else None, stamp, _model_identity(self.model)],
            "task": task,
            "files": {k: str(v) for k, v in data.files.items()},
            "spec": dataclasses.asdict(spec),
            "shots": shots,
            "seed": seed,
            "queries": [num_queries, cfg.num_samples, cfg.query_set_size],
            "rices": [cfg.rices, cfg.rices_vision_model, cfg.rices_vision_pretrained],
            "batching": [cfg.batch_size, cfg.class_batch_size, cfg.dtype],
        }

    def _query_positions(self, count: int, seed: int) -> list[int]:
        n = self.config.num_samples
        if n is None or n >= count:
            return list(range(count))
        # OpenFlamingo evaluates a seeded random subset when --num_samples is given.
        return sorted(np.random.default_rng(seed).choice(count, size=n, replace=False).tolist())

    def _features(self, examples, desc: str) -> torch.Tensor:
        cfg = self.config
        if self._embedder is None:
            if cfg.rices_vision_model:
                self._embedder = ImageEmbedder.from_open_clip(
                    cfg.rices_vision_model, cfg.rices_vision_pretrained, self.state.device
                )
            else:
                self._embedder = ImageEmbedder.from_flamingo(self.model, self.processor)
        cache_dir = cfg.rices_cache_dir or Path(str(cfg.output) + ".rices")
        # The main process computes and caches the features; the others then read its file.
        with self.state.main_process_first():
            return cached_features(
                examples, self._embedder, cache_dir=cache_dir, batch_size=cfg.batch_size * 8, desc=desc
            )

    # ------------------------------------------------------------------------------------------------ one trial
    def _run_trial(
        self, task: Task, spec: TaskSpec, queries, sampler, *, shots: int, seed: int, settings: dict
    ) -> dict | None:
        from accelerate.utils import gather_object

        cfg, state = self.config, self.state
        size = cfg.batch_size
        num_batches = -(-len(queries) // size)
        log = ProgressLog(
            self.progress_dir, name=f"{task.name}-{shots}shot-seed{seed}-{settings_hash(settings)}", rank=state.process_index
        )
        done = log.load()
        records: list[dict] = []
        mine = range(state.process_index, num_batches, state.num_processes)
        desc = f"{task.name} {shots}-shot seed {seed}"
        for batch in tqdm(mine, desc=desc, unit="batch", disable=not state.is_local_main_process):
            if batch in done:
                records.extend(done[batch])
                continue
            positions = range(batch * size, min((batch + 1) * size, len(queries)))
            batch_records = self._run_batch(task, spec, queries, positions, sampler, shots=shots)
            log.append(batch, batch_records)
            records.extend(batch_records)
            self.batches_computed += 1
        if state.num_processes > 1:
            records = gather_object(records)
        if not state.is_main_process:
            return None
        by_index = {r["index"]: r for r in records}
        if len(records) != len(queries) or sorted(by_index) != list(range(len(queries))):  # no drops, no duplicates
            raise RuntimeError(f"{desc}: gathered {len(records)} records for {len(by_index)} of {len(queries)} queries.")
        ordered = [by_index[i] for i in range(len(queries))]
        predictions = prediction_records(task, queries, ordered)
        predictions_file = None
        if cfg.predictions_dir is not None:  # before scoring, so a metric that cannot be computed keeps the outputs
            name = f"{task.name}-{shots}shot-seed{seed}{'-rices' if cfg.rices else ''}.json"
            predictions_file = write_predictions(task, predictions, Path(cfg.predictions_dir) / name)
        return {
            "task": task.name,
            "shots": shots,
            "seed": seed,
            "metric": spec.metric,
            **trial_scores(task, predictions, queries, stem=spec.stem),  # "value" (None: no answers), VQA's rule
            "truncated": count_truncated(ordered),  # generations that ran out of max_new_tokens (None: no generation)
            "num_queries": len(queries),
            "rices": cfg.rices,
            "predictions": None if predictions_file is None else str(predictions_file),
        }

    def _run_batch(self, task: Task, spec: TaskSpec, queries, positions, sampler, *, shots: int) -> list[dict]:
        zero_shot = shots == 0
        k = shots if shots else spec.zero_shot_text_demos
        prompts, image_lists, batch = [], [], []
        for p in positions:
            query = queries[p]
            demos = sampler.select(query_index=p, query=query, k=k)
            prompts.append(spec.prompt(demos, query, zero_shot=zero_shot))
            image_lists.append(([] if zero_shot else [d.image for d in demos]) + [query.image])
            batch.append(query)
        media = self.media_cache.media(image_lists)
        out = task.kind.predict(
            self.model,
            self.processor.tokenizer,
            prompts=prompts,
            media=media,
            spec=spec,
            queries=batch,
            class_batch_size=self.config.class_batch_size,
        )
        return [{"index": p, "id": queries[p].id, **o} for p, o in zip(positions, out)]


# ---------------------------------------------------------------------------------------------------- helpers
def load_model(directory: Path, *, dtype=torch.float32, trust_remote_code: bool = False):
    """A saved Flamingo model and its processor; ValueError naming the directory if it is not one.
    trust_remote_code: the user's --trust-remote-code (never read from the model's files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--model {directory}: directory not found.")
    model = Flamingo.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval(), FlamingoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)


def _model_identity(model) -> dict:
    cfg = model.config
    return {
        "vision_model": cfg.vision_model,
        "vision_pretrained": cfg.vision_pretrained,
        "lang_model": cfg.lang_model,
        "cross_attn_every_n_layers": cfg.cross_attn_every_n_layers,
    }


def prediction_records(task: Task, queries, records: list[dict]) -> list[dict]:
    """Per-query records -> the task's official results format (``Kind.prediction_record``)."""
    # Each kind says which value it writes: HatefulMemes' P("yes"), every other task's predicted text or class.
    return [task.kind.prediction_record(q, task.kind.output(r)) for q, r in zip(queries, records)]
