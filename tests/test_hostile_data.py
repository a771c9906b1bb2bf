"""Hostile and careless training data: bounded work per record, files that are no images, paths out of the data
folder, bytes that are not UTF-8, and config values that would silently train nothing.

Every case is a skipped, counted bad record (or, for a whole file or a config, one error naming it), never a hang, a
crash deep inside a library, or an image read from elsewhere on the machine.
"""

import contextlib
import json
import math
import os
import random
import shutil
import signal
import struct
import zlib

import datasets
import pytest

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo_train.data import DataConfig
from flamingo_train.data.formats import BadRecord, parse_record
from flamingo_train.data.samples import SampleBuilder
from train_data_helpers import loader, rows, solid_image, take, tiny_processor, write_images, write_jsonl

A_CAT = {"text": "<image>a cat.", "images": ["img0.png"]}


@pytest.fixture(scope="module")
def processor(tiny_vision, tiny_llama_dir):
    return tiny_processor(tiny_vision, tiny_llama_dir)


class Hung(Exception):
    """Not an OSError (as TimeoutError is), so that no reader's ``except OSError`` takes it for a bad file."""


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging the suite) if the block takes longer; SIGALRM also interrupts a blocking open()."""

    def expire(*_):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class RecordingTokenizer:
    """A tokenizer that notes the length of every text it is given; everything else is the real one."""

    def __init__(self, tokenizer):
        self._tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


# ------------------------------------------------------------------------------------------------ bounded work
def test_a_huge_record_is_cut_before_it_is_tokenized_and_keeps_the_ids_of_the_whole_text(processor, tmp_path,
                                                                                        monkeypatch):
    write_images(tmp_path, 1)
    words = random.Random(0).choices("a cat dog red photo of the image two on sofa park bus".split(), k=600_000)
    huge = {"text": "<image>" + " ".join(words), "images": ["img0.png"]}  # 3.3 MB
    cut = {"text": huge["text"][:20_000], "images": ["img0.png"]}
    path = write_jsonl(tmp_path / "data.jsonl", [huge, cut])
    recording = RecordingTokenizer(processor.tokenizer)
    monkeypatch.setattr(processor, "tokenizer", recording)
    with deadline(60):
        batch = take(loader(processor, path, batch_size=2, shuffle=False, max_tokens=64), 1)[0]
    assert batch["skipped"] == {}
    assert max(recording.lengths) < 100_000  # 64 tokens of this vocabulary; the whole text is 3.3 million characters
    huge_row, cut_row = rows(batch)
    assert huge_row == cut_row and len(huge_row) == 64


WORDS = "a cat dog red photo of the image two on sofa park bus Output: Answer:".split()


def random_record(rng):
    """A simple record: a prefix, up to 7 images, chunks of 0 to 3000 words, some with separators after them."""
    chunks = [" ".join(rng.choices(WORDS, k=rng.choice([0, 1, 5, 40, 3000]))) for _ in range(rng.randint(0, 7))]
    text = " ".join(rng.choices(WORDS, k=rng.randint(0, 8)))
    for chunk in chunks:
        text += MEDIA_TOKEN + chunk + rng.choice(["", "", f"{END_OF_CHUNK_TOKEN}\n", " "])
    return {"text": text, "images": [f"img{i}.png" for i in range(len(chunks))]}


@pytest.mark.parametrize("labels", ["all", "answers", "last_answer"])
def test_bounded_reading_gives_the_samples_of_reading_everything(processor, labels):
    """Equivalence: cutting the text to max_chars and the images to max_images before any per-token or per-image
    work gives exactly the ids, labels and images of laying out and tokenizing the whole record."""
    rng = random.Random(labels)
    compared = cut = images_cut = 0
    for _ in range(150):
        record = random_record(rng)
        max_tokens, max_images = rng.choice([4, 16, 64, 256]), rng.randint(1, 4)
        fields = dict(max_tokens=max_tokens, max_images=max_images, labels=labels,
                      mask_text_before_first_image=rng.random() < 0.5, answer_markers=("Output:", "Answer:"))
        bounded, plain = SampleBuilder(processor, **fields), SampleBuilder(processor, **fields)
        plain.max_chars = math.inf  # the reference: lay out and tokenize everything
        outcomes = []
        for builder, limit in ((bounded, max_images), (plain, None)):
            try:
                sample = builder.build(parse_record(record, "simple", None, max_images=limit))
                outcomes.append((sample.input_ids, sample.labels, sample.images))
            except BadRecord as bad:  # "empty": both must agree on it too
                outcomes.append(bad.reason)
        assert outcomes[0] == outcomes[1], record
        compared += 1
        cut += len(plain.layout(parse_record(record, "simple", None))) > bounded.max_chars
        images_cut += len(record["images"]) > max_images
    assert compared == 150 and cut >= 10 and images_cut >= 10  # many records were cut by either bound


@pytest.mark.parametrize("fmt", ["simple", "obelics"])
def test_images_after_max_images_are_never_looked_at(processor, tmp_path, fmt):
    """A record with thousands of image entries costs what one with max_images + 1 does: the entries after the cut
    (here malformed, missing and outside the folder) are neither resolved nor checked."""
    write_images(tmp_path, 2)
    junk = [7, "missing.png", "../outside.png", {"no": "image"}] * 5000
    images = ["img0.png", "img1.png", *junk]
    texts = [f"photo {i}." for i in range(len(images))]
    if fmt == "simple":
        record = {"text": "".join(MEDIA_TOKEN + t for t in texts), "images": images}
    else:
        record = {"texts": [x for t in texts for x in (None, t)], "images": [x for i in images for x in (i, None)]}
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    batch = take(loader(processor, path, fmt=fmt, batch_size=1, max_images=2, max_tokens=256), 1)[0]
    assert batch["skipped"] == {}
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.media_token_id) == 2 and ids[-1] != processor.tokenizer.eos_token_id  # cut: no eos
    assert (batch["pixel_values"][0].flatten(1).abs().sum(1) > 0).tolist() == [True, True]


# ------------------------------------------------------------------------------------------- files that are no images
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_image_path_that_is_a_fifo_or_a_device_is_a_skipped_record_not_a_hang(processor, tmp_path, kind):
    write_images(tmp_path, 1)
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.png")  # nobody writes to it: reading would wait forever
        target, fields = "pipe.png", {}
    else:
        target, fields = "/dev/zero", {"allow_outside_paths": True}  # endless; outside the folder, so allowed here
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "<image>a pipe.", "images": [target]}, A_CAT])
    with deadline(10):
        batch = take(loader(processor, path, batch_size=2, shuffle=False, **fields), 1)[0]
    assert batch["skipped"] == {"missing_image": 1} and batch["input_ids"].shape[0] == 1


def huge_png(width, height):
    """A valid 1-bit PNG of width x height pixels, a few kB (it is all zeros)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + 1 bit per pixel
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height, 9))
            + chunk(b"IEND", b""))


