"""tokenizer.json / tokenizer_config.json: transformers' AutoTokenizer on our directories agrees with
PersimmonTokenizer (ids, special tokens, decoding, chat template) without protobuf or tiktoken."""

import json
import random
import shutil
import sys

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from persimmon_rt.demo import demo_model_path
from persimmon_rt.tokenizer import PersimmonTokenizer
from persimmon_rt.tokenizer_json import USER_DEFINED, read_sentencepiece_model, tokenizer_json

from test_tokenizer import HARD, _train

tokenizers = pytest.importorskip("tokenizers")

HELDOUT = open(__file__.replace("test_hf_tokenizer.py", "data/heldout.txt"), encoding="utf-8").read()[:4000]
SAMPLES = HARD + [HELDOUT, "ROMEO:\nBut soft, what light through yonder window breaks?\n", "human: hi\n\nadept:"]
MESSAGES = [{"role": "user", "content": " Good morrow. "}, {"role": "assistant", "content": "And to you."},
            {"role": "user", "content": "What news?"}]


@pytest.fixture(scope="module", params=["demo", "dummy_prefix", "no_dummy_prefix", "nfkc_whitespace"])
def model_file(request, tmp_path_factory):
    if request.param == "demo":
        return f"{demo_model_path()}/tokenizer.model"
    options = {"dummy_prefix": dict(add_dummy_prefix=True), "no_dummy_prefix": dict(add_dummy_prefix=False),
               "nfkc_whitespace": dict(add_dummy_prefix=True, normalization_rule_name="nmt_nfkc",
                                       remove_extra_whitespaces=True)}[request.param]
    return str(_train(tmp_path_factory.mktemp("tok") / "tokenizer.model", **options))


def _known_difference(sp, model, ids):
    """The two differences persimmon_rt.tokenizer_json documents: text that starts with a user-defined piece
    under a dummy prefix; a space before a user-defined piece with a character map or whitespace removal."""
    user = {p for p, _, kind in model.pieces if kind == USER_DEFINED}
    pairs = [(sp.id_to_piece(a), sp.id_to_piece(b)) for a, b in zip(ids, ids[1:])]
    if pairs and pairs[0][0] == "\u2581" and pairs[0][1] in user:
        return True
    return (bool(model.precompiled_charsmap) or model.remove_extra_whitespaces) and \
        any(a.endswith("\u2581") and b in user for a, b in pairs)


def test_the_model_file_is_read_without_protobuf(model_file):
    sp = spm.SentencePieceProcessor(model_file=model_file)
    model = read_sentencepiece_model(model_file)
    assert [(p, round(s, 4)) for p, s, _ in model.pieces] == \
        [(sp.id_to_piece(i), round(sp.get_score(i), 4)) for i in range(sp.get_piece_size())]
    assert model.byte_fallback and not model.treat_whitespace_as_suffix


def test_tokenizer_json_encodes_and_decodes_like_sentencepiece(model_file):
    sp = spm.SentencePieceProcessor(model_file=model_file)
    model = read_sentencepiece_model(model_file)
    tok = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(model_file)))
    rng = random.Random(0)
    alphabet = "ab cd\n\t|ENDOFTEXT|  é😀ｆﬁ\u3000\u00a0.,"
    texts = SAMPLES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    checked = 0
    for text in texts:
        ids = sp.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == sp.decode(ids), text
        if _known_difference(sp, model, ids):
            continue
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        checked += 1
    assert checked > len(texts) // 2


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_demo_tokenizer_json_matches_sentencepiece_on_any_text(demo_json, text):
    sp, tok = demo_json
    ids = sp.encode(text)
    assert tok.encode(text, add_special_tokens=False).ids == ids
    assert tok.decode(ids, skip_special_tokens=False) == sp.decode(ids)


@pytest.fixture(scope="module")
def demo_json():
    model_file = f"{demo_model_path()}/tokenizer.model"
    with open(f"{demo_model_path()}/tokenizer.json", encoding="utf-8") as fh:
        shipped = json.load(fh)
    assert shipped == json.loads(json.dumps(tokenizer_json(model_file, ["|ENDOFTEXT|", "<unk>"])))  # up to date
    return spm.SentencePieceProcessor(model_file=model_file), tokenizers.Tokenizer.from_str(json.dumps(shipped))


@pytest.fixture
def no_protobuf(monkeypatch):
    """transformers must not need protobuf or tiktoken for these directories."""
    for name in ("google.protobuf", "tiktoken"):
        monkeypatch.setitem(sys.modules, name, None)


def assert_agree(hf, ours, texts=SAMPLES):
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert str(getattr(hf, name)) == getattr(ours, name), name
        assert getattr(hf, f"{name}_id") == getattr(ours, f"{name}_id"), name
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True), text
    batch = ["a longer line of text", "hi"]
    assert hf(batch, padding=True)["input_ids"] == ours(batch, padding=True)["input_ids"]
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(MESSAGES)


def test_auto_tokenizer_on_the_demo_directory(no_protobuf):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(demo_model_path())
    ours = PersimmonTokenizer.from_pretrained(demo_model_path())
    assert ours.eos_token == "|ENDOFTEXT|" and ours.eos_token_id == 3 and ours.bos_token_id == 3
    assert_agree(hf, ours)


def test_auto_tokenizer_on_a_saved_directory(tmp_path, no_protobuf):
    transformers = pytest.importorskip("transformers")
    model_file = _train(tmp_path / "source.model", add_dummy_prefix=False)
    ours = PersimmonTokenizer(model_file, bos_token="<s>", add_bos_token=True, add_eos_token=True,
                              pad_token="<unk>", padding_side="right")
    written = ours.save_pretrained(tmp_path / "saved")
    assert [p.rsplit("/", 1)[1] for p in written] == ["tokenizer.model", "tokenizer_config.json", "tokenizer.json"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert hf.encode("a test")[0] == ours.bos_token_id and hf.encode("a test")[-1] == ours.eos_token_id
    assert_agree(hf, PersimmonTokenizer.from_pretrained(tmp_path / "saved"), [t for t in SAMPLES if t.strip()])


def test_a_model_tokenizer_json_cannot_express_is_skipped_with_a_warning(tmp_path):
    model_file = _train(tmp_path / "bpe.model", model_type="bpe")
    shutil.copyfile(model_file, tmp_path / "tokenizer.model")
    with pytest.warns(UserWarning, match="tokenizer.json not written.*other than Unigram"):
        written = PersimmonTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path)
    assert len(written) == 2 and not (tmp_path / "tokenizer.json").exists()
