"""Tiny, randomly initialised backbones for tests, demos and benchmarks on a CPU.

Everything here is built locally from configs (no internet, no model hub) and then saved to disk, so that the
code under test loads it through exactly the same paths it uses for real checkpoints:

* the vision tower is an open_clip model registered under a config name, with its weights saved to a file that can
  be passed as ``pretrained=<path>`` to ``open_clip.create_model``;
* each language model is a Hugging Face causal LM plus tokenizer saved with ``save_pretrained`` into one directory,
  which ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` load back.

All backbones are small enough that building every one of them takes a few seconds on a CPU.
"""

import json
import os
import tempfile

import numpy as np

import open_clip
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
)

from .backbones import no_transformers_bars
from .vision import no_random_init_warning

# --------------------------------------------------------------------------------------------------------------
# Vision tower (open_clip)
# --------------------------------------------------------------------------------------------------------------

TINY_VISION_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,  # (32 / 8) ** 2 = 16 patch tokens
        "width": 64,
        "layers": 2,
        "head_width": 32,  # 64 / 32 = 2 heads
        "mlp_ratio": 4.0,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 64,
        "width": 32,
        "heads": 2,
        "layers": 1,
    },
}

# Name -> path of the config file we registered in this process (makes registration idempotent).
_REGISTERED_VISION_CONFIGS = {}


def register_tiny_vision_config(name="flamingo-tiny-vit"):
    """Register a tiny ViT open_clip config under ``name`` and return ``name``.

    The config is written to ``<tempdir>/<name>.json`` (open_clip names configs after the file stem) and added with
    ``open_clip.add_model_config``. Calling this again with the same name in the same process does nothing.

    The vision tower has 32x32 inputs, 8x8 patches (16 patch tokens), width 64, 2 layers and 2 heads, so
    ``model.visual`` with ``output_tokens=True`` returns ``(pooled (N, 32), tokens (N, 16, 64))``.
    """
    if name in _REGISTERED_VISION_CONFIGS and open_clip.get_model_config(name) is not None:
        return name
    config_dir = tempfile.mkdtemp(prefix="flamingo-tiny-vision-")
    config_path = os.path.join(config_dir, f"{name}.json")
    with open(config_path, "w") as f:
        json.dump(TINY_VISION_CONFIG, f, indent=2)
    # Register the file (not the directory), so that nothing else in the temp dir is ever picked up.
    open_clip.add_model_config(config_path)
    _REGISTERED_VISION_CONFIGS[name] = config_path
    return name


def save_tiny_vision_weights(name, path, seed=0):
    """Create the open_clip model ``name`` with a fixed seed and save its full state dict to ``path``.

    The file can be given as ``open_clip.create_model(name, pretrained=path)``. Registers the tiny config first
    if ``name`` is not known to open_clip yet. Returns ``path`` as a string.
    """
    if open_clip.get_model_config(name) is None:
        register_tiny_vision_config(name)
    torch.manual_seed(seed)
    with no_random_init_warning():  # random is what this function is for
        model = open_clip.create_model(name, pretrained=None)
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

# A few hundred words of varied English. It is only used to learn some BPE merges, so that common words
# ("image", "photo", "cat", ...) become one or two tokens.
TINY_CORPUS = """
An image of a cat sitting on a red sofa. A photo of two dogs playing in the park.
A photo of a dog running on the beach. An image of three birds on a wire.
Question: What is in the image? Answer: a cat. Question: How many dogs are there? Answer: two.
Output: a black cat sleeping next to a window. Output: a brown dog with a ball in its mouth.
The quick brown fox jumps over the lazy dog. A man is riding a bicycle down the street.
A woman holding an umbrella in the rain. Two children are eating ice cream at the table.
There are 2 cats and 1 dog in this picture. The clock shows 10 minutes past 4.
A plate of food with rice, beans and a salad. A group of people standing around a kitchen.
A small boat on a calm lake at sunset. A train is stopped at the station next to a platform.
An airplane flying high in a clear blue sky. A giraffe eating leaves from a tall tree.
A yellow bus parked on the side of the road. A pizza with cheese and tomatoes on a wooden board.
Is the cat white? yes. Is the dog sleeping? no. What color is the car? green.
What animal is this? an elephant. What is the man holding? a phone. Where is the cat? on the bed.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024.
A close up photo of a sandwich. A black and white photo of an old building in the city.
The dog and the cat are friends. The cat is looking at the camera. The dog is looking out of the window.
A picture of a kitchen with a stove, a sink and a refrigerator. Many cars are driving on the highway.
A horse standing in a field of grass. A teddy bear sitting on a chair. A vase with flowers on a table.
A person skiing down a snowy mountain. A surfer riding a wave in the ocean. A tennis player hits the ball.
This image shows a living room with a television, a couch and a lamp. The photo was taken at night.
Describe the image in detail. Caption: a cat and a dog. Caption: an image of a street. Caption: a photo.
"""

# Special tokens per style. Token ids follow the order of the list (0, 1, 2, ...), before the learned merges.
_LLAMA_STYLE = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
_GPT2_STYLE = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
_PAD_TOKEN = "<pad>"