def test_an_image_over_40_megapixels_is_refused_from_its_header_by_default(processor, tmp_path):
    write_images(tmp_path, 1)
    # 81 megapixels: over the default limit, under Pillow's own warning (89 M). 10 kB that would decode to 243 MB.
    (tmp_path / "huge.png").write_bytes(huge_png(9_000, 9_000))
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "<image>a wall.", "images": ["huge.png"]}, A_CAT])
    batch = take(loader(processor, path, batch_size=2, shuffle=False), 1)[0]
    assert batch["skipped"] == {"image_too_large": 1} and batch["input_ids"].shape[0] == 1


@pytest.mark.parametrize("limit,skipped", [(671, {"image_too_large": 1}), (672, {}), (None, {})])
def test_the_pixel_limit_is_the_configs_max_image_pixels(processor, tmp_path, limit, skipped):
    write_images(tmp_path, 1)  # 24 x 28 = 672 pixels
    solid_image(1, size=4).save(tmp_path / "small.png")  # 4 x 8
    path = write_jsonl(tmp_path / "data.jsonl", [A_CAT, {"text": "<image>a dot.", "images": ["small.png"]}])
    batch = take(loader(processor, path, batch_size=2, shuffle=False, max_image_pixels=limit), 1)[0]
    assert batch["skipped"] == skipped and batch["input_ids"].shape[0] == 2 - len(skipped)


