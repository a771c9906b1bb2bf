"""``flamingo-generate`` prints what ``Flamingo.generate`` gives for the same prompt, in each of its output forms, and
refuses bad flags and files in one line (exit code 2) before torch is imported.

Most runs call ``main`` in this process, with the loaders patched to hand out one micro model loaded for the module
(the ``cli`` fixture); the first test and the console-script test load it as a user's run does.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flamingo
from flamingo.demos import interleave, read_demos
from flamingo.generate_cli import main, stripped_text_streamer
from flamingo.micro.samples import write_samples
from train_loop_helpers import subprocess_env

BIN = Path(sys.executable).parent  # the console scripts of this venv
VQA = "Question:{question} Short answer:"
HEAVY = ("torch", "transformers", "open_clip", "PIL", "numpy")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """micro's sample scenes and demo folders, and each scene's question prompt."""
    folder = write_samples(tmp_path_factory.mktemp("samples"))
    scenes = json.loads((folder / "scenes.json").read_text())
    return folder, {name: VQA.format(question=scene["question"]) for name, scene in scenes.items()}


@pytest.fixture(scope="module")
def micro():
    return flamingo.Flamingo.from_pretrained("micro").eval(), flamingo.FlamingoProcessor.from_pretrained("micro")


@pytest.fixture
def cli(micro, monkeypatch, capsys):
    """``run(*argv) -> (exit code, stdout, stderr)`` of ``main``, with the loaders handing out ``micro``; the
    loaders' calls are recorded in ``run.loads``."""
    model, processor = micro
    loads = []

    def loader(loaded):
        def from_pretrained(name, **kwargs):
            loads.append((name, kwargs))
            return loaded
        return from_pretrained

    monkeypatch.setattr(flamingo.Flamingo, "from_pretrained", loader(model))
    monkeypatch.setattr(flamingo.FlamingoProcessor, "from_pretrained", loader(processor))

    def run(*argv):
        code = run_main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    run.loads = loads
    return run


