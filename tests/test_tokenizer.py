"""PersimmonTokenizer against SentencePiece itself, on small Unigram models with byte fallback trained here."""

import io
import json
import random

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from persimmon_rt.tokenizer import PersimmonTokenizer, StreamDecoder

HARD = [
    "", " ", "  ", "hello world", " leading space", "trailing space ", "  multiple   inner    spaces  ",
    "tab\there", "\t", "\n", "\n\n", "line one\nline two\n\nline four\n", "\r\n", "Zebra QUIXOTIC xylophone",
    "emoji 😀👍🏽 and a flag 🇯🇵", "日本語のテキスト", "中文 字符", "한국어", "combining e\u0301 a\u0308 n\u0303",
    "Ελληνικά and русский", "العربية", "math ∑∫√ ≤ ≥", "zero\u200bwidth", "\x00nul and \x7f del",
    "|ENDOFTEXT|", "before|ENDOFTEXT|after", "human: hi\n\nadept:", "1234567890 3.14159", "~`!@#$%^&*()_+{}|",
]


def _corpus(seed=0, lines=400):
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ter", "an", "the", "in", "ing", "qu", "st", "re", "on", "er", "al", "de"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(150)]
    words += "the a of and to is human adept model token stream you we it what why how".split()
    out = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        sentence = sentence.capitalize() + rng.choice([".", "?", "!", ",", ":", ""])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        out.append(sentence)
    return out


def _train(path, **kwargs):
    buf = io.BytesIO()
    options = dict(model_type="unigram", vocab_size=400, byte_fallback=True, hard_vocab_limit=False,
                   user_defined_symbols=["|ENDOFTEXT|"], normalization_rule_name="identity",
                   remove_extra_whitespaces=False, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=buf, **{**options, **kwargs})
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_dummy_prefix"])
def model_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    _train(directory / "tokenizer.model", add_dummy_prefix=request.param)
    return directory


@pytest.fixture(scope="module")
def tok(model_dir):
    return PersimmonTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def sp(model_dir):
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


def _stream(tok, ids, skip_special_tokens=False):
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


# ------------------------------------------------------------------------------------------ encode / decode
@pytest.mark.parametrize("text", HARD)
def test_ids_identical_to_sentencepiece(tok, sp, text):
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.encode(text) == sp.encode(text)


@pytest.mark.parametrize("text", HARD)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_use_byte_fallback(tok):
    tokens = tok.convert_ids_to_tokens(tok.encode("日😀", add_special_tokens=False))
    assert [t for t in tokens if t != "\u2581"] == ["<0xE6>", "<0x97>", "<0xA5>", "<0xF0>", "<0x9F>", "<0x98>",
                                                     "<0x80>"]


def test_decode_accepts_tensors_and_skips_special_tokens(tok):
    ids = tok.encode("hello") + [tok.eos_token_id]
    assert tok.decode(torch.tensor(ids)) == "hello|ENDOFTEXT|"
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    assert tok.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ["hello", "hello"]


def test_vocabulary_helpers(tok, sp):
    assert len(tok) == tok.vocab_size == sp.get_piece_size()
    assert tok.convert_tokens_to_ids("|ENDOFTEXT|") == sp.piece_to_id("|ENDOFTEXT|")
    assert tok.convert_tokens_to_ids(["<s>", "</s>"]) == [1, 2]
    assert tok.convert_tokens_to_ids("no such piece") == tok.unk_token_id == sp.unk_id()
    assert tok.convert_ids_to_tokens(3) == "|ENDOFTEXT|"
    assert tok.convert_ids_to_tokens([0, 3], skip_special_tokens=True) == []
    assert tok.all_special_ids == sorted({sp.unk_id(), tok.eos_token_id})


# ------------------------------------------------------------------------------------------ special tokens
def test_default_policy_follows_original_release(tok, sp):
    eod = sp.piece_to_id("|ENDOFTEXT|")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("|ENDOFTEXT|",) * 3
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == eod
    assert tok.add_bos_token is False and tok.add_eos_token is False
    assert tok.encode("hi") == sp.encode("hi")


