"""OpenFlamingo import parity: ``load_openflamingo`` reproduces the reference implementation (open_flamingo 2.0.1).

The reference model is built on the tiny backbones with all its trainable weights randomised (see
``openflamingo_reference.py``) and saved in every checkpoint layout OpenFlamingo produces; each one, imported with our
converter, must give the reference's logits (to 1e-4) and greedy generations on the same weights and inputs.
"""

import re
from types import SimpleNamespace

import pytest
import torch

import flamingo
from flamingo.testing import random_images
from openflamingo_reference import (
    CROSS_ATTN_EVERY,
    OPENFLAMINGO_LAYERS_ATTR,
    build_reference,
    checkpoint_variants,
    patched_forwards,
)

FAMILIES = ("llama", "gpt2", "opt", "gpt_neox", "mpt", "phi", "mistral", "qwen2")
VARIANTS = ("full", "full_v2", "full_v1", "trainable_v2", "trainable_v1")
TIED = {"gpt2", "opt", "mpt", "qwen2"}

# A left-padded batch: sample 0 has text before its first image and two images; sample 1 is shorter, has one image,
# so its second pixel_values slot is a zero padding image.
TEXTS = [
    "A few words first. <image>An image of a cat<|endofchunk|><image>A photo of",
    "Look: <image>two dogs",
]


@pytest.fixture(scope="module")
def openflamingo_on_transformers_5():
    """open_flamingo 2.0.1 predates transformers 5: patch three of its methods for this module only.

    ``FlamingoLayer.forward`` takes the decoder layer's arguments by keyword, but GPT-2 passes them positionally.
    ``FlamingoLMMixin.forward(input_ids, attention_mask, **kw)`` requires ``attention_mask``, which transformers 5
    ``generate`` drops when it is all ones, hides ``position_ids``, so that ``generate`` would not derive them
    from the left padding (GPT-2's absolute positions would shift), and passes the cache under its deprecated name.
    ``FlamingoLayer`` hides its decoder layer's attributes, which Qwen2 reads. The replacements pass positional
    arguments through, default the mask to None, declare ``position_ids``, rename the cache argument and forward
    attributes (details in ``patched_forwards``); a plain forward computes exactly what the originals compute.
    ``MonkeyPatch`` undoes them when the module's tests are done; the installed package is never edited.
    """
    with pytest.MonkeyPatch.context() as patch:
        for (owner, name), replacement in patched_forwards().items():
            patch.setattr(owner, name, replacement)
        yield


def _load(path, family, vision, lm_dir):
    return flamingo.load_openflamingo(
        path,
        vision_encoder=vision["name"],
        vision_pretrained=vision["weights"],
        lang_model=lm_dir,
        cross_attn_every_n_layers=CROSS_ATTN_EVERY,
        decoder_layers_attr=OPENFLAMINGO_LAYERS_ATTR.get(family),
    )


