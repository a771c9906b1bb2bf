"""The README and the pages of docs/ say what runs: every command in them runs as a test, every link and path in
them leads somewhere, and the citations agree with each other.

How a page marks its code blocks (an HTML comment on the line before the fence, invisible on GitHub):

* ``<!-- test: NAME -->``: the block is run (or read) by a test that calls ``doc_block("NAME")``; the tests that
  do are listed by :func:`test_every_runnable_block_is_run_by_a_test_or_says_why_not`'s failure message.
* ``<!-- not run: REASON -->``: the block needs what the tests cannot have (a download, a GPU, half an hour).

Every ``bash``/``sh``/``python`` block must carry one of the two, so a new command cannot go untested unnoticed; a
``bash`` block that begins with ``source .venv/bin/activate`` is runnable by construction and must be tested.

Which test runs which block:

==========================  =======================================================================================
block (page)                test
==========================  =======================================================================================
setup-commands (README)     test_entry_points.py::test_demo_runs_as_the_readme_starts_it
quick-start (README)        test_readme_quick_start_runs_and_prints_what_it_says
prompting (README)          test_readme_prompting_example_prints_the_output_shown_below_it (with prompting-output)
fine-tuning (README)        test_entry_points.py::test_readme_fine_tuning_example_learns_the_task_from_the_images_...
evaluation (README)         test_entry_points.py::test_readme_evaluation_example_runs_and_writes_results_and_...
decoding-by-hand (model)    test_media_state.py::test_the_readmes_decoding_by_hand_example_runs_and_its_new_...
eval-section (training)     test_training_docs_eval_section_is_a_valid_config_section
random-model-example (tr.)  test_entry_points.py::test_random_model_example_runs_and_learns_from_its_images
binding-episode (eval.)     test_evaluation_docs_binding_episode_is_read_as_documented
binding-run (evaluation)    test_evaluation_docs_binding_command_runs_on_micro
micro-load (micro)          test_micro_docs_loading_block_loads_the_shipped_model
==========================  =======================================================================================
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
RUNNABLE = ("bash", "sh", "python")
ACTIVATE = "source .venv/bin/activate"
MARK = re.compile(r"<!-- (test|not run): (.+?) -->")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page: its language, text, and the mark on the line before it (``test``, ``not
    run`` or None) with the mark's name or reason."""

    page: Path
    line: int  # 1-based, of the opening fence
    lang: str
    text: str
    mark: str | None
    label: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def page_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
            mark = MARK.fullmatch(lines[i - 1]) if i else None
            blocks.append(Block(page, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", mark and mark[1],
                                mark and mark[2]))
            i = end
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in page_blocks(page)]


def doc_block(name: str) -> str:
    """The text of the one block of the README or docs/ marked ``<!-- test: name -->``."""
    found = [b for b in all_blocks() if b.mark == "test" and b.label == name]
    assert len(found) == 1, f"expected one block marked '<!-- test: {name} -->', found {[str(b) for b in found]}"
    return found[0].text


def run_bash_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    """A block that starts with ``source .venv/bin/activate``, run in ``cwd`` with the venv running the tests in
    place of ``.venv`` (its bin/ first on PATH), stopping at the first failing command."""
    assert block.startswith(ACTIVATE + "\n"), block
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = "set -euo pipefail\n" + block.split("\n", 1)[1]
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True)


def run_python_block(block: str, cwd: Path, monkeypatch) -> tuple[dict, str]:
    """Execute a python block as a script in ``cwd``; returns its namespace and what it printed."""
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<doc block>", "exec"), namespace)
    return namespace, out.getvalue()


# ------------------------------------------------------------------------------------------------ coverage
def names_used_by_tests() -> dict[str, list[str]]:
    """Block name -> the test files that call ``doc_block`` with that name (read from their code, not run)."""
    used: dict[str, list[str]] = {}
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "doc_block" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                used.setdefault(node.args[0].value, []).append(path.name)
    return used


