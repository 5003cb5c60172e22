"""Training data: text -> shards -> text round trip, manifest, clear errors, resumable distillation."""

import json

import numpy as np
import pytest

from twotower.checkpoints import checkpoint_dir
from twotower.data.distill import distill
from twotower.data.shards import TokenShards, prepare
from twotower.data.sources import DataError, SourceSpec, html_to_text
from twotower.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir("smollm2-135m"))


DOCS = ["The sea was calm that morning.", "def add(a, b):\n    return a + b\n", "Ünïcödé text — with dashes…"]


def write_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCS[0])
    (corpus / "b.py").write_text(DOCS[1])
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": DOCS[2]}) + "\n\n")
    return corpus, jsonl


def test_round_trip_and_manifest(tmp_path, tokenizer):
    corpus, jsonl = write_corpus(tmp_path)
    sources = [SourceSpec(str(corpus), "CC0"), SourceSpec(str(jsonl), "MIT")]
    manifest = prepare(sources, tokenizer, tmp_path / "out", val_fraction=0.0, shard_tokens=12)
    assert [s["licence"] for s in manifest["sources"]] == ["CC0", "MIT"]
    assert [s["documents"] for s in manifest["sources"]] == [2, 1]
    assert manifest["dtype"] == "uint16"  # vocab 49152 fits 16 bits
    shards = TokenShards(tmp_path / "out")
    assert len(shards.shards) > 1  # small shards: documents spread over several files
    texts = [tokenizer.decode(doc[:-1]) for doc in shards.documents()]
    assert texts == DOCS
    assert all(doc[-1] == tokenizer.eos_token_id for doc in shards.documents())
    assert shards.num_tokens == manifest["splits"]["train"]["tokens"]
    assert all(s.dtype == np.uint16 for s in shards.shards)

    # a model with a smaller vocabulary cannot train on these shards (checked once, when loaded)
    top = max(int(s.max()) for s in shards.shards)
    shards.check_token_ids(top + 1)
    with pytest.raises(DataError, match="vocabulary"):
        shards.check_token_ids(top)


def test_validation_split_is_seeded(tmp_path, tokenizer):
    corpus = tmp_path / "many"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:02d}.txt").write_text(f"document number {i}")
    a = prepare([SourceSpec(str(corpus))], tokenizer, tmp_path / "a", val_fraction=0.25, seed=3)
    b = prepare([SourceSpec(str(corpus))], tokenizer, tmp_path / "b", val_fraction=0.25, seed=3)
    assert a["splits"] == b["splits"]
    assert 0 < a["splits"]["val"]["documents"] < 40


def test_chat_messages_rendered_with_template(tmp_path, tokenizer):
    chats = tmp_path / "chat.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello!"}]}) + "\n")
    prepare([SourceSpec(str(chats), field="messages")], tokenizer, tmp_path / "out", val_fraction=0.0)
    (doc,) = list(TokenShards(tmp_path / "out").documents())
    text = tokenizer.decode(doc)
    assert "<|im_start|>user\nHi<|im_end|>" in text and "Hello!" in text


def test_loss_on_the_assistant_turns_only(tmp_path, tokenizer):
    chats = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    chats.write_text(json.dumps({"messages": turns}) + "\n")
    manifest = prepare([SourceSpec(str(chats), field="messages", loss_on="assistant")], tokenizer, tmp_path / "out",
                       val_fraction=0.0)
    shards = TokenShards(tmp_path / "out")
    (doc,) = list(shards.documents())
    trained = np.asarray(shards.trained[0], dtype=bool)
    assert manifest["loss_mask"] and manifest["splits"]["train"]["trained_tokens"] == trained.sum()
    # the trained tokens are the two answers, each with its end-of-turn, plus the closing EOS
    assert tokenizer.decode(doc[trained]) == ("Hello there!<|im_end|>\nGoodbye.<|im_end|>\n"
                                              + tokenizer.eos_token)
    assert "Hi" in tokenizer.decode(doc[~trained]) and "Bye" in tokenizer.decode(doc[~trained])
    # a corpus without partial losses writes no mask at all
    prepare([SourceSpec(str(chats), field="messages")], tokenizer, tmp_path / "all", val_fraction=0.0)
    assert TokenShards(tmp_path / "all").trained is None
    with pytest.raises(DataError, match="chat messages"):
        SourceSpec(str(chats), loss_on="assistant")
    user_only = tmp_path / "user.jsonl"
    user_only.write_text(json.dumps({"messages": turns[:1]}) + "\n")
    with pytest.raises(DataError, match="user.jsonl:1: no assistant turn"):
        prepare([SourceSpec(str(user_only), field="messages", loss_on="assistant")], tokenizer, tmp_path / "u")


@pytest.mark.parametrize(
    "name, content, field, message",
    [
        ("empty.txt", b"   \n", "text", "empty"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "text", "bad.jsonl:2: invalid JSON"),
        ("field.jsonl", b'{"body": "x"}\n', "text", "no field 'text'"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "text", "not UTF-8"),
        ("num.jsonl", b'{"text": 3}\n', "text", "not text"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, tokenizer, name, content, field, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare([SourceSpec(str(path), field=field)], tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written left behind


def test_existing_output_is_not_overwritten(tmp_path, tokenizer):
    corpus, _ = write_corpus(tmp_path)
    prepare([SourceSpec(str(corpus))], tokenizer, tmp_path / "out", val_fraction=0.0)
    with pytest.raises(UsageError, match="not empty"):
        prepare([SourceSpec(str(corpus))], tokenizer, tmp_path / "out", val_fraction=0.0)


def test_html_keeps_main_text_only():
    page = "<html><head><title>t</title></head><body><nav>Menu</nav><main><h1>Title</h1><p>Body text.</p>" \
           "<script>var x;</script></main><footer>foot</footer></body></html>"
    assert html_to_text(page) == "Title\n\nBody text."
    wrapped = "<main><p>one line\nwrapped</p><pre>code\n  indented</pre></main>"
    assert html_to_text(wrapped) == "one line wrapped\n\ncode\n  indented"


def test_distill_resumes_after_a_kill(tmp_path, tokenizer):
    from test_generate import tiny

    model = tiny("llama")
    model.config.vocab_size = 97  # the tiny model's own vocabulary: give it prompts it can read

    class TinyTokenizer:  # maps characters to ids < 97
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 90 + 6 for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    prompts = [f"prompt {i}" for i in range(7)]
    out = tmp_path / "d.jsonl"
    full = tmp_path / "full.jsonl"
    assert distill(model, TinyTokenizer(), prompts, full, max_new_tokens=5, batch_size=3) == 7
    distill(model, TinyTokenizer(), prompts[:3], out, max_new_tokens=5, batch_size=3)
    with open(out, "a") as f:
        f.write('{"text": "cut in the mid')  # a kill in the middle of a line
    assert distill(model, TinyTokenizer(), prompts, out, max_new_tokens=5, batch_size=3) == 4
    assert out.read_text() == full.read_text()
