import pytest

from edge.text import StopStrings, StreamDecoder


@pytest.fixture(scope="module")
def model(tiny_bundle):
    import edge
    return edge.load(tiny_bundle("llama"), threads=1, context_length=64)


@pytest.mark.parametrize("s", ["hello world", "naïve café — ünïcode ✓ 你好 🤖 end", "a\n\tb  c"])
def test_stream_decoder_reassembles_text_exactly(model, s):
    ids = model.text.encode(s)
    d = StreamDecoder(model.text)
    assert "".join(d.push(i) for i in ids) == s


def test_stream_decoder_never_emits_half_characters(model):
    ids = model.text.encode("🤖")          # byte-level: 4 tokens for one character
    d = StreamDecoder(model.text)
    pieces = [d.push(i) for i in ids]
    assert pieces[:-1] == ["", "", ""] and pieces[-1] == "🤖"


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(("</end>",))
    out = []
    for piece in ["abc</", "en", "d> tail"]:
        text, stopped = s.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "abc" and stopped


def test_stop_strings_release_false_alarms():
    s = StopStrings(("STOP",))
    a, _ = s.feed("ST")
    b, _ = s.feed("ART")
    assert a + b + s.flush() == "START"