def train_tiny_tokenizer(out_dir, *, add_pad, bos_eos_style, vocab_size=400):
    """Train a tiny byte-level BPE tokenizer on ``TINY_CORPUS``, save it to ``out_dir`` and return it.

    ``bos_eos_style``:
      * ``"llama"``: special tokens ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS); every encoding starts with ``<s>``
        (a ``TemplateProcessing`` post-processor), like Llama / Mistral tokenizers.
      * ``"gpt2"``: a single ``<|endoftext|>`` token is BOS, EOS and UNK; nothing is added when encoding.
    ``add_pad``: when True a ``<pad>`` token is added and set as the pad token; otherwise the tokenizer has no pad
    token (like GPT-2 and Llama), so code under test has to add one itself.

    The result is saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
    """
    if bos_eos_style == "llama":
        special = dict(_LLAMA_STYLE)
    elif bos_eos_style == "gpt2":
        special = dict(_GPT2_STYLE)
    else:
        raise ValueError(f"bos_eos_style must be 'llama' or 'gpt2', got {bos_eos_style!r}")
    if add_pad:
        special["pad_token"] = _PAD_TOKEN
    special_tokens = list(dict.fromkeys(special.values()))  # unique, in order

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS.split("\n"), trainer=trainer)

    if bos_eos_style == "llama":
        bos = special["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    else:
        # Keep byte offsets right, add nothing.
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


# --------------------------------------------------------------------------------------------------------------
# Language models (Hugging Face)
# --------------------------------------------------------------------------------------------------------------

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox", "mpt", "phi")

# How each family's tiny tokenizer and output head look. ``tie`` follows the real family; ``pad`` says whether
# the tokenizer ships a pad token (GPT-2, Llama, Mistral, Pythia, MPT and Phi-2 ship none; OPT and Qwen2 do).
FAMILY_SPECS = {
    "llama": {"bos_eos_style": "llama", "pad": False, "tie": False},
    "mistral": {"bos_eos_style": "llama", "pad": False, "tie": False},
    "qwen2": {"bos_eos_style": "llama", "pad": True, "tie": True},
    "gpt2": {"bos_eos_style": "gpt2", "pad": False, "tie": True},
    "opt": {"bos_eos_style": "gpt2", "pad": True, "tie": True},
    "gpt_neox": {"bos_eos_style": "gpt2", "pad": False, "tie": False},
    "mpt": {"bos_eos_style": "gpt2", "pad": False, "tie": True},
    "phi": {"bos_eos_style": "llama", "pad": False, "tie": False},
}

MAX_POSITIONS = 256


def _make_config(family, *, vocab_size, num_layers, hidden, heads, bos, eos, pad, tie):
    """The transformers config of a tiny model of ``family`` (intermediate size = 2 * hidden)."""
    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=tie)
    intermediate = 2 * hidden
    if family in ("llama", "mistral", "qwen2"):
        config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        return config_class(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_inner=intermediate,
            n_layer=num_layers,
            n_head=heads,
            n_positions=MAX_POSITIONS,
            **ids,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            word_embed_proj_dim=hidden,  # otherwise OPT adds project_in / project_out layers
            ffn_dim=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            max_position_embeddings=MAX_POSITIONS,
            rotary_pct=0.25,  # Pythia's value; stored as rope_parameters["partial_rotary_factor"]
            **ids,
        )
    if family == "mpt":
        return MptConfig(
            vocab_size=vocab_size,
            d_model=hidden,
            n_heads=heads,
            n_layers=num_layers,
            expansion_ratio=intermediate // hidden,
            max_seq_len=MAX_POSITIONS,
            attn_config={"attn_impl": "torch", "alibi": True},
            **ids,
        )
    if family == "phi":
        return PhiConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=MAX_POSITIONS,
            partial_rotary_factor=0.5,  # Phi-2's value
            **ids,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def save_tiny_lm(out_dir, family, *, vocab_size=None, seed=0, num_layers=4, hidden=64, heads=4):
    """Build a tiny random causal LM of ``family`` plus its tokenizer and save both into ``out_dir``.

    The tokenizer is trained with :func:`train_tiny_tokenizer` using the family's entry in ``FAMILY_SPECS``;
    the model's bos/eos/pad ids are taken from it. ``vocab_size`` defaults to the tokenizer's size; a larger value
    gives an embedding matrix with unused rows (as real checkpoints often have). The model is created with
    ``AutoModelForCausalLM.from_config`` under ``torch.manual_seed(seed)`` and saved as safetensors.

    Returns ``out_dir`` as a string.
    """
    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    spec = FAMILY_SPECS[family]
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    tokenizer = train_tiny_tokenizer(out_dir, add_pad=spec["pad"], bos_eos_style=spec["bos_eos_style"])
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")

    config = _make_config(
        family,
        vocab_size=vocab_size,
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        tie=spec["tie"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with no_transformers_bars():
        model.save_pretrained(out_dir)  # safetensors by default
    return out_dir


def random_images(count, seed=0, size=40):
    """``count`` random RGB PIL images (non-square, so the resize and crop path is exercised)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size + 8, 3)) * 255).astype("uint8")) for _ in range(count)]