# --------------------------------------------------------------------------------------- paths out of the data folder
def records_naming(fmt, image):
    """A record of ``fmt`` whose one image is ``image``, then a good one (img0.png)."""
    if fmt == "simple":
        return [{"text": "<image>a secret.", "images": [image]}, A_CAT]
    if fmt == "obelics":
        return [{"texts": [None, "a secret."], "images": [image, None]},
                {"texts": [None, "a cat."], "images": ["img0.png", None]}]
    return [{"image": image, "caption": "a secret."}, {"image": "img0.png", "caption": "a cat."}]


def outside_image(tmp_path, how):
    """The data folder tmp_path/data and an image outside it, named from inside as ``how`` says."""
    data = tmp_path / "data"
    write_images(data, 1)
    solid_image(5).save(tmp_path / "secret.png")
    if how == "symlink":
        (data / "link.png").symlink_to(tmp_path / "secret.png")
        return data, "link.png"
    return data, "../secret.png" if how == "dotdot" else str(tmp_path / "secret.png")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("fmt", ["simple", "obelics", "pairs"])
def test_an_image_path_leading_out_of_the_data_folder_is_a_skipped_record(processor, tmp_path, fmt, how):
    data, image = outside_image(tmp_path, how)
    path = write_jsonl(data / "data.jsonl", records_naming(fmt, image))
    batch = take(loader(processor, path, fmt=fmt, batch_size=2, shuffle=False), 1)[0]
    assert batch["skipped"] == {"outside_data_root": 1} and batch["input_ids"].shape[0] == 1
    trusted = take(loader(processor, path, fmt=fmt, batch_size=2, shuffle=False, allow_outside_paths=True), 1)[0]
    assert trusted["skipped"] == {} and trusted["input_ids"].shape[0] == 2


@pytest.mark.parametrize("kind", ["parquet_strings", "parquet_image_feature", "saved_strings"])
def test_parquet_and_saved_datasets_confine_their_image_paths_too(processor, tmp_path, kind):
    data, image = outside_image(tmp_path, "absolute")
    records = records_naming("pairs", image)
    features = None
    if kind == "parquet_image_feature":  # datasets keeps {"bytes": None, "path": ...} for an image given by path
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        records[1]["image"] = str(data / "img0.png")  # absolute, but inside the folder: allowed
    dataset = datasets.Dataset.from_list(records, features=features)
    if kind.startswith("parquet"):
        dataset.to_parquet(str(data / "data.parquet"))
        path = data / "data.parquet"
    else:
        dataset.save_to_disk(str(data / "saved"))
        path = data / "saved"
        shutil.copy(data / "img0.png", path / "img0.png")  # a saved dataset's root is its own folder
    batch = take(loader(processor, path, fmt="pairs", batch_size=2, shuffle=False), 1)[0]
    assert batch["skipped"] == {"outside_data_root": 1} and batch["input_ids"].shape[0] == 1


def test_image_root_is_the_folder_paths_are_confined_to(processor, tmp_path):
    data, _ = outside_image(tmp_path, "dotdot")
    (data / "images").mkdir()
    solid_image(0).save(data / "images" / "img0.png")
    path = write_jsonl(data / "data.jsonl", [A_CAT, {"text": "<image>a cat.", "images": ["../img0.png"]}])
    batch = take(loader(processor, path, batch_size=2, shuffle=False, image_root=str(data / "images")), 1)[0]
    assert batch["skipped"] == {"outside_data_root": 1}


def test_a_path_out_of_the_folder_is_named_with_its_record_in_the_log_and_in_strict_mode(processor, tmp_path, caplog):
    data, image = outside_image(tmp_path, "dotdot")
    outside = records_naming("simple", image)[0]
    path = write_jsonl(data / "data.jsonl", [A_CAT, outside, outside])
    with caplog.at_level("WARNING", logger="flamingo_train.data.loader"):
        assert take(loader(processor, path, batch_size=3, shuffle=False), 1)[0]["skipped"] == {"outside_data_root": 2}
    (message,) = [r.getMessage() for r in caplog.records if "outside_data_root" in r.getMessage()]  # once a reason
    assert "data.jsonl line 2" in message and "'../secret.png'" in message and "allow_outside_paths" in message
    with pytest.raises(ValueError, match=r"data\.jsonl line 2 \(outside_data_root\): image path '\.\./secret\.png'"):
        take(loader(processor, path, batch_size=3, shuffle=False, strict=True), 1)


