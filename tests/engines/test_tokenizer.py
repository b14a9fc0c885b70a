from engines.tokenizer import ByteTokenizer


def test_round_trip_ascii_and_unicode():
    tok = ByteTokenizer()
    for text in ["", "hello, world", "naïve café — 東京 🚀"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_specials_and_flags():
    tok = ByteTokenizer()
    assert tok.vocab_size >= 258
    assert tok.encode("a", add_bos=False) == [97]
    assert tok.encode("a", add_bos=False, add_eos=True) == [97, tok.eos_id]
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, 9999]) == "hi"


def test_cut_multibyte_char_is_replaced_not_raised():
    tok = ByteTokenizer()
    ids = tok.encode("é", add_bos=False)
    assert tok.decode(ids[:1]) == "\ufffd"
