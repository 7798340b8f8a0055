"""The GPT-2 tokenizer works offline and streams text safely."""
from engine.tokenizer import StreamDecoder, decode, encode, get_tokenizer


def test_hello_world_encodes_to_gpt2_ids():
    assert encode("Hello world") == [15496, 995]


def test_vocabulary_is_gpt2s():
    assert get_tokenizer().n_vocab == 50257
    assert get_tokenizer().encode("<|endoftext|>", allowed_special="all") == [50256]


def test_round_trip_including_multibyte_characters():
    text = "Request 7: naïve café, 你好, 🎉 — ok"
    assert decode(encode(text)) == text


def test_special_token_text_in_a_prompt_stays_plain_text():
    assert 50256 not in encode("<|endoftext|>")


def test_stream_decoder_holds_back_a_character_split_across_tokens():
    ids = encode("🎉")
    assert len(ids) > 1  # the emoji's bytes span several tokens
    d = StreamDecoder()
    parts = [d.push(i) for i in ids]
    assert parts[:-1] == [""] * (len(ids) - 1) and parts[-1] == "🎉"
