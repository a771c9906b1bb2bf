r"""``flamingo-eval``: few-shot evaluation of a saved Flamingo model, and scoring of prediction files.

Tiny CPU run (the shipped micro model and fixture data, no downloads, about 15 s)::

    python -m flamingo_eval.testing /tmp/fx                # writes every benchmark's files in their official formats
    flamingo-eval run --model micro --tasks coco vqav2 hateful_memes --shots 0 2 \
        --data-dir /tmp/fx --batch-size 2 --output /tmp/results.json

Real runs::

    flamingo-eval run --model my-flamingo --tasks coco vqav2 okvqa --shots 0 4 8 16 32 --trials 3 --data-dir /data \
        [--rices] [--num-samples 5000] [--batch-size 8] --output results.json --predictions-dir preds/
    accelerate launch --multi_gpu --num_processes 8 -m flamingo_eval run ...   # queries split across processes
    flamingo-eval score --task vqav2 --predictions preds/vqav2-4shot-seed42.json \
        --annotations v2_mscoco_val2014_annotations.json --questions v2_OpenEnded_mscoco_val2014_questions.json

Custom data (``flamingo_eval.data``; binding episodes: ``flamingo_eval.binding``)::

    flamingo-eval run --model my-flamingo --tasks custom --custom-kind caption|vqa|binding --data-dir DIR ...
    flamingo-eval run ... --demo-separator ''      # demos joined as in training: <image>a<|endofchunk|><image>b...
    flamingo-eval score --task custom --custom-kind caption|vqa --predictions preds/custom-4shot-seed42.json \
        --annotations DIR/test.jsonl                # the file the run read serves as the annotations

``--tasks``, ``--custom-kind``, the per-task path flags and ``score --task`` list the tasks registered in
``flamingo_eval.tasks``. ``--num-beams``, ``--max-new-tokens``, ``--demo-separator`` (escapes decoded: ``'\n'``)
and ``--zero-shot-text-demos`` override the task's own setting. Defaults: OpenFlamingo's, for comparability (two
text-only demos at 0 shots; 5 new tokens for VQA, 20 for captions), except that custom caption / VQA tasks take
``max_new_tokens`` from their data: the longest reference answer in tokens + 2.

Results: each trial records its score (``value``), for VQA the accuracy rule that applied (``vqa_rule``: official
formula with ten answers, exact match with fewer; ``flamingo_eval.metrics.vqa``), and ``truncated``: how many
generations used every new token without reaching a stop (a warning says so once).

Files: ``--data-dir`` holds one folder per task in the layout of ``flamingo_eval.data`` (or is one task's folder);
any file can be overridden with ``--path task.key=FILE`` or the per-task flags (``--coco-karpathy-json FILE``,
``--vqav2-test-annotations ""`` for a split without answers, e.g. a test-dev export). A rerun with the same
``--output`` resumes: batches already logged in ``<output>.progress/`` are not recomputed. Bad inputs end the run
with exit code 2 and one line naming the file and field.

Hostile or careless inputs (``flamingo_eval.data``, ``flamingo_eval.files``, ``flamingo_eval.results``): image paths
in the data files stay inside the task's data folders unless ``--allow-outside-paths``; an id repeated in an
annotation or predictions file, a boolean where a number belongs, and a file that is not UTF-8 are refused, naming
the file and the line or record; ``--output`` and ``--predictions-dir`` are checked before the model loads; and a
run locks ``<output>.lock``, so that a second run on the same output stops at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flamingo.configuration import DTYPE_NAMES
from flamingo.typed_config import FieldError, field_default

from .config import EvalConfig
from .score import scored_custom_kinds, scored_tasks
from .tasks import custom_kinds, task_names, tasks_named

# Every module above is light (no torch, no transformers): --help and flag errors answer at once. The runner and the
# model stack are imported in main(), once the flags are known to be good.


def default(name: str):
    """The default of an EvalConfig field: the flags take theirs from there, so the two cannot drift apart."""
    return field_default(EvalConfig, name)


def _layout_keys(name: str) -> list[str]:
    """The layout keys of every task registered as ``name`` (custom's kinds share theirs), in layout order."""
    return list(dict.fromkeys(key for task in tasks_named(name) for key in task.layout))


def parse_escapes(value: str) -> str:
    """``--demo-separator '\\n'`` -> a newline: Python string escapes (\\n, \\t, \\\\, \\x0a, \\u2028) are decoded;
    other text, non-ASCII included, is kept as typed. ``""`` is the empty separator."""
    try:
        # backslashreplace first, so non-ASCII text survives the latin-1 round trip of unicode_escape.
        return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"bad escape sequence in {value!r}: {error.reason}") from error