def run_main(argv: list[str]) -> int:
    """main's exit code, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def answer(micro, batch, **settings) -> tuple[str, int]:
    """(text, number of new tokens) that ``model.generate`` gives for ``batch``: what the CLI must print."""
    model, processor = micro
    settings.setdefault("max_new_tokens", 32)
    new = model.generate(**batch, **settings)[0, batch["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True).strip(), len(new)


# ------------------------------------------------------------------------------------------------ answers
def test_the_printed_answer_is_what_generate_gives_for_the_image_then_the_prompt(samples, micro, capsys):
    folder, prompts = samples
    image = folder / "scene-1.png"
    code = main(["--model", "micro", "--image", str(image), "--prompt", prompts["scene-1.png"]])  # real loaders
    out, err = capsys.readouterr()
    expected, _ = answer(micro, micro[1]([image, prompts["scene-1.png"]]))
    assert expected  # a non-empty answer, so that the comparison says something
    assert (code, out, err) == (0, expected + "\n", "")


def test_json_holds_the_answer_the_prompt_and_the_settings(samples, micro, cli):
    folder, prompts = samples
    image, prompt = folder / "scene-0.png", prompts["scene-0.png"]
    code, out, _ = cli("--model", "micro", "--image", str(image), "--prompt", prompt, "--json")
    text, new_tokens = answer(micro, micro[1]([image, prompt]))
    assert code == 0
    assert json.loads(out) == {
        "text": text, "prompt": "<image>" + prompt, "images": [str(image)], "model": "micro", "demos": None,
        "new_tokens": new_tokens, "finished": True,
        "settings": {"max_new_tokens": 32, "num_beams": 1, "do_sample": False, "temperature": None, "top_p": None,
                     "top_k": None, "seed": None},
    }
    code, out, _ = cli("--model", "micro", "--image", str(image), "--prompt", prompt, "--json", "--max-new-tokens", "1")
    cut = json.loads(out)
    assert (code, cut["new_tokens"], cut["finished"], cut["settings"]["max_new_tokens"]) == (0, 1, False, 1)


@pytest.mark.parametrize("prompt", ["Output:", "Question:what colour is the star? Short answer:"])
def test_the_streamed_text_equals_the_plain_output(samples, cli, prompt):
    image = str(samples[0] / "scene-1.png")
    plain = cli("--model", "micro", "--image", image, "--prompt", prompt)
    streamed = cli("--model", "micro", "--image", image, "--prompt", prompt, "--stream")
    assert plain[0] == streamed[0] == 0
    assert len(plain[1].split()) >= 1
    assert streamed[1] == plain[1]


def test_the_streamer_writes_the_answer_stripped_then_a_newline(micro):
    out = io.StringIO()
    streamer = stripped_text_streamer(micro[1].tokenizer, out)
    for piece in [" ", "\n a", " small", " star ", " "]:
        streamer.on_finalized_text(piece)
    assert out.getvalue() == "a small star"  # the trailing space waits for more text
    streamer.on_finalized_text("", stream_end=True)
    assert out.getvalue() == "a small star\n"


def test_several_images_go_where_the_prompt_marks_them(samples, micro, cli):
    folder, _ = samples
    images = [folder / "scene-0.png", folder / "scene-1.png"]
    prompt = "<image>Output:a large yellow square<|endofchunk|><image>Output:"
    code, out, _ = cli("--model", "micro", "--image", str(images[0]), "--image", str(images[1]), "--prompt", prompt,
                       "--json")
    printed = json.loads(out)
    assert code == 0
    assert (printed["prompt"], printed["images"]) == (prompt, [str(i) for i in images])
    assert printed["text"] == answer(micro, micro[1](text=prompt, images=images))[0]


def test_demos_come_before_the_query_as_the_interleaved_python_call_puts_them(samples, micro, cli):
    folder, prompts = samples
    demos_dir, image, prompt = folder / "demos" / "vqa", folder / "scene-0.png", prompts["scene-0.png"]
    code, out, _ = cli("--model", "micro", "--demos", str(demos_dir), "--image", str(image), "--prompt", prompt,
                       "--json")
    printed = json.loads(out)
    demos = read_demos(demos_dir)
    batch = micro[1](interleave(demos) + [image, prompt])
    assert code == 0
    assert printed["prompt"].startswith("<image>" + demos[0].text)
    assert all(demo.text in printed["prompt"] for demo in demos)
    assert printed["images"] == [str(demo.image) for demo in demos] + [str(image)]
    assert printed["demos"] == str(demos_dir)
    assert printed["text"] == answer(micro, batch)[0]
    # the printed prompt is the one the model read: the same tokens as the interleaved call's
    assert torch.equal(micro[1](text=printed["prompt"], images=printed["images"])["input_ids"], batch["input_ids"])


def test_a_seeded_draw_repeats_and_some_seed_differs_from_greedy(samples, cli):
    argv = ["--model", "micro", "--image", str(samples[0] / "scene-0.png"), "--prompt", "Output:"]
    greedy = cli(*argv)[1]
    draws = {seed: cli(*argv, "--do-sample", "--temperature", "2", "--top-p", "0.99", "--seed", str(seed))
             for seed in range(4)}
    assert all(code == 0 for code, _, _ in draws.values())
    assert cli(*argv, "--do-sample", "--temperature", "2", "--top-p", "0.99", "--seed", "0") == draws[0]
    assert any(out != greedy for _, out, _ in draws.values())


def test_beam_search_gives_what_generate_gives_with_beams(samples, micro, cli):
    image = samples[0] / "scene-2.png"  # a scene whose caption by three beams is not the greedy one
    code, out, _ = cli("--model", "micro", "--image", str(image), "--prompt", "Output:", "--num-beams", "3")
    batch = micro[1]([image, "Output:"])
    beams = answer(micro, batch, num_beams=3)[0]
    assert beams != answer(micro, batch)[0]
    assert (code, out) == (0, beams + "\n")


def test_trust_remote_code_reaches_both_loaders(samples, cli):
    argv = ["--model", "micro", "--image", str(samples[0] / "scene-0.png"), "--prompt", "Output:"]
    cli(*argv)
    cli(*argv, "--trust-remote-code")
    assert [kwargs["trust_remote_code"] for _, kwargs in cli.loads] == [False, False, True, True]
    assert {name for name, _ in cli.loads} == {"micro"}


# ------------------------------------------------------------------------------------------------ errors
def bad_files(tmp: Path) -> dict[str, Path]:
    """Each kind of bad input file or folder, made in ``tmp``."""
    (tmp / "not-an-image.png").write_text("not a PNG")
    os.mkfifo(tmp / "pipe.png")  # nobody writes to it: reading would wait forever
    (tmp / "no-demos").mkdir()
    (tmp / "bad-demos").mkdir()
    (tmp / "bad-demos" / "demos.jsonl").write_text('{"image": "gone.png", "text": "Output:a cat."}\n')
    (tmp / "not-a-model").mkdir()
    return {name: tmp / name for name in ("not-an-image.png", "pipe.png", "no-demos", "bad-demos", "not-a-model")}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image", "{tmp}/missing.png"], "--image {tmp}/missing.png: file not found."),
        (["--image", "{tmp}"], "--image {tmp} is a directory"),
        (["--image", "{tmp}/pipe.png"], "--image {tmp}/pipe.png is a FIFO"),
        (["--image", "{tmp}/not-an-image.png"], "Cannot read image {tmp}/not-an-image.png"),
        (["--demos", "{tmp}/nowhere"], "--demos {tmp}/nowhere: directory not found."),
        (["--demos", "{tmp}/no-demos"], "--demos {tmp}/no-demos: no demos.jsonl in it"),
        (["--demos", "{tmp}/bad-demos"], "--demos {tmp}/bad-demos/demos.jsonl, line 1, field 'image'"),
        (["--model", "{tmp}/no-model"], "--model {tmp}/no-model: directory not found"),
        (["--model", "{tmp}/not-a-model"], "{tmp}/not-a-model holds no preprocessor_config.json"),
        (["--temperature", "0", "--do-sample"], "argument --temperature: expected a number above 0; got '0'"),
        (["--top-p", "1.5", "--do-sample"], "argument --top-p: expected a number in (0, 1]; got '1.5'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1; got '0'"),
        (["--top-k", "-1", "--do-sample"], "argument --top-k: expected an integer >= 0; got '-1'"),
        (["--seed", "1"], "--seed applies only with --do-sample"),
        (["--json", "--stream"], "argument --stream: not allowed with argument --json"),
        (["--stream", "--num-beams", "2"], "works only without beams; got --num-beams 2"),
        (["--prompt", "<image>a<image>b", "--image", "{tmp}/missing.png"], "--prompt has 2 <image> marker(s) but 1"),
        (["--image", "{tmp}/missing.png", "--image", "{tmp}/missing.png"], "--prompt has 0 <image> markers but 2"),
    ],
)
def test_a_bad_input_is_one_line_naming_it_and_exit_code_2(flags, message, tmp_path, capsys):
    bad_files(tmp_path)
    argv = ["--model", "micro", "--prompt", "Output:", *(flag.format(tmp=tmp_path) for flag in flags)]
    code = run_main(argv)  # real loaders: the model folder errors come from them
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("flamingo-generate: error: ")
    assert message.format(tmp=tmp_path) in err


# A fresh interpreter runs main on each argv in turn, as the console script would, then reports the exit codes and
# which heavy packages got imported.
PROBE = """
import json, sys
from flamingo.generate_cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as stop:
        codes.append(stop.code)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def test_help_and_flag_and_file_errors_answer_without_importing_torch(samples, tmp_path):
    bad = bad_files(tmp_path)
    image = str(samples[0] / "scene-0.png")
    query = ["--model", "micro", "--prompt", "Output:"]
    argvs = [
        ["--help"],
        [*query, "--image", str(tmp_path / "missing.png")],
        [*query, "--image", str(bad["pipe.png"])],
        [*query, "--image", image, "--demos", str(bad["bad-demos"])],
        [*query, "--image", image, "--temperature", "0", "--do-sample"],
        [*query, "--image", image, "--json", "--stream"],
        ["--model", str(tmp_path / "no-model"), "--prompt", "Output:", "--image", image],
    ]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 2, 2, 2, 2, 2, 2], "heavy": []}
    assert done.stdout.startswith("usage: flamingo-generate")
    assert done.stderr.count("flamingo-generate: error: ") == len(argvs) - 1


def test_the_console_script_prints_the_answer_and_nothing_on_stderr(samples, micro):
    folder, prompts = samples
    image = folder / "scene-3.png"
    done = subprocess.run([str(BIN / "flamingo-generate"), "--model", "micro", "--image", str(image),
                           "--prompt", prompts["scene-3.png"]], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    expected, _ = answer(micro, micro[1]([image, prompts["scene-3.png"]]))
    assert (done.returncode, done.stdout, done.stderr) == (0, expected + "\n", "")