def test_every_runnable_block_is_run_by_a_test_or_says_why_not():
    blocks = all_blocks()
    assert len(blocks) > 20  # the pages really are read
    unmarked = [str(b) for b in blocks if b.lang in RUNNABLE and b.mark is None]
    assert not unmarked, (f"code blocks with no '<!-- test: NAME -->' (and a test calling doc_block(\"NAME\")) or "
                          f"'<!-- not run: REASON -->' on the line before: {unmarked}")
    skipped_runnable = [str(b) for b in blocks if b.text.startswith(ACTIVATE + "\n") and b.mark != "test"]
    assert not skipped_runnable, f"blocks that run as written must be tested: {skipped_runnable}"
    names = [b.label for b in blocks if b.mark == "test"]
    assert len(names) == len(set(names)), f"a test name marks two blocks: {sorted(names)}"
    used = names_used_by_tests()
    untested = sorted(set(names) - set(used))
    assert not untested, f"blocks marked for a test that no test runs (no doc_block(\"NAME\") in tests/): {untested}"
    missing = sorted(set(used) - set(names))
    assert not missing, f"tests ask for blocks that no page marks: { {n: used[n] for n in missing} }"


def test_every_mark_stands_right_before_a_code_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if "<!-- test" in line or "<!-- not run" in line:
                assert MARK.fullmatch(line), f"{page.name}:{number}: a mark reads '<!-- test: NAME -->' or " \
                                             f"'<!-- not run: REASON -->', alone on its line: {line!r}"
                following = lines[number] if number < len(lines) else ""
                assert following.startswith("```"), f"{page.name}:{number}: a mark must be followed by a fence"


# ------------------------------------------------------------------------------------------------ links
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (backticks included), spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: dict[str, int] = {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            base = slug(heading[1])
            count = found.get(base, 0)
            found[base] = count + 1
            if count:
                found[f"{base}-{count}"] = 1
    return set(found)


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links inside code are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_link_of_the_readme_and_docs_leads_to_a_file_and_heading_that_exist():
    checked = 0
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            assert destination.exists(), f"{page.name} links to {target}, which does not exist"
            assert destination.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
            if anchor:
                assert destination.suffix == ".md", f"{page.name}: an anchor into a file that is not a page: {target}"
                assert anchor in anchors(destination), (
                    f"{page.name} links to {target}, but {destination.name} has no heading with that anchor")
            checked += 1
    assert checked > 40


def test_the_readme_links_every_docs_page_and_its_contents_list_every_section():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in readme, f"the README does not link docs/{page.name}"
    sections = re.findall(r"^## (.+)$", readme, flags=re.M)
    contents = readme.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    for section in sections:
        if section != "Contents":
            assert f"(#{slug(section)})" in contents, f"the README's contents do not list '{section}'"
    for needed in ("Install", "Quick start", "Fine-tuning", "Evaluation", "Limitations", "License and citation"):
        assert needed in sections
    # What a user needs first, not a research log: the rest lives in docs/.
    assert len(readme.splitlines()) <= 250, "the README grew past 250 lines; move detail into docs/"


# ------------------------------------------------------------------------------------------------ citations
ARXIV = re.compile(r"(?:arXiv[:.]|arxiv\.org/abs/|eprint\s*=\s*\{)(\d{4}\.\d{4,5})")


def test_the_readme_citation_file_and_bibtex_cite_the_same_papers_under_an_apache_licence():
    readme = (ROOT / "README.md").read_text().split("## License and citation", 1)[1]
    bibtex = (ROOT / "docs/citations.md").read_text()
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    from_cff = {m for ref in cff["references"] for m in ARXIV.findall(ref.get("url", ""))}
    assert set(ARXIV.findall(bibtex)) == from_cff
    assert len(from_cff) == 9  # Flamingo, OpenFlamingo, Perceiver, Perceiver IO, CLIP, LIMoE, U-P-MoE, µ2Net, PaLI
    assert set(ARXIV.findall(readme)) == {"2204.14198", "2308.01390"}  # Flamingo and OpenFlamingo; the rest by name:
    for system in ("Perceiver", "CLIP", "OpenCLIP", "LIMoE", "Uni-Perceiver-MoE", "µ2Net", "PaLI"):
        assert system in readme and system in bibtex, system
    assert "[BibTeX](docs/citations.md)" in readme
    assert "10.5281/zenodo.5143773" in bibtex  # OpenCLIP
    assert any(ref.get("doi") == "10.5281/zenodo.5143773" for ref in cff["references"])
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    assert all(ref["authors"] and ref["title"] and ref["year"] for ref in cff["references"])
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "[LICENSE](LICENSE)" in readme and "Apache-2.0" in readme


# ------------------------------------------------------------------------------------------------ the blocks
def test_readme_quick_start_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    import torch

    import flamingo

    namespace, printed = run_python_block(doc_block("quick-start"), tmp_path, monkeypatch)
    claim = re.search(r"It prints `(.+?)` twice", (ROOT / "README.md").read_text())
    assert claim, "the README's sentence on what the Quick start prints moved; update this test with it"
    assert printed == f"{claim[1]}\n{claim[1]}\n"  # the model's caption, then the reference caption
    assert (tmp_path / "my-flamingo" / "model.safetensors").is_file()
    reloaded, processor = namespace["model"], namespace["processor"]
    micro = flamingo.Flamingo.from_pretrained("micro").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**namespace["batch"]).logits, micro(**namespace["batch"]).logits,
                                   rtol=0, atol=0)
    assert processor.tokenizer.get_vocab() == flamingo.FlamingoProcessor.from_pretrained("micro").tokenizer.get_vocab()


