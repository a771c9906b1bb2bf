"""Training data pipeline: formats, layout and label rules, truncation, bad records, sharding and resume."""

import io
import json
import random
import shutil
import tarfile

import datasets
import pytest
import torch

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo_train.data import DataConfig, PositionTracker, write_synthetic_dataset
from flamingo_train.data.formats import BadRecord, Document, parse_record
from flamingo_train.data.samples import IGNORE_INDEX, SampleBuilder
from flamingo_train.data.synthetic import COLOURS, SHAPES, caption
from train_data_helpers import loader, png_bytes, rows, solid_image, take, tiny_processor, write_images, write_jsonl

# Documents as (text before the first image, [(image number, text after it), ...]).
DOCS = [
    ("Look.", [(0, "a cat."), (1, "a dog.")]),
    ("", [(2, "a bus.")]),
    ("Two photos:", [(3, "a tree."), (4, "a red sofa.")]),
]
PAIRS = [("", [(i, f"a photo of a {word}.")]) for i, word in enumerate(["cat", "dog", "boat"])]


@pytest.fixture(scope="module")
def processor(tiny_vision, tiny_llama_dir):
    return tiny_processor(tiny_vision, tiny_llama_dir)


def reference(processor, docs):
    """The batch the issue's layout describes, built by the processor from literal text (bos via the tokenizer)."""
    eos = processor.tokenizer.eos_token
    texts = [prefix + "".join(f"{MEDIA_TOKEN}{t}{END_OF_CHUNK_TOKEN}" for _, t in chunks) + eos for prefix, chunks in docs]
    images = [[solid_image(i) for i, _ in chunks] for _, chunks in docs]
    return processor(text=texts, images=images, padding_side="right")


def simple_records(docs, image=lambda i: f"img{i}.png"):
    return [{"text": prefix + "".join(f"{MEDIA_TOKEN}{t}" for _, t in chunks), "images": [image(i) for i, _ in chunks]}
            for prefix, chunks in docs]


def obelics_records(docs, image=lambda i: f"img{i}.png"):
    records = []
    for prefix, chunks in docs:
        texts, images = ([prefix], [None]) if prefix else ([], [])
        for i, text in chunks:
            texts += [None, text]
            images += [image(i), None]
        records.append({"texts": texts, "images": images})
    return records


def pair_records(docs, image=lambda i: f"img{i}.png"):
    return [{"image": image(chunks[0][0]), "caption": chunks[0][1]} for _, chunks in docs]


def write_as(kind, records, folder, features=None):
    """Write records as a .jsonl, .json (array or JSON Lines), .parquet, .arrow file or a save_to_disk directory."""
    if kind == "jsonl":
        return write_jsonl(folder / "data.jsonl", records)
    if kind == "json":
        (folder / "data.json").write_text(json.dumps(records, indent=2))
        return str(folder / "data.json")
    if kind == "json_lines":  # JSON Lines content under a .json name
        return write_jsonl(folder / "data.json", records)
    dataset = datasets.Dataset.from_list(records, features=features)
    if kind == "parquet":
        dataset.to_parquet(str(folder / "data.parquet"))
        return str(folder / "data.parquet")
    dataset.save_to_disk(str(folder / "saved"))
    if kind == "disk":
        return str(folder / "saved")
    arrow = folder / "data.arrow"  # the arrow file that save_to_disk wrote, read on its own
    shutil.copy(next((folder / "saved").glob("*.arrow")), arrow)
    return str(arrow)


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def assert_matches_reference(batch, expected, skipped=None):
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert torch.allclose(batch["pixel_values"], expected["pixel_values"])
    assert batch["skipped"] == (skipped or {})


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["jsonl", "json", "json_lines", "parquet", "arrow", "disk"])
def test_simple_documents_load_from_every_file_kind_as_the_layout_describes(processor, tmp_path, kind, streaming):
    write_images(tmp_path, 5)
    path = write_as(kind, simple_records(DOCS), tmp_path)
    batch = take(loader(processor, path, batch_size=3, shuffle=False, streaming=streaming, image_root=str(tmp_path)), 1)[0]
    assert_matches_reference(batch, reference(processor, DOCS))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("images", ["paths", "bytes", "image_feature"])
