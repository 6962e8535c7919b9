"""A tiny byte-level BPE tokenizer trained in-process, so data/evaluation tests need no downloads.

Layout (chosen to look like a Llama tokenizer, which prepends BOS by default):

* ids 0, 1, 2 are ``<s>`` (BOS), ``</s>`` (EOS) and ``<unk>``;
* ids 3..258 are the 256 byte-level symbols; the rest (up to 512) are BPE merges learnt from
  ``_CORPUS`` below;
* ``tokenizer(text)`` returns ``[0] + ids(text)``; ``decode(ids, skip_special_tokens=True)``
  gives the text back byte for byte (no normaliser, no clean-up of spaces).

Training is deterministic (same corpus, same trainer settings), and the result is cached, so every
test shares one instance. Do not mutate it.
"""
from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
NAME = "comp-tests/tiny-byte-bpe-512"

_CORPUS = """\
The river runs through the middle of the old town, and for most of the year it is slow and brown.
In the spring it rises after the snow melts in the hills, and the people who live near the water
move their boats higher up the bank. The bridge was built in 1887 from local stone. It has five
arches, and the middle one is the widest, so that barges could pass under it when the river was
still used for trade. Today the barges are gone, but the towpath is a popular walk, and on a
summer evening you will see families, runners and dogs on both sides of the water.

The town library stands on the corner of the market square. It opened in 1904 with a gift of
money from a wealthy mill owner, who said that every child should be able to borrow a book for
free. The reading room has a high ceiling, tall windows and long oak tables. There are more than
forty thousand books on the shelves, as well as maps, newspapers and a small collection of
letters written by the people who founded the first school. Children come after school to do
their homework, and older readers come in the morning to read the papers and talk about the news.

Weather in the region is mild. Winters are wet rather than cold, and it rarely snows in the
valley, although the hills are often white from December to March. Summers are warm, with
temperatures that seldom go above thirty degrees. Farmers grow wheat, barley and potatoes, and
there are apple orchards on the southern slopes. In October the town holds a harvest fair, where
people sell cider, honey, cheese and bread, and there is music in the square until late at night.

A language model is a program that assigns a probability to a sequence of words. Given the words
so far, it predicts the next one. Perplexity measures how surprised the model is by a text: it is
the exponential of the average negative log likelihood of each token. A model that guesses
uniformly among all the words in its vocabulary has a perplexity equal to the size of that
vocabulary, and a better model has a lower number. Researchers report perplexity on standard
test sets so that different models can be compared in a fair way.

Pruning removes parts of a trained network to make it smaller and faster. Some methods remove
single weights, which leaves the matrices the same shape but full of zeros. Structured methods
remove whole rows, columns, attention heads or even complete layers, so that the remaining
matrices are genuinely smaller and run faster on ordinary hardware. After pruning, a small set of
calibration examples can be used to adjust the remaining weights, so that the outputs of each
layer stay close to those of the original model.

She opened the window and looked out at the garden. The rain had stopped, and the grass was
shining in the late afternoon light. A blackbird was singing on the fence, and somewhere in the
distance a dog barked twice and then was quiet. "We should go for a walk before it gets dark,"
she said. Her brother looked up from his book, nodded, and went to find his coat and boots.
They walked down the lane, past the church and the post office, and out onto the path that
leads across the fields to the wood. By the time they came back, the lamps were lit in the houses
and the smell of supper was drifting from the kitchen.

Numbers and dates appear everywhere: 1, 2, 3, 10, 25, 100, 2048 and 50,000; 3.14 and 0.5;
the 1st of May, the 22nd of June, and the year 2024. Lists use commas; questions end with a
question mark? Exclamations end with a mark like this! Quotes can be 'single' or "double", and
some words are joined by hyphens, like well-known, long-term and state-of-the-art.
"""


@functools.lru_cache(maxsize=1)
def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train (once per process) and return a 512-token byte-level BPE tokenizer; see the module docstring."""
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, UNK],  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # ByteLevel post-processing (offsets) followed by the Llama-style "<s> $A" template.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
        ),
    ])
    assert backend.token_to_id(BOS) == BOS_ID and backend.token_to_id(EOS) == EOS_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        name_or_path=NAME,  # lets comp_core.data cache token streams for it
        model_max_length=1 << 30,  # eval streams are long; avoid the "sequence too long" warning
    )