def test_readme_prompting_example_prints_the_output_shown_below_it(tmp_path, monkeypatch):
    _, printed = run_python_block(doc_block("prompting"), tmp_path, monkeypatch)
    assert printed == doc_block("prompting-output")
    assert (tmp_path / "mine.png").is_file()


def test_readme_prompting_templates_are_the_ones_micro_was_trained_on():
    from flamingo_train.recipes.texts import BINDING_QUERY, CAPTION_PROMPT, VQA_PROMPT

    readme = (ROOT / "README.md").read_text()
    for template in (CAPTION_PROMPT.split("{")[0], VQA_PROMPT.replace("{answer}", ""), BINDING_QUERY):
        assert f"| `{template}` |" in readme, template


def test_micro_docs_loading_block_loads_the_shipped_model(tmp_path, monkeypatch):
    import flamingo

    namespace, _ = run_python_block(doc_block("micro-load"), tmp_path, monkeypatch)
    assert isinstance(namespace["model"], flamingo.Flamingo) and not namespace["model"].training
    assert namespace["processor"].tokenizer is not None


def test_training_docs_eval_section_is_a_valid_config_section(tmp_path):
    from flamingo_train.config import config_from_dict

    section = yaml.safe_load(doc_block("eval-section"))
    assert list(section) == ["eval"]
    (tmp_path / section["eval"]["data_dir"]).mkdir(parents=True)
    section["eval"]["data_dir"] = str(tmp_path / section["eval"]["data_dir"])
    raw = yaml.safe_load((ROOT / "training/configs/finetune_custom_jsonl.yaml").read_text())
    config = config_from_dict({**raw, **section}, where="docs/training.md")
    assert (config.eval.every, config.eval.tasks, config.eval.custom_kind) == (200, ["custom"], "vqa")
    assert config.eval.keep_best and config.eval.num_samples == 100