def test_obelics_documents_load_with_paths_bytes_or_image_feature(processor, tmp_path, images, streaming):
    if images == "paths":
        write_images(tmp_path, 5)
        path = write_as("jsonl", obelics_records(DOCS), tmp_path)
    elif images == "bytes":
        path = write_as("parquet", obelics_records(DOCS, image=lambda i: png_bytes(solid_image(i))), tmp_path)
    else:
        features = datasets.Features({"texts": datasets.List(datasets.Value("string")),
                                      "images": datasets.List(datasets.Image())})
        path = write_as("disk", obelics_records(DOCS, image=solid_image), tmp_path, features=features)
    batch = take(loader(processor, path, fmt="obelics", batch_size=3, shuffle=False, streaming=streaming), 1)[0]
    assert_matches_reference(batch, reference(processor, DOCS))


@pytest.mark.parametrize("kind", ["jsonl", "parquet_image_feature"])
def test_image_text_pairs_become_image_caption_endofchunk_eos(processor, tmp_path, kind):
    if kind == "jsonl":
        write_images(tmp_path, 3)
        path = write_as("jsonl", pair_records(PAIRS), tmp_path)
    else:
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        path = write_as("parquet", pair_records(PAIRS, image=solid_image), tmp_path, features=features)
    batch = take(loader(processor, path, fmt="pairs", batch_size=3, shuffle=False), 1)[0]
    assert_matches_reference(batch, reference(processor, PAIRS))


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_pair_shards_load_in_shard_order_ignoring_metadata_json(processor, tmp_path, streaming):
    for shard, docs in enumerate([PAIRS[:2], PAIRS[2:]]):
        members = []
        for _, [(i, text)] in docs:
            members += [(f"{i:05d}.png", png_bytes(solid_image(i))), (f"{i:05d}.txt", text.encode()),
                        (f"{i:05d}.json", b'{"url": "metadata, not a document"}')]
        write_tar(tmp_path / f"shard-{shard}.tar", members)
    data = loader(processor, tmp_path / "shard-*.tar", fmt="webdataset", batch_size=3, shuffle=False, streaming=streaming)
    assert_matches_reference(take(data, 1)[0], reference(processor, PAIRS))


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_interleaved_json_documents_name_their_image_members(processor, tmp_path, streaming):
    members = []
    for number, (record, (_, chunks)) in enumerate(zip(obelics_records(DOCS, image=lambda i: f"{i}.png"), DOCS)):
        key = f"doc{number}"
        if number == 1:  # full member names work as well as field names
            record["images"] = [f"{key}.{name}" if name else None for name in record["images"]]
        members.append((f"{key}.json", json.dumps(record).encode()))
        members += [(f"{key}.{i}.png", png_bytes(solid_image(i))) for i, _ in chunks]
    path = write_tar(tmp_path / "docs.tar", members)
    batch = take(loader(processor, path, fmt="webdataset", batch_size=3, shuffle=False, streaming=streaming), 1)[0]
    assert_matches_reference(batch, reference(processor, DOCS))


def test_synthetic_dataset_loads_in_every_format_with_captions_from_its_fixed_vocabulary(processor, tmp_path):
    captions = {caption(colour, shape) for colour in COLOURS for shape in SHAPES}
    tokenizer = processor.tokenizer
    for fmt in ("simple", "obelics", "pairs", "webdataset"):
        path = write_synthetic_dataset(tmp_path / fmt, format=fmt, num_records=6)
        batch = take(loader(processor, path, fmt=fmt, batch_size=6, shuffle=False), 1)[0]
        assert batch["skipped"] == {} and batch["input_ids"].shape[0] == 6
        for ids, pixels in zip(batch["input_ids"].tolist(), batch["pixel_values"]):
            text = tokenizer.decode(ids, skip_special_tokens=False)
            chunks = [c.split(END_OF_CHUNK_TOKEN)[0] for c in text.split(MEDIA_TOKEN)[1:]]
            assert chunks and set(chunks) <= captions
            assert int(pixels.flatten(1).abs().sum(1).gt(0).sum()) == len(chunks)


# ------------------------------------------------------------------------------------------------ labels
LABEL_DOCS = [("Intro text here.", [(0, "a cat."), (1, "a dog.")]), ("", [(2, "a bus.")])]


def label_batch(processor, tmp_path, **fields):
    write_images(tmp_path, 3)
    path = write_jsonl(tmp_path / "data.jsonl", simple_records(LABEL_DOCS))
    return take(loader(processor, path, batch_size=2, shuffle=False, **fields), 1)[0]