# ------------------------------------------------------------------------------------------------ encodings
UNICODE_TEXTS = ["a cat Åland.", "a \u2028 line separator.", "a \u0085 next line.", "一只猫.", "a cat 🐈."]


@pytest.mark.parametrize("start,skipped", [
    (b"\xef\xbb\xbf", {"not_utf8": 1}),  # a UTF-8 byte-order mark before the first record
    (b'\x00{"text": "NUL bytes"}\n', {"not_utf8": 1, "malformed_json": 1}),  # one bad line, not a UTF-16 file
])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_line_that_is_not_utf8_is_one_skipped_record_and_the_rest_load_unchanged(processor, tmp_path, streaming,
                                                                                   start, skipped):
    write_images(tmp_path, 1)
    good = [{"text": f"<image>{t}", "images": ["img0.png"]} for t in UNICODE_TEXTS]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines.insert(2, b'{"text": "<image>caf\xe9 latin-1", "images": ["img0.png"]}')
    (tmp_path / "data.jsonl").write_bytes(start + b"\n".join(lines) + b"\n")
    records = len(lines) + start.count(b"\n")  # one batch of them all
    batch = take(loader(processor, tmp_path / "data.jsonl", batch_size=records, shuffle=False, streaming=streaming),
                 1)[0]
    assert batch["skipped"] == skipped
    write_jsonl(tmp_path / "clean.jsonl", good)
    expected = take(loader(processor, tmp_path / "clean.jsonl", batch_size=5, shuffle=False), 1)[0]
    assert rows(batch) == rows(expected)
    eos = processor.tokenizer.eos_token
    texts = [processor.tokenizer.decode(row[1:]) for row in rows(batch)]  # bos left out
    assert texts == [f"{MEDIA_TOKEN}{t}{END_OF_CHUNK_TOKEN}{eos}" for t in UNICODE_TEXTS]


def test_strict_mode_names_the_line_that_is_not_utf8(processor, tmp_path):
    write_images(tmp_path, 1)
    (tmp_path / "data.jsonl").write_bytes(json.dumps(A_CAT).encode() + b'\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl line 2 \(not_utf8\): is not valid UTF-8 \(byte 10"):
        take(loader(processor, tmp_path / "data.jsonl", batch_size=2, shuffle=False, strict=True), 1)


@pytest.mark.parametrize("encoding,named", [("utf-16", "UTF-16LE"), ("utf-16-le", "UTF-16LE"),
                                            ("utf-16-be", "UTF-16BE"), ("utf-32", "UTF-32LE"),
                                            ("utf-32-be", "UTF-32BE")])
@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_utf16_or_utf32_file_is_refused_naming_the_file_and_its_encoding(processor, tmp_path, encoding, named,
                                                                          suffix):
    write_images(tmp_path, 1)
    path = tmp_path / f"data.{suffix}"
    path.write_text(json.dumps(A_CAT) + "\n", encoding=encoding)
    expected = rf"DataConfig 'test': .*data\.{suffix} is encoded as {named} .*must be UTF-8\. Convert it"
    with pytest.raises(ValueError, match=expected):
        loader(processor, path)


# ------------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_a_loss_weight_that_is_not_finite_is_refused(weight):
    with pytest.raises(ValueError, match=r"DataConfig 'd': loss_weight: must be a finite number >= 0"):
        DataConfig(name="d", path="x.jsonl", loss_weight=weight)
    with pytest.raises(ValueError, match=r"data\.yaml: loss_weight: must be a finite number"):
        DataConfig.from_dict({"name": "d", "path": "x.jsonl", "loss_weight": weight}, where="data.yaml")


@pytest.mark.parametrize("field,value,expected", [
    ("batch_size", True, "must be a whole number"),
    ("max_tokens", 64.5, "must be a whole number"),
    ("num_workers", False, "must be a whole number"),
    ("loss_weight", True, "must be a number"),
    ("max_image_pixels", 0, "must be >= 1"),
    ("max_image_pixels", 1.5e6, "must be a whole number"),
    ("allow_outside_paths", "yes", "must be true or false"),
    ("shuffle", 1, "must be true or false"),
])
def test_data_config_fields_built_in_python_are_checked_like_yaml_ones(field, value, expected):
    with pytest.raises(ValueError, match=rf"DataConfig 'd': {field}: {expected}"):
        DataConfig(name="d", path="x.jsonl", **{field: value})
