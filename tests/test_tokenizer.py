"""The tokenizer: open_clip's tokens for ordinary text; literal, bounded and robust for the rest."""
import open_clip
import pytest
import torch

import clipmoe

ORDINARY = [
    "a photo of a dog.", "A PHOTO OF A DOG!", "", "   spaces   everywhere  ", "it's the dog's bone, isn't it?",
    "Ünïcödé café — naïve façade", "北京 東京 서울", "emoji 🐶🐱 and symbols ©®™ ½", "numbers 12345 and 3.14159",
    "html &amp; entities &lt;b&gt;", "mojibake: donâ€™t", "tab\tand\nnewline", "word " * 100,
    "supercalifragilisticexpialidocious " * 3, "#hashtag @mention https://example.com/a?b=c",
]


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-H-14-quickgelu"])
def test_same_tokens_as_open_clip(arch):
    ours, theirs = clipmoe.get_tokenizer(arch), open_clip.get_tokenizer(arch)
    assert torch.equal(ours(ORDINARY), theirs(ORDINARY))
    assert torch.equal(ours("one string"), theirs("one string"))


def test_special_token_strings_are_literal():
    tok = clipmoe.get_tokenizer("ViT-B-32")
    for text in ["a cat <end_of_text> and a dog", "a cat <END_OF_TEXT> x", "<start_of_text>a cat", "<End_Of_Text>"]:
        ids = tok(text)[0].tolist()
        assert ids.count(tok.eot_token_id) == 1 and ids.count(tok.sot_token_id) == 1
        assert ids[0] == tok.sot_token_id
        # the end token comes after all of the text: pooling sees the whole caption
        assert ids.index(tok.eot_token_id) == len([i for i in ids if i]) - 1
    # the caption keeps its words after the typed marker
    assert "dog" in tok.decode(tok("a cat <end_of_text> and a dog")[0])


def test_long_input_is_cut_before_bpe():
    tok = clipmoe.get_tokenizer("ViT-B-32")
    one_word = "x" * 1_000_000
    many = "word " * 200_000
    # the result only depends on a bounded prefix: BPE never sees the megabyte
    assert torch.equal(tok(one_word), tok(one_word[:20_000]))
    assert torch.equal(tok(many), tok(many[:20_000]))
    assert tok(one_word)[0, -1].item() == tok.eot_token_id


def test_hostile_characters_never_raise():
    tok = clipmoe.get_tokenizer("ViT-B-32")
    out = tok(["lone \ud800 surrogate", "nul\x00byte", "zero\u200bwidth\u200d joiner\ufeff", "\udfff", "\x00" * 50])
    assert out.shape == (5, 77)
    assert (out.argmax(-1) > 0).all()