def _count(value: str) -> int:
    """A non-negative integer flag value."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flamingo-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="evaluate a saved model on few-shot benchmarks")
    run.add_argument(
        "--model", type=Path, required=True, help="directory written by Flamingo.save_pretrained (+ processor)"
    )
    run.add_argument("--tasks", nargs="+", required=True, choices=task_names())
    run.add_argument("--shots", nargs="+", type=int, default=default("shots"))
    run.add_argument("--trials", type=int, default=None, help="number of seeds (default: len(--seeds), else 1)")
    first_seed = default("seeds")[0]
    run.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help=f"trial seeds (default: {first_seed}; with --trials N: {first_seed}, {first_seed + 1}, ...)",
    )
    run.add_argument("--data-dir", type=Path, default=default("data_dir"))
    run.add_argument("--path", action="append", default=[], metavar="TASK.KEY=FILE", help="override one data file")
    run.add_argument(
        "--custom-kind", choices=custom_kinds(), default=default("custom_kind"), help="what --tasks custom holds"
    )
    run.add_argument("--rices", action="store_true", help="demos by CLIP image similarity instead of at random")
    run.add_argument(
        "--rices-vision-model",
        default=default("rices_vision_model"),
        help="open_clip model for RICES (default: the model's tower)",
    )
    run.add_argument("--rices-vision-pretrained", default=default("rices_vision_pretrained"))
    run.add_argument(
        "--rices-cache-dir", type=Path, default=default("rices_cache_dir"), help="default: <output>.rices/"
    )
    run.add_argument(
        "--query-set-size",
        type=int,
        default=default("query_set_size"),
        help=f"size of the random demo pool per seed (default {default('query_set_size')})",
    )
    run.add_argument(
        "--num-samples",
        type=int,
        default=default("num_samples"),
        help="evaluate this many random queries (default all)",
    )
    run.add_argument("--batch-size", type=int, default=default("batch_size"))
    run.add_argument(
        "--class-batch-size",
        type=int,
        default=default("class_batch_size"),
        help="class names scored per cached-prompt copy",
    )
    run.add_argument("--num-beams", type=int, default=default("num_beams"))
    run.add_argument(
        "--max-new-tokens",
        type=int,
        default=default("max_new_tokens"),
        help="default: the task's (custom caption/vqa: the longest reference answer in tokens + 2)",
    )
    run.add_argument(
        "--demo-separator",
        type=parse_escapes,
        default=default("demo_separator"),
        metavar="TEXT",
        help="text between demos, escapes decoded ('\\n', or '' as in training's chunk layout); default: the task's",
    )
    run.add_argument(
        "--zero-shot-text-demos",
        type=_count,
        default=default("zero_shot_text_demos"),
        metavar="N",
        help="text-only demos in a 0-shot prompt (0: the query alone); default: the task's, 2 as in OpenFlamingo",
    )
    run.add_argument("--dtype", choices=DTYPE_NAMES, default=default("dtype"))
    run.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code a model folder ships for its language model (only for a model you trust)",
    )
    run.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="read image paths that lead outside their data folder (../, absolute paths, symlinks out)",
    )
    run.add_argument("--output", type=Path, default=default("output"), help=f"default: {default('output')}")
    run.add_argument(
        "--predictions-dir",
        type=Path,
        default=default("predictions_dir"),
        help="write official-format prediction files here",
    )
    files = run.add_argument_group(
        "data files", "override single entries of the --data-dir layout (flamingo_eval.data)"
    )
    for task in task_names():
        for key in _layout_keys(task):
            files.add_argument(
                f"--{task.replace('_', '-')}-{key.replace('_', '-')}",
                dest=f"path__{task}__{key}",
                default=None,
                metavar="PATH",
            )

    score = commands.add_parser("score", help="score an official-format predictions file; prints one JSON object")
    score.add_argument("--task", required=True, choices=scored_tasks())
    score.add_argument(
        "--custom-kind", choices=scored_custom_kinds(), default=None, help="what --task custom holds"
    )
    score.add_argument("--predictions", type=Path, required=True)
    score.add_argument(
        "--annotations", type=Path, required=True, help="the official annotation file; custom: its test.jsonl"
    )
    score.add_argument("--questions", type=Path, default=None)
    score.add_argument(
        "--subset", action="store_true", help="score only the annotated items that have a prediction (--num-samples runs)"
    )
    return parser


def config_from_args(args: argparse.Namespace):
    """Parse the ``run`` flags into an :class:`EvalConfig` (ValueError on inconsistent flags)."""
    seeds = args.seeds
    if seeds is None:  # consecutive seeds from EvalConfig's first
        trials = args.trials or 1
        seeds = [default("seeds")[0] + i for i in range(trials)]
    elif args.trials is not None:
        if args.trials > len(seeds):
            raise ValueError(f"--trials {args.trials} needs at least that many --seeds; got {seeds}.")
        seeds = seeds[: args.trials]
    paths: dict[str, dict[str, str]] = {}
    for item in args.path:
        name, sep, value = item.partition("=")
        task, dot, key = name.partition(".")
        if not sep or not dot or task not in task_names():
            raise ValueError(f"--path {item!r}: expected TASK.KEY=FILE with TASK one of {task_names()}.")
        paths.setdefault(task, {})[key] = value
    for name, value in vars(args).items():
        if name.startswith("path__") and value is not None:
            _, task, key = name.split("__")
            paths.setdefault(task, {})[key] = value
    for name in args.tasks:
        if custom_kinds(name) and args.custom_kind is None:
            raise ValueError(f"--tasks {name} needs --custom-kind {'|'.join(custom_kinds(name))}.")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ValueError(f"--data-dir {args.data_dir}: directory not found.")
    try:
        return _eval_config(args, seeds=seeds, paths=paths)
    except FieldError as error:  # EvalConfig's own checks, said in terms of the flag
        raise ValueError(f"--{error.field.replace('_', '-')}: {error.message}") from None


def _eval_config(args: argparse.Namespace, *, seeds: list[int], paths: dict) -> EvalConfig:
    return EvalConfig(
        model=args.model,
        tasks=args.tasks,
        shots=args.shots,
        seeds=seeds,
        data_dir=args.data_dir,
        paths=paths,
        custom_kind=args.custom_kind,
        rices=args.rices,
        rices_vision_model=args.rices_vision_model,
        rices_vision_pretrained=args.rices_vision_pretrained,
        rices_cache_dir=args.rices_cache_dir,
        query_set_size=args.query_set_size,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        class_batch_size=args.class_batch_size,
        output=args.output,
        predictions_dir=args.predictions_dir,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        demo_separator=args.demo_separator,
        zero_shot_text_demos=args.zero_shot_text_demos,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        allow_outside_paths=args.allow_outside_paths,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            from .score import score_files

            scores = score_files(
                args.task,
                args.predictions,
                args.annotations,
                args.questions,
                subset=args.subset,
                custom_kind=args.custom_kind,
            )
            print(json.dumps(scores))
        else:
            config = config_from_args(args)  # flag errors first: the runner imports torch and transformers
            if not Path(config.model).is_dir():
                raise ValueError(f"--model {args.model}: directory not found.")
            from .results import check_output_paths, markdown_table

            # The Evaluator checks these again (for callers from Python); here they answer before torch loads.
            check_output_paths(
                config.output,
                predictions_dir=config.predictions_dir,
                rices_cache_dir=config.rices_cache_dir if config.rices else None,
            )
            from .runner import Evaluator

            results = Evaluator(config).run()
            if results is not None:  # the main process
                print(markdown_table(results["summary"]))
    except ValueError as error:
        # Bad inputs (missing file, wrong format) end with one readable line naming the file and field, no traceback.
        print(f"flamingo-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