def test_image_tokens_are_masked(processor, tmp_path):
    batch = label_batch(processor, tmp_path)
    media = batch["input_ids"] == processor.media_token_id
    assert media.sum() == 3 and (batch["labels"][media] == IGNORE_INDEX).all()


def test_padding_is_masked_and_on_the_right(processor, tmp_path):
    batch = label_batch(processor, tmp_path)
    padding = batch["attention_mask"] == 0
    assert padding[1].any() and not padding[0].any()  # the second document is shorter
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(batch["attention_mask"][1], batch["attention_mask"][1].sort(descending=True).values)


def test_text_before_the_first_image_is_masked_by_default(processor, tmp_path):
    batch = label_batch(processor, tmp_path)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    first = int((ids == processor.media_token_id).nonzero()[0])
    assert first > 3  # bos + "Intro text here."
    assert (labels[:first] == IGNORE_INDEX).all()


def test_text_before_the_first_image_is_trained_when_configured(processor, tmp_path):
    batch = label_batch(processor, tmp_path, mask_text_before_first_image=False)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    first = int((ids == processor.media_token_id).nonzero()[0])
    assert torch.equal(labels[1:first], ids[1:first])


def test_endofchunk_and_eos_are_trained(processor, tmp_path):
    batch = label_batch(processor, tmp_path)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    closing = (ids == processor.end_of_chunk_token_id) | ((ids == processor.tokenizer.eos_token_id) & mask)
    assert closing.sum() == 3 + 2  # one <|endofchunk|> per image, one eos per document
    assert torch.equal(labels[closing], ids[closing])