@pytest.fixture(scope="module")
def openflamingo_case(openflamingo_on_transformers_5, tiny_vision, tiny_lm_dir, tmp_path_factory):
    """``family -> case``: the randomised reference, its checkpoints on disk, our import of the full one, a batch
    made by our processor, and the reference's logits on it. Built once per family."""
    cases = {}

    def get(family):
        if family in cases:
            return cases[family]
        lm_dir = tiny_lm_dir(family)
        reference, tokenizer = build_reference(family, tiny_vision, lm_dir)
        directory = tmp_path_factory.mktemp(f"openflamingo_{family}")
        paths = {}
        for variant, state in checkpoint_variants(reference).items():
            paths[variant] = directory / f"{variant}.pt"
            torch.save(state, paths[variant])
        model, processor = _load(paths["full"], family, tiny_vision, lm_dir)
        images = random_images(3, seed=7)
        batch = processor(text=TEXTS, images=[images[:2], images[2:]])
        with torch.no_grad():
            logits = reference(
                vision_x=batch["pixel_values"], lang_x=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        cases[family] = SimpleNamespace(
            family=family, lm_dir=lm_dir, reference=reference, tokenizer=tokenizer, paths=paths,
            model=model.eval(), processor=processor, batch=batch, logits=logits,
        )
        return cases[family]

    return get


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _input_embedding_name(model):
    """The state-dict key of the LM's input embedding table."""
    embedding = model.lang_model.get_input_embeddings()
    return next(name for name, module in model.lang_model.named_modules() if module is embedding) + ".weight"


def test_the_batch_is_left_padded_with_a_padding_image_and_text_before_the_first_image(openflamingo_case):
    case = openflamingo_case("llama")
    ids, mask, pixels = case.batch["input_ids"], case.batch["attention_mask"], case.batch["pixel_values"]
    assert pixels.shape == (2, 2, 1, 3, 32, 32)
    assert torch.equal(pixels[1, 1], torch.zeros_like(pixels[1, 1])) and pixels[0, 1].abs().sum() > 0
    assert mask[1, 0] == 0 and mask[0].all()
    first_image = int((ids[0] == case.model.config.media_token_id).nonzero()[0])
    assert first_image > 2  # text (and <s>) before the first image


@pytest.mark.parametrize("family", FAMILIES)
def test_our_processor_tokenizes_exactly_like_openflamingo(family, openflamingo_case):
    case = openflamingo_case(family)
    tokenizer, config = case.tokenizer, case.model.config
    assert config.media_token_id == case.processor.media_token_id == case.reference.media_token_id
    assert config.media_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert config.end_of_chunk_token_id == case.reference.eoc_token_id
    assert config.end_of_chunk_token_id == tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    assert config.pad_token_id == case.processor.tokenizer.pad_token_id == tokenizer.pad_token_id
    assert config.vocab_size == len(tokenizer) == case.reference.lang_encoder.get_input_embeddings().weight.shape[0]
    tokenizer.padding_side = "left"
    theirs = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    assert torch.equal(theirs["input_ids"], case.batch["input_ids"])
    assert torch.equal(theirs["attention_mask"], case.batch["attention_mask"])


def test_reference_logits_depend_on_the_images(openflamingo_case):
    """Non-vacuity: the opened gates make the reference condition on the images, so parity tests the cross-attention."""
    case = openflamingo_case("llama")
    batch = case.batch
    with torch.no_grad():
        other = case.reference(
            vision_x=torch.flip(batch["pixel_values"], dims=[-1]), lang_x=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        ).logits
    first_image = int((batch["input_ids"][0] == case.model.config.media_token_id).nonzero()[0])
    torch.testing.assert_close(other[0, :first_image], case.logits[0, :first_image], atol=1e-6, rtol=0)
    assert (other[0, first_image:] - case.logits[0, first_image:]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_imported_checkpoint_gives_the_openflamingo_logits(family, variant, openflamingo_case, tiny_vision):
    case = openflamingo_case(family)
    if variant == "full":
        model = case.model
    else:
        model, _ = _load(case.paths[variant], family, tiny_vision, case.lm_dir)
        model.eval()
    ours = _logits(model, case.batch)
    reference = case.logits
    if variant.startswith("trainable") and family not in TIED:
        # OpenFlamingo trains and saves only the input embeddings; the output rows of the added tokens of an untied
        # LM are the untrained random rows of resize_token_embeddings, drawn independently by each implementation.
        keep = torch.ones(ours.shape[-1], dtype=torch.bool)
        keep[model.config.added_token_ids] = False
        ours, reference = ours[..., keep], reference[..., keep]
    assert ours.shape[:2] == case.batch["input_ids"].shape
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    # The perturbed (fully trained) input embedding table was imported and is recorded to be saved with the model.
    assert _input_embedding_name(model) in model.config.saved_lang_params


@pytest.mark.parametrize(
    "family,use_cache", [(family, None) for family in FAMILIES] + [("llama", False), ("gpt2", False), ("mpt", True)]
)
def test_greedy_generation_equals_openflamingo(family, use_cache, openflamingo_case):
    """Token for token, on the left-padded batch. use_cache=None keeps the LM's default: MPT's config turns the KV
    cache off, so its generation (like ``use_cache=False``) reads the whole sequence again at every step."""
    case = openflamingo_case(family)
    batch, config = case.batch, case.model.config
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=1)
    if use_cache is not None:
        kwargs["use_cache"] = use_cache
    ours = case.model.generate(**batch, **kwargs)
    with torch.no_grad():
        theirs = case.reference.generate(
            vision_x=batch["pixel_values"], lang_x=batch["input_ids"], attention_mask=batch["attention_mask"],
            pad_token_id=config.pad_token_id, suppress_tokens=[config.media_token_id], **kwargs,
        )
    assert ours.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family,variant", [("llama", "full"), ("llama", "trainable_v1"), ("gpt2", "trainable_v2")])
def test_imported_model_round_trips_through_save_pretrained(family, variant, openflamingo_case, tiny_vision, tmp_path):
    case = openflamingo_case(family)
    model = case.model if variant == "full" else _load(case.paths[variant], family, tiny_vision, case.lm_dir)[0].eval()
    model.save_pretrained(tmp_path)
    reloaded = flamingo.Flamingo.from_pretrained(tmp_path).eval()
    assert reloaded.config.saved_lang_params == model.config.saved_lang_params
    assert torch.equal(_logits(reloaded, case.batch), _logits(model, case.batch))


def _broken_checkpoint(case, tmp_path, edit):
    state = torch.load(case.paths["trainable_v2"], weights_only=True)
    edit(state)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "key",
    [
        "module.lang_encoder.model.layers.1.gated_cross_attn_layer.bogus",
        "module.perceiver.layers.0.0.bogus",
        "module.lang_encoder.model.mystery.weight",
        "module.optimizer_step",
    ],
)
def test_a_checkpoint_with_an_unknown_key_is_rejected_naming_it(key, openflamingo_case, tiny_vision, tmp_path):
    case = openflamingo_case("llama")
    path = _broken_checkpoint(case, tmp_path, lambda state: state.__setitem__(key, torch.zeros(3)))
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        _load(path, "llama", tiny_vision, case.lm_dir)


def test_a_perceiver_weight_of_the_wrong_shape_is_rejected_naming_it(openflamingo_case, tiny_vision, tmp_path):
    case = openflamingo_case("llama")
    key = "module.perceiver.layers.0.0.to_q.weight"

    def shrink(state):
        state[key] = state[key][:-1]

    path = _broken_checkpoint(case, tmp_path, shrink)
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        _load(path, "llama", tiny_vision, case.lm_dir)
