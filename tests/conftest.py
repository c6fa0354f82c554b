import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import loft_peft  # noqa: E402,F401  (registers the LOFT tuner type)


class ToyModel(nn.Module):
    """A two-layer MLP with a head: small enough for exact float64 checks."""

    def __init__(self, in_features: int = 9, hidden: int = 12, out_features: int = 5):
        super().__init__()
        self.proj = nn.Linear(in_features, hidden)
        self.act = nn.Tanh()
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.head(self.act(self.proj(x)))


@pytest.fixture
def toy_model():
    torch.manual_seed(0)
    return ToyModel()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **overrides,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config)


def tiny_tokenizer():
    """A word-level tokenizer over tiny_llama's 96 ids: <pad> <s> </s> <unk>, then the words t4 ... t95."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 96)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_text(n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` random sentences of ``length`` words of :func:`tiny_tokenizer`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 96, (n, length), generator=generator)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]