def test_bos_is_added_and_masked_when_the_tokenizer_uses_one(processor, tmp_path):
    batch = label_batch(processor, tmp_path)
    assert (batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()


def test_no_bos_is_added_for_a_tokenizer_without_one(tiny_vision, tiny_lm_dir, tmp_path):
    gpt2 = tiny_processor(tiny_vision, tiny_lm_dir("gpt2"))
    batch = label_batch(gpt2, tmp_path)
    expected = gpt2.tokenizer("Intro text here.", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert batch["input_ids"][1, 0] == gpt2.media_token_id


def test_every_other_real_token_is_trained(processor, tmp_path):
    batch = label_batch(processor, tmp_path)
    ids, labels = batch["input_ids"], batch["labels"]
    for b in range(ids.shape[0]):
        real = batch["attention_mask"][b].bool()
        first = int((ids[b] == processor.media_token_id).nonzero()[0])
        rest = real.clone()
        rest[:first] = False
        rest &= ids[b] != processor.media_token_id
        assert torch.equal(labels[b][rest], ids[b][rest])
        assert (labels[b][~rest] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------------ truncation
WORDS = "a cat dog red photo of the image two on sofa park bus".split()


def random_document(rng):
    prefix = " ".join(rng.choices(WORDS, k=rng.randint(0, 6)))
    chunks = [(f"img{i}", " ".join(rng.choices(WORDS, k=rng.choice([0, 0, 1, 3, 8])))) for i in range(rng.randint(0, 7))]
    return Document(prefix, chunks)


def test_truncation_keeps_every_image_token_paired_with_its_image(processor):
    rng = random.Random(0)
    full_builder = SampleBuilder(processor, max_tokens=10_000, max_images=100, mask_text_before_first_image=False)
    media, closing = processor.media_token_id, {processor.end_of_chunk_token_id, processor.tokenizer.eos_token_id}
    kept = 0
    for _ in range(400):
        document = random_document(rng)
        max_tokens, max_images = rng.randint(2, 40), rng.randint(1, 4)
        builder = SampleBuilder(processor, max_tokens=max_tokens, max_images=max_images, mask_text_before_first_image=rng.random() < 0.5)
        full = full_builder.truncate(full_builder.token_ids(document))  # only drops textless trailing images
        try:
            sample = builder.build(document)
        except BadRecord as bad:
            assert bad.reason == "empty"
            continue
        kept += 1
        ids = sample.input_ids
        assert len(ids) <= max_tokens and ids.count(media) <= max_images
        assert ids.count(media) == len(sample.images) and sample.images == document.images[: len(sample.images)]
        if media in ids:  # no trailing <image> without text after it
            last = len(ids) - 1 - ids[::-1].index(media)
            assert any(token not in closing for token in ids[last + 1 :])
        assert ids == full[: len(ids)]  # a prefix of the whole document
        assert any(label != IGNORE_INDEX for label in sample.labels)
    assert kept > 200


def test_a_document_that_fits_is_kept_whole_with_its_eos(processor):
    document = Document("Intro.", [("a", "a cat."), ("b", "a dog.")])
    sample = SampleBuilder(processor, max_tokens=256, max_images=5).build(document)
    assert sample.input_ids[-1] == processor.tokenizer.eos_token_id and sample.images == ["a", "b"]


def test_a_trailing_image_without_text_is_dropped(processor, tmp_path):
    write_images(tmp_path, 2)
    record = {"texts": [None, "a cat.", None], "images": ["img0.png", None, "img1.png"]}
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    batch = take(loader(processor, path, fmt="obelics", batch_size=1), 1)[0]
    assert_matches_reference(batch, reference(processor, [("", [(0, "a cat.")])]))


# ------------------------------------------------------------------------------------------------ bad records
def write_bad_records(folder):
    write_images(folder, 2)
    (folder / "corrupt.png").write_bytes(b"not a png at all")
    records = [
        {"text": "<image>a cat.", "images": ["img0.png"]},
        '{"text": "<image>broken json", "images": ["img0.png"]',
        {"text": "<image>a dog.", "images": ["missing.png"]},
        {"text": "<image>a bus.", "images": ["corrupt.png"]},
        {"text": "<image>two tokens <image>one image.", "images": ["img1.png"]},
        {"text": 7, "images": ["img1.png"]},
        {"text": "only text, nothing to learn", "images": []},
        {"text": "<image>a dog.", "images": ["img1.png"]},
    ]
    return write_jsonl(folder / "data.jsonl", records)


def test_bad_records_are_skipped_and_counted_by_reason(processor, tmp_path):
    path = write_bad_records(tmp_path)
    batch = take(loader(processor, path, batch_size=8, shuffle=False), 1)[0]
    skipped = {"malformed_json": 1, "missing_image": 1, "corrupt_image": 1, "image_count_mismatch": 1,
               "malformed_record": 1, "empty": 1}
    assert_matches_reference(batch, reference(processor, [("", [(0, "a cat.")]), ("", [(1, "a dog.")])]), skipped)


def test_an_all_bad_batch_is_left_out_and_counted_in_the_next_batch(processor, tmp_path):
    path = write_bad_records(tmp_path)
    batches = take(loader(processor, path, batch_size=2, shuffle=False), 3)
    assert [b["skipped"] for b in batches] == [
        {"malformed_json": 1},  # records 0-1
        {"missing_image": 1, "corrupt_image": 1, "image_count_mismatch": 1, "malformed_record": 1, "empty": 1},
        {"malformed_json": 1},  # the second epoch starts with records 0-1 again
    ]
    assert batches[1]["input_ids"].shape[0] == 1  # records 2-5 (blocks 1 and 2) held no good record
    assert [b["position"]["next_block"] for b in batches] == [1, 4, 5]


def test_bad_webdataset_samples_are_skipped_and_counted(processor, tmp_path):
    members = [("a.png", png_bytes(solid_image(0))), ("a.txt", b"a cat."), ("b.png", b"garbage"), ("b.txt", b"a dog."),
               ("c.json", b"{not json"), ("d.json", json.dumps({"text": "<image>x", "images": ["9.png"]}).encode()),
               ("e.txt", b"a caption without an image")]
    path = write_tar(tmp_path / "bad.tar", members)
    batch = take(loader(processor, path, fmt="webdataset", batch_size=5, shuffle=False), 1)[0]
    assert batch["skipped"] == {"corrupt_image": 1, "malformed_json": 1, "missing_image": 1, "malformed_record": 1}
    assert batch["input_ids"].shape[0] == 1



def test_text_only_documents_train_beside_interleaved_ones_when_text_before_images_is_trained(processor, tmp_path):
    write_images(tmp_path, 1)
    records = [{"text": "Only text here.", "images": []}, {"text": "<image>a cat.", "images": ["img0.png"]}]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    batch = take(loader(processor, path, batch_size=2, shuffle=False, mask_text_before_first_image=False), 1)[0]
    assert batch["skipped"] == {}
    assert (batch["input_ids"][0] != processor.media_token_id).all()
    assert (batch["pixel_values"][0] == 0).all() and (batch["pixel_values"][1] != 0).any()
    real = batch["attention_mask"][0].bool()
    assert torch.equal(batch["labels"][0][real][1:], batch["input_ids"][0][real][1:])  # all but bos trained


def test_a_lone_surrogate_in_the_text_is_a_bad_record_not_a_crash(processor, tmp_path):
    write_images(tmp_path, 1)
    records = ['{"text": "half an emoji \\ud83d <image>a cat.", "images": ["img0.png"]}',
               {"text": "<image>a cat.", "images": ["img0.png"]}]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    batch = take(loader(processor, path, batch_size=2, shuffle=False), 1)[0]
    assert batch["skipped"] == {"malformed_record": 1} and batch["input_ids"].shape[0] == 1


def test_a_decompression_bomb_image_is_skipped_as_corrupt(processor, tmp_path, monkeypatch):
    from PIL import Image

    write_images(tmp_path, 1)  # 24 x 28 pixels: a "bomb" once the limit is 100 pixels (PIL raises above twice it)
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "<image>a cat.", "images": ["img0.png"]}] * 2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = loader(processor, path, batch_size=1, shuffle=False)
    with pytest.raises(ValueError, match=r"no usable record .*'corrupt_image'"):
        take(data, 1)


def test_the_first_line_of_a_file_with_a_utf8_byte_order_mark_is_read(processor, tmp_path):
    write_images(tmp_path, 1)
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "<image>a cat.", "images": ["img0.png"]}])
    (tmp_path / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "data.jsonl").read_bytes())
    batch = take(loader(processor, path, batch_size=1), 1)[0]
    assert batch["skipped"] == {}
    assert_matches_reference(batch, reference(processor, [("", [(0, "a cat.")])]))