def test_evaluation_docs_binding_episode_is_read_as_documented(tmp_path):
    from PIL import Image

    from flamingo_eval.binding import read_episodes

    record = json.loads(doc_block("binding-episode"))
    for name in ("a.png", "b.png", "q.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "test.jsonl").write_text(json.dumps(record) + "\n")
    (episode,) = read_episodes(tmp_path / "test.jsonl", "test_jsonl")
    assert episode.answers == ("dax",) and episode.choices == ("dax", "blicket")
    assert [d.answers[0] for d in episode.demos] == ["dax", "blicket"]


def test_evaluation_docs_binding_command_runs_on_micro(tmp_path):
    result = run_bash_block(doc_block("binding-run"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = json.loads((tmp_path / "runs/eval/binding.json").read_text())["trials"]
    assert sorted(t["shots"] for t in trials) == [0, 2, 4]
    assert all(0 <= t["value"] <= 100 for t in trials)


# ------------------------------------------------------------------------------------------------ talking to it
def _count_word(index: int) -> str:
    """The true answer to "how many shapes are there?" for sample scene ``index`` (flamingo.micro.samples)."""
    from flamingo.micro.world import COUNT_WORDS, make_scene, rng_for

    return COUNT_WORDS[len(make_scene(rng_for("test", "samples", index)).shapes)]


def test_chat_docs_session_answers_and_shows_its_transcript(tmp_path, monkeypatch):
    namespace, printed = run_python_block(doc_block("chat-session"), tmp_path, monkeypatch)
    count_0, caption, count_1, transcript = printed.splitlines()
    assert (count_0, count_1) == (_count_word(0), _count_word(1))  # micro counts right, in a conversation too
    session = namespace["session"]
    assert transcript == session.text() and session.num_images == 2 and session.num_turns == 6
    assert transcript.count("<image>") == 2 and transcript.endswith(f"Short answer:{count_1}<|endofchunk|>")
    assert caption and caption in transcript


def test_chat_docs_streaming_prints_what_generate_returns(tmp_path, monkeypatch):
    import flamingo

    namespace, printed = run_python_block(doc_block("chat-streaming"), tmp_path, monkeypatch)
    model, processor = namespace["model"], namespace["processor"]
    plain = flamingo.ChatSession(model, processor)
    plain.add(tmp_path / "runs/samples/scene-1.png", "Output:")
    caption = plain.generate(max_new_tokens=24)
    plain.add("Question:how many shapes are there? Short answer:")
    assert printed == f"{caption}\n{plain.generate(max_new_tokens=8)}\n"
    assert caption.startswith("a ") and _count_word(1) in printed


def test_readme_chat_session_answers_then_streams_a_caption(tmp_path, monkeypatch):
    import flamingo

    namespace, printed = run_python_block(doc_block("readme-chat"), tmp_path, monkeypatch)
    model, processor = namespace["model"], namespace["processor"]
    count, caption = printed.split("\n", 1)
    assert count == _count_word(0)
    expected = flamingo.ChatSession(model, processor)  # the same turns, answered without streaming
    expected.add(tmp_path / "runs/samples/scene-0.png", "Question:how many shapes are there? Short answer:")
    expected.generate(max_new_tokens=8)
    expected.add(tmp_path / "runs/samples/scene-1.png", "Output:")
    assert caption == expected.generate(max_new_tokens=24) and caption.startswith("a ")


def test_readme_generate_block_answers_with_and_without_demos(tmp_path):
    result = run_bash_block(doc_block("readme-generate"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # no third-party log lines or bars
    wrote, colour, count = result.stdout.splitlines()
    scenes = json.loads((tmp_path / "runs/samples/scenes.json").read_text())
    assert wrote.startswith("wrote runs/samples")
    assert scenes["scene-1.png"]["question"] == "what colour is the star?"
    assert colour == scenes["scene-1.png"]["answer"]
    assert count == _count_word(0)


def test_chat_docs_shell_block_answers_the_sample_scenes(tmp_path):
    result = run_bash_block(doc_block("generate-shell"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    wrote, colour, caption, printed = result.stdout.splitlines()
    scenes = json.loads((tmp_path / "runs/samples/scenes.json").read_text())
    assert colour == scenes["scene-1.png"]["answer"]
    assert caption in scenes["scene-2.png"]["captions"]
    printed = json.loads(printed)
    assert printed["text"] == scenes["scene-0.png"]["answer"]
    assert printed["prompt"].count("<image>") == len(printed["images"]) == 5  # 4 demos + the query