def test_policy_overrides(model_dir, sp):
    tok = PersimmonTokenizer(model_dir / "tokenizer.model", add_bos_token=True, add_eos_token=True)
    assert tok.encode("hi") == [3] + sp.encode("hi") + [3]
    assert tok.encode("hi", add_special_tokens=False) == sp.encode("hi")
    tok = PersimmonTokenizer(model_dir / "tokenizer.model", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                             add_bos_token=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.encode("hi") == [1] + sp.encode("hi")
    assert tok.decode(tok.encode("hi")) == "hi"


def test_eos_falls_back_to_sentencepiece_eos(tmp_path):
    tok = PersimmonTokenizer(_train(tmp_path / "plain.model", user_defined_symbols=[]))
    assert tok.eos_token == tok.bos_token == "</s>"
    assert tok.eos_token_id == tok._sp.eos_id()


def test_bad_special_tokens_raise(model_dir):
    with pytest.raises(ValueError, match="not a piece"):
        PersimmonTokenizer(model_dir / "tokenizer.model", eos_token="|ENDOFTEXT")
    with pytest.raises(ValueError, match="add_bos_token"):
        PersimmonTokenizer(model_dir / "tokenizer.model", bos_token=None, add_bos_token=True)


def test_tokenizer_config_is_read_and_kwargs_win(model_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
    config = {"add_bos_token": True, "bos_token": {"content": "<s>"}, "eos_token": None, "pad_token": "</s>",
              "padding_side": "right"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = PersimmonTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token, tok.pad_token_id) == (1, "|ENDOFTEXT|", 2)
    assert tok.add_bos_token and tok.padding_side == "right"
    assert PersimmonTokenizer.from_pretrained(tmp_path, add_bos_token=False).add_bos_token is False

    config["bos_token"] = "|ENDOFTEXT"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="not in the vocabulary"):
        tok = PersimmonTokenizer.from_pretrained(tmp_path)
    assert tok.bos_token == "|ENDOFTEXT|"


def test_save_pretrained_round_trip(model_dir, tmp_path):
    tok = PersimmonTokenizer(model_dir / "tokenizer.model", bos_token="<s>", add_bos_token=True,
                             pad_token="</s>", padding_side="right")
    tok.save_pretrained(tmp_path / "saved")
    again = PersimmonTokenizer.from_pretrained(tmp_path / "saved")
    for name in ("bos_token", "eos_token", "pad_token", "add_bos_token", "add_eos_token", "padding_side"):
        assert getattr(again, name) == getattr(tok, name)
    assert again.encode("a test") == tok.encode("a test")
    again.save_pretrained(tmp_path / "saved")


# ------------------------------------------------------------------------------------------ batches
def test_batch_left_padding_is_default(tok, sp):
    texts = ["a longer sentence here", "hi"]
    enc = tok(texts, padding=True)
    long, short = sp.encode(texts[0]), sp.encode(texts[1])
    fill = len(long) - len(short)
    assert enc["input_ids"] == [long, [tok.eos_token_id] * fill + short]
    assert enc.attention_mask == [[1] * len(long), [0] * fill + [1] * len(short)]


def test_batch_right_padding_max_length_and_tensors(tok, sp):
    enc = tok(["hi", "the"], padding="max_length", max_length=12, padding_side="right", return_tensors="pt")
    assert enc.input_ids.shape == enc.attention_mask.shape == (2, 12)
    assert enc.input_ids.dtype == torch.long
    hi = sp.encode("hi")
    assert enc.input_ids[0].tolist() == hi + [tok.pad_token_id] * (12 - len(hi))
    assert enc.attention_mask[0].tolist() == [1] * len(hi) + [0] * (12 - len(hi))


def test_truncation_and_single_text(model_dir, sp):
    tok = PersimmonTokenizer(model_dir / "tokenizer.model", add_bos_token=True)
    text = "a rather long sentence with many many tokens in it"
    enc = tok(text, truncation=True, max_length=5)
    assert enc["input_ids"] == [tok.bos_token_id] + sp.encode(text)[:4]
    assert enc["attention_mask"] == [1] * 5
    assert tok(text, return_tensors="pt").input_ids.shape == (1, len(sp.encode(text)) + 1)
    assert tok(["a", "bb cc"], add_special_tokens=False)["input_ids"] == [sp.encode("a"), sp.encode("bb cc")]


def test_batch_errors(tok):
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "a much longer text"], return_tensors="pt")
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], padding="max_length")
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding=True, padding_side="middle")
    with pytest.raises(TypeError):
        tok([b"bytes"])