@pytest.mark.parametrize("num_workers", [0, 1])
def test_strict_mode_raises_naming_the_file_and_line(processor, tmp_path, num_workers):
    path = write_bad_records(tmp_path)
    with pytest.raises(ValueError, match=r"data\.jsonl line 2 \(malformed_json\)"):
        take(loader(processor, path, batch_size=8, shuffle=False, strict=True, num_workers=num_workers), 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_data_with_no_usable_record_raises_instead_of_spinning(processor, tmp_path, streaming):
    write_images(tmp_path, 3)
    path = write_as("jsonl", pair_records(PAIRS), tmp_path)  # pairs, read as the default "simple" format
    with pytest.raises(ValueError, match=r"no usable record in two epochs .*'malformed_record': \d+"):
        take(loader(processor, path, batch_size=2, streaming=streaming), 1)


def test_strict_mode_names_the_tar_sample(processor, tmp_path):
    path = write_tar(tmp_path / "bad.tar", [("k1.png", b"garbage"), ("k1.txt", b"a cat.")])
    with pytest.raises(ValueError, match=r"bad\.tar sample k1 \(corrupt_image\)"):
        take(loader(processor, path, fmt="webdataset", batch_size=1, strict=True), 1)


# ------------------------------------------------------------------------------------------------ order, sharding, resume
def numbered_dataset(folder, count, bad=()):
    write_images(folder, 1)
    records = [("{broken" if i in bad else {"text": f"<image>a photo number {i}.", "images": ["img0.png"]})
               for i in range(count)]
    return write_jsonl(folder / "data.jsonl", records)


def test_the_loader_cycles_epochs_with_a_new_order_each_epoch(processor, tmp_path):
    path = numbered_dataset(tmp_path, 5)
    epochs = [rows(b) for b in take(loader(processor, path, batch_size=5), 3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 5 for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


@pytest.mark.parametrize("streaming,num_workers", [(False, 0), (False, 2), (True, 0), (True, 2)])
def test_two_ranks_together_take_what_one_process_takes_with_double_batch(processor, tmp_path, streaming, num_workers):
    path = numbered_dataset(tmp_path, 22)
    fields = dict(streaming=streaming, num_workers=num_workers, shuffle_buffer=8)
    single = take(loader(processor, path, batch_size=6, **fields), 5)  # crosses an epoch boundary
    ranks = [take(loader(processor, path, batch_size=3, rank=r, world_size=2, **fields), 5) for r in range(2)]
    for step in range(5):
        assert sorted(rows(single[step])) == sorted(rows(ranks[0][step]) + rows(ranks[1][step]))
        assert not set(rows(ranks[0][step])) & set(rows(ranks[1][step]))


def take_with_interruptions(processor, path, pieces, **fields):
    """Batches from a loader restarted after each piece of ``pieces`` steps from its tracker's (JSON) state."""
    seen, state = [], None
    for steps in pieces:
        tracker = PositionTracker()
        if state is not None:
            tracker.load_state_dict(state)
        for batch in take(loader(processor, path, start=state, **fields), steps):
            tracker.update(batch["position"])
            seen.append(batch)
        state = json.loads(json.dumps(tracker.state_dict()))
    return seen


@pytest.mark.parametrize("streaming,num_workers", [(False, 0), (False, 2), (True, 0), (True, 2)])
def test_a_resumed_loader_continues_with_the_batches_of_an_uninterrupted_one(processor, tmp_path, streaming, num_workers):
    path = numbered_dataset(tmp_path, 13, bad={1, 2, 3, 4, 5, 6, 9})
    fields = dict(streaming=streaming, num_workers=num_workers, batch_size=2, shuffle_buffer=4)
    expected = take(loader(processor, path, **fields), 9)
    # With batch size 2, a count of 2 or more means a whole all-bad batch was left out: resume must handle that.
    assert any(sum(batch["skipped"].values()) >= 2 for batch in expected)
    seen = take_with_interruptions(processor, path, (3, 2, 4), **fields)  # interrupted twice
    for got, want in zip(seen, expected, strict=True):
        assert rows(got) == rows(want) and got["skipped"] == want["skipped"]
        assert torch.equal(got["labels"], want["labels"]) and torch.equal(got["pixel_values"], want["pixel_values"])


def numbered_shards(folder, shards, per_shard, bad=()):
    """``shards`` JSONL files of ``per_shard`` records each, numbered across files; records in ``bad`` are broken."""
    write_images(folder, 1)
    for s in range(shards):
        numbers = range(s * per_shard, (s + 1) * per_shard)
        write_jsonl(folder / f"shard-{s}.jsonl", [
            "{broken" if i in bad else {"text": f"<image>a photo number {i}.", "images": ["img0.png"]} for i in numbers
        ])
    return str(folder / "shard-*.jsonl")


def test_split_by_shards_reads_every_record_once_per_epoch_across_all_readers(processor, tmp_path):
    path = numbered_shards(tmp_path, shards=4, per_shard=6)
    everything = rows(take(loader(processor, path, batch_size=24, shuffle=False), 1)[0])
    fields = dict(streaming=True, split_by="shards", num_workers=2, batch_size=3, shuffle_buffer=4)
    # 2 processes x 2 workers = 4 readers of one file each: 2 blocks of 3 records per lane make one epoch.
    batches = [take(loader(processor, path, rank=r, world_size=2, **fields), 4) for r in range(2)]
    per_rank = [rows_of(b) for b in batches]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)  # each record once, none missing
    # Batches alternate between the two lanes of a rank; each lane reads only its own file.
    shard_of_reader = {
        (r, lane): {shard_of(processor, row, per_shard=6) for b in batches[r][lane::2] for row in rows(b)}
        for r in range(2) for lane in range(2)
    }
    assert all(len(shards) == 1 for shards in shard_of_reader.values())
    assert len(set.union(*shard_of_reader.values())) == 4


def shard_of(processor, row, *, per_shard):
    number = int(processor.tokenizer.decode(row, skip_special_tokens=True).split("number")[1].strip(" ."))
    return number // per_shard


def rows_of(batches):
    return [row for batch in batches for row in rows(batch)]


def test_split_by_shards_resumes_with_the_batches_of_an_uninterrupted_loader(processor, tmp_path):
    path = numbered_shards(tmp_path, shards=4, per_shard=5, bad={1, 2, 7})
    fields = dict(streaming=True, split_by="shards", num_workers=2, batch_size=2, shuffle_buffer=3, rank=1,
                  world_size=2)
    expected = take(loader(processor, path, **fields), 8)
    seen = take_with_interruptions(processor, path, (3, 5), **fields)
    assert [rows(b) for b in seen] == [rows(b) for b in expected]
    assert [b["skipped"] for b in seen] == [b["skipped"] for b in expected]



def test_split_by_shards_a_run_of_bad_records_in_a_later_epoch_is_not_taken_for_unusable_data(processor, tmp_path):
    # The reader of shard 0 meets 12 bad records in a row every epoch, but also 8 good ones: it must keep going.
    path = numbered_shards(tmp_path, shards=4, per_shard=20, bad=set(range(12)))
    data = loader(processor, path, streaming=True, split_by="shards", shuffle=False, batch_size=2, world_size=4)
    batches = take(data, 12)  # epoch 0 is 4 batches (+6 all-bad ones left out); this reaches well into epoch 2
    assert sum(sum(b["skipped"].values()) for b in batches) >= 24


@pytest.mark.parametrize("streaming", [False, True])
def test_an_empty_shard_among_others_is_read_as_no_records(processor, tmp_path, streaming):
    path = numbered_shards(tmp_path, shards=4, per_shard=2)
    (tmp_path / "shard-2.jsonl").write_text("")  # e.g. a shard whose writer found nothing to write
    fields = dict(streaming=streaming, batch_size=2, world_size=4)
    if streaming:  # 4 readers of one file each: in some epochs reader 0 is dealt the empty file
        fields["split_by"] = "shards"
    batches = take(loader(processor, path, **fields), 12)
    assert all(b["skipped"] == {} and b["input_ids"].shape[0] >= 1 for b in batches)

def test_split_by_shards_with_fewer_files_than_readers_is_refused(processor, tmp_path):
    path = numbered_shards(tmp_path, shards=2, per_shard=3)
    with pytest.raises(ValueError, match="split_by='shards' needs at least one file per reader"):
        loader(processor, path, streaming=True, split_by="shards", num_workers=2, world_size=2)


def test_resuming_with_a_different_number_of_workers_is_refused(processor, tmp_path):
    path = numbered_dataset(tmp_path, 6)
    tracker = PositionTracker()
    tracker.update(take(loader(processor, path, batch_size=2), 1)[0]["position"])
    with pytest.raises(ValueError, match="num_workers"):
        loader(processor, path, batch_size=2, num_workers=2, start=tracker.state_dict())


# ------------------------------------------------------------------------------------------------ config
def test_data_config_rejects_unknown_fields_and_formats():
    with pytest.raises(ValueError, match="DataConfig 'x': batchsize: unknown field; did you mean batch_size?"):
        DataConfig.from_dict({"name": "x", "path": "a.jsonl", "batchsize": 4})
    with pytest.raises(ValueError, match="DataConfig 'x': format: must be one of"):
        DataConfig(name="x", path="a.jsonl", format="csv")


def test_a_path_that_matches_nothing_names_the_dataset_and_pattern(processor, tmp_path):
    with pytest.raises(ValueError, match=r"DataConfig 'test': path .*nothing-\*\.jsonl"):
        loader(processor, tmp_path / "nothing-*.jsonl")



def test_a_webdataset_folder_in_img2dataset_layout_reads_only_its_tar_shards(processor, tmp_path):
    write_tar(tmp_path / "00000.tar", [("00000000.png", png_bytes(solid_image(0))), ("00000000.txt", b"a cat.")])
    datasets.Dataset.from_list([{"key": "00000000", "status": "success"}]).to_parquet(str(tmp_path / "00000.parquet"))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))
    batch = take(loader(processor, tmp_path, fmt="webdataset", batch_size=1), 1)[0]
    assert_matches_reference(batch, reference(processor, [("", [(0, "a cat.")])]))

def test_tar_shards_with_a_non_webdataset_format_are_refused(processor, tmp_path):
    path = write_tar(tmp_path / "a.tar", [("k.txt", b"a cat.")])
    with pytest.raises(ValueError, match=r"a\.tar with format 'simple'"):
        loader(processor, path)


def _trained_text(processor, sample) -> list[str]:
    """The trained tokens, decoded run by run (a run: consecutive trained positions)."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [processor.tokenizer.decode(run) for run in runs]


def test_answer_labels_train_each_chunks_answer_and_its_end_of_chunk_only(processor):
    document = Document("Intro.", [
        ("a", "Question:what colour is it? Short answer:red"),
        ("b", "no marker here, context only"),
        ("c", "Output:a cat on a mat"),
        ("d", "This is a dax."),
    ])
    builder = SampleBuilder(processor, max_tokens=256, max_images=5, labels="answers",
                            answer_markers=("Output:", "Short answer:", "This is a"))
    sample = builder.build(document)
    assert sample.input_ids == SampleBuilder(processor, max_tokens=256, max_images=5).build(document).input_ids
    assert [t.strip() for t in _trained_text(processor, sample)] == [
        f"red{END_OF_CHUNK_TOKEN}", f"a cat on a mat{END_OF_CHUNK_TOKEN}", f"dax.{END_OF_CHUNK_TOKEN}"]
    assert sample.labels[-1] == IGNORE_INDEX  # eos is context in task data


def test_answer_labels_survive_truncation_and_reject_a_document_without_answers(processor):
    builder = SampleBuilder(processor, max_tokens=12, max_images=5, labels="answers", answer_markers=("Output:",))
    document = Document("", [("a", "Output:a cat"), ("b", "Output:a very long caption that gets cut here")])
    sample = builder.build(document)
    assert len(sample.input_ids) == 12
    assert _trained_text(processor, sample)[0].strip() == f"a cat{END_OF_CHUNK_TOKEN}"
    with pytest.raises(BadRecord, match="no trainable token"):
        builder.build(Document("", [("a", "just a caption")]))
    with pytest.raises(ValueError, match="labels: must be one of"):
        DataConfig(name="d", path="x.jsonl", labels="answer")


# ------------------------------------------------------------------------------------------------ separators
def test_whitespace_after_a_chunks_endofchunk_is_kept_before_the_next_image(processor, tmp_path):
    write_images(tmp_path, 2)
    text = f"Intro.{MEDIA_TOKEN}a cat.{END_OF_CHUNK_TOKEN}\n{MEDIA_TOKEN}a dog.{END_OF_CHUNK_TOKEN}\n"
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": text, "images": ["img0.png", "img1.png"]}])
    document = parse_record({"text": text, "images": ["a", "b"]}, "simple", None)
    assert document.chunks == [("a", "a cat."), ("b", "a dog.")] and document.separators == ["\n", ""]
    batch = take(loader(processor, path, batch_size=1), 1)[0]
    eos = processor.tokenizer.eos_token
    expected = processor(text=[text.rstrip() + eos], images=[[solid_image(0), solid_image(1)]])  # the last "\n" goes
    assert torch.equal(batch["input_ids"], expected["input_ids"])


def test_text_only_demos_before_the_first_image_keep_their_endofchunk_and_separator(processor):
    prefix = f"Output:a cat.{END_OF_CHUNK_TOKEN}\nOutput:a dog.{END_OF_CHUNK_TOKEN}\n"
    document = parse_record({"text": f"{prefix}{MEDIA_TOKEN}Output:a bus.", "images": ["a"]}, "simple", None)
    assert document.prefix == prefix
    builder = SampleBuilder(processor, max_tokens=256, max_images=5)
    assert builder.layout(document) == f"{prefix}{MEDIA_TOKEN}Output:a bus.{END_OF_CHUNK_TOKEN}"


def test_documents_without_a_separator_are_laid_out_as_before(processor):
    text = (f"Intro. {MEDIA_TOKEN}a cat. {END_OF_CHUNK_TOKEN}{MEDIA_TOKEN}a dog.  \n"
            f"{MEDIA_TOKEN}a bus.{END_OF_CHUNK_TOKEN}x")
    document = parse_record({"text": text, "images": ["a", "b", "c"]}, "simple", None)
    assert document.separators == ["", "", ""]
    assert SampleBuilder(processor, max_tokens=256, max_images=5).layout(document) == (
        f"Intro.{MEDIA_TOKEN}a cat.{END_OF_CHUNK_TOKEN}{MEDIA_TOKEN}a dog.{END_OF_CHUNK_TOKEN}"
        f"{MEDIA_TOKEN}a bus.{END_OF_CHUNK_TOKEN}x{END_OF_CHUNK_TOKEN}")


def test_last_answer_labels_train_only_the_last_chunks_answer_and_skip_the_separators(processor):
    document = Document("", [("a", "Output:a cat"), ("b", "Output:a dog"), ("c", "Output:a bus")], ["\n", "\n", ""])
    builder = SampleBuilder(processor, max_tokens=256, max_images=5, labels="last_answer", answer_markers=("Output:",))
    sample = builder.build(document)
    assert [t.strip() for t in _trained_text(processor, sample)] == [f"a bus{END_OF_CHUNK_TOKEN}"]
    every = SampleBuilder(processor, max_tokens=256, max_images=5, labels="answers", answer_markers=("Output:",))
    assert [t.strip() for t in _trained_text(processor, every.build(document))] == [
        f"a {word}{END_OF_CHUNK_TOKEN}" for word in ("cat", "dog", "bus")]
    with pytest.raises(BadRecord, match="no trainable token"):  # the query's answer cut: nothing left to train
        SampleBuilder(processor, max_tokens=256, max_images=2, labels="last_answer",
                      answer_markers=("Output:",)).build(document)
    assert DataConfig(name="d", path="x.jsonl", labels="last_answer").labels == "last_answer"