# ------------------------------------------------------------------------------------------ chat
def test_chat_template_single_turn(tok, sp):
    messages = [{"role": "user", "content": "  What is the capital of France? \n"}]
    prompt = "human: What is the capital of France?\n\nadept:"
    assert tok.apply_chat_template(messages) == prompt
    assert tok.apply_chat_template(messages, tokenize=True) == sp.encode(prompt)


def test_chat_template_multi_turn(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "},
                {"role": "user", "content": "Tell me more."}]
    expected = "human: Hi\n\nadept: Hello!\n\nhuman: Tell me more.\n\nadept:"
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected[: -len("\n\nadept:")]


def test_chat_template_bos_and_roles(model_dir, sp):
    tok = PersimmonTokenizer(model_dir / "tokenizer.model", add_bos_token=True, add_eos_token=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)
    assert ids == [tok.bos_token_id] + sp.encode("human: x\n\nadept:")
    with pytest.raises(ValueError, match="'system'"):
        tok.apply_chat_template([{"role": "system", "content": "be nice"}, {"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("text", HARD)
def test_stream_matches_decode(tok, text):
    ids = tok.encode(text)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces + [tail])


def test_stream_holds_partial_characters(tok):
    ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "x😀".encode()]
    pieces, tail = _stream(tok, ids)
    assert pieces == ["x", "", "", "", "😀"] and tail == ""
    pieces, tail = _stream(tok, ids[:3])
    assert pieces == ["x", "", ""] and "x" + tail == tok.decode(ids[:3]) == "x\ufffd\ufffd"


def test_stream_leading_space_marker(tok, sp):
    space = sp.piece_to_id("\u2581")
    for ids in ([space, space], [1, space, space], [space] + sp.encode("word"), [1, 3, space]):
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == sp.decode(ids)


def test_stream_decodes_a_bounded_window(tok):
    class Spy:
        longest = 0

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode(self, ids):
            Spy.longest = max(Spy.longest, len(ids))
            return self.inner.decode(ids)

    text = " ".join(HARD) * 20
    ids = tok.encode(text)
    spy_tok = PersimmonTokenizer(tok.vocab_file)
    spy_tok._sp = Spy(spy_tok._sp)
    pieces, tail = _stream(spy_tok, ids)
    assert "".join(pieces) + tail == text
    assert len(ids) > 2000 and Spy.longest <= 5


def test_stream_skip_special_tokens_and_reuse(tok):
    ids = tok.encode("one two") + [tok.eos_token_id]
    decoder = tok.stream_decoder(skip_special_tokens=True)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "one two"
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "one two"


# ------------------------------------------------------------------------------------------ errors
def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} .* vocab size {tok.vocab_size}"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        tok.stream_decoder().push(10**9)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        PersimmonTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        PersimmonTokenizer(tmp_path / "missing.model")
    with pytest.raises(TypeError, match="decode bytes"):
        tok.encode("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("lone \ud800 surrogate")


# ------------------------------------------------------------------------------------------ properties
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_random_text_properties(tok, sp, text):
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    decoded = tok.decode(ids)
    if "\u2581" not in text:
        assert decoded == text
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == decoded
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces + [tail])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_ids_stream_like_decode(tok, data):
    byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(0x80, 0x100)]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1) | st.sampled_from(byte_ids), max_size=16))
    skip = data.draw(st.booleans())
    pieces, tail = _stream(tok, ids, skip_special_tokens=skip)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
