"""Client messages to commands, and VOICE_DATA frames, exactly as DESIGN.md section 4."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import client_input, events, protocol
from pipeline.audio import read_wav, wav_bytes
from pipeline.visemes import VISEMES
from pipeline.commands import (
    Cancel,
    Close,
    Initialize,
    SendMessage,
    SetTTSProvider,
    TextAppend,
    TextEnd,
    TextStart,
    TTSProvider,
)
from pipeline.errors import CommandError
from pipeline.session import SessionState


@pytest.mark.parametrize(
    "raw, command",
    [
        ('{"type":"initialize"}', Initialize()),
        ('{"type":"send_message","text":"Hi there"}', SendMessage("Hi there")),
        (
            '{"type":"send_message","text":"Hi","voice":"af_heart","speed":1.5,"provider":"kokoros"}',
            SendMessage("Hi", "af_heart", 1.5, TTSProvider.KOKOROS),
        ),
        ('{"type":"tts","text":"Hi","voice":"alloy","speed":1,"stream":true}', SendMessage("Hi", "alloy", 1.0)),
        ('{"type":"set_tts_provider","provider":"openai"}', SetTTSProvider(TTSProvider.OPENAI)),
        ('{"type":"close"}', Close()),
        ('{"type":"cancel"}', Cancel(all=False)),
        ('{"type":"cancel","all":true}', Cancel(all=True)),
        ('{"type":"text_start"}', TextStart()),
        ('{"type":"text_start","text":"So, ","voice":"af_heart","speed":1.2}', TextStart("af_heart", 1.2, None, "So, ")),
        # An append may be only whitespace: appends carry their own spaces.
        ('{"type":"text_append","utterance_id":"u3","text":" "}', TextAppend("u3", " ")),
        ('{"type":"text_append","utterance_id":"u3","text":"well.","flush":true}', TextAppend("u3", "well.", flush=True)),
        ('{"type":"text_end","utterance_id":"u3"}', TextEnd("u3")),
        ('{"type":"text_end","utterance_id":"u3","text":" Bye."}', TextEnd("u3", " Bye.")),
    ],
)
def test_valid_messages_become_commands(raw, command):
    assert client_input.parse_client_message(raw) == command


@pytest.mark.parametrize(
    "raw, code",
    [
        ("{not json", "invalid_json"),
        ("42", "invalid_command"),
        ('{"type":"send_message","text":"hi","voice":7}', "invalid_command"),
        ('{"type":"send_message","text":"hi","speed":"fast"}', "invalid_command"),
        ('{"type":"send_message","text":"hi","speed":0.1}', "invalid_command"),
        ('{"type":"send_message","text":"hi","speed":true}', "invalid_command"),
        ('{"type":"cancel","all":"yes"}', "invalid_command"),
        ('{"type":"set_tts_provider"}', "invalid_command"),
        ('{"type":"send_message","text":"\\n\\t "}', "empty_text"),
        ('{"type":"send_message","text":""}', "empty_text"),
        ('{"type":"text_append","utterance_id":"u1","text":""}', "empty_text"),
        ('{"type":"text_append","text":"hi"}', "invalid_command"),
        ('{"type":"text_append","utterance_id":"u1"}', "invalid_command"),
        ('{"type":"text_append","utterance_id":"u1","text":"a\\u0000b"}', "invalid_command"),
        ('{"type":"text_end","utterance_id":7}', "invalid_command"),
        ('{"type":"text_start","text":5}', "invalid_command"),
        # Found in issue 10: a number past Python's 4300-digit int limit, anywhere.
        ('{"type":"send_message","text":"hi","speed":' + "9" * 5000 + "}", "invalid_json"),
        ('{"type":"initialize","x":[' + "1" * 4301 + "]}", "invalid_json"),
        ('{"type":"send_message","text":"hi","speed":NaN}', "invalid_json"),
        ("[" * 100_000, "invalid_json"),
        # Text no voice can speak.
        ('{"type":"send_message","text":"\u200b\u200c\u2060"}', "empty_text"),
        ('{"type":"send_message","text":"?! ... \\ud83d\\ude00"}', "empty_text"),
        ('{"type":"send_message","text":"a\\u0000b"}', "invalid_command"),
        ('{"type":"send_message","text":"a\\u0085b"}', "invalid_command"),
        ('{"type":"send_message","text":"lone \\ud800 surrogate"}', "invalid_command"),
        # Voice names: length and characters.
        ('{"type":"send_message","text":"hi","voice":"' + "a" * 65 + '"}', "invalid_command"),
        ('{"type":"send_message","text":"hi","voice":"../../etc/passwd"}', "invalid_command"),
        ('{"type":"send_message","text":"hi","voice":"a\\\\b"}', "invalid_command"),
        ('{"type":"send_message","text":"hi","voice":"af heart"}', "invalid_command"),
        ('{"type":"send_message","text":"hi","voice":"af\\nheart"}', "invalid_command"),
        ('{"type":"send_message","text":"hi","voice":".hidden"}', "invalid_command"),
        ('{"type":"send_message","text":"hi","voice":"\u00e9l\u00e9"}', "invalid_command"),
    ],
)
def test_invalid_messages_get_their_code(raw, code):
    with pytest.raises(CommandError) as error:
        client_input.parse_client_message(raw)
    assert error.value.code == code


@pytest.mark.parametrize(
    "voice", ["af_heart", "af_bella+af_sky", "af_bella(2)+af_sky(1)", "alloy", "en_US-joe-medium", "a" * 64, "v1.2:x"]
)
def test_voice_names_real_servers_use_are_accepted(voice):
    assert client_input.parse_client_message(json.dumps({"type": "tts", "text": "Hi", "voice": voice})).voice == voice


def test_an_empty_voice_means_the_default():
    assert client_input.parse_client_message('{"type":"tts","text":"Hi","voice":""}').voice is None


@pytest.mark.parametrize("text", ["\u65e5\u672c\u8a9e", "tab\tand\r\nlines", "7", "\u0661\u0662", "\u200bword\u200b"])
def test_speakable_texts_in_any_script_pass(text):
    assert client_input.speakable_text(text) == text


@pytest.mark.parametrize(
    "body, code",
    [
        (b"\xff\xfe not utf-8", "invalid_json"),
        (b'{"text": "caf\xe9"}', "invalid_json"),
        (b'{"text": "hi", "speed": ' + b"1" * 5000 + b"}", "invalid_json"),
        (b'["hi"]', "invalid_command"),
        (b'{"text": "hi", "type": "close"}', None),  # the type is always send_message
    ],
)
def test_speak_bodies_follow_the_send_message_rules(body, code):
    if code is None:
        assert client_input.parse_speak_body(body) == SendMessage("hi")
        return
    with pytest.raises(CommandError) as error:
        client_input.parse_speak_body(body)
    assert error.value.code == code


@given(st.text(max_size=300))
def test_any_text_is_either_a_command_or_a_command_error(raw):
    try:
        client_input.parse_client_message(raw)
    except CommandError:
        pass


def test_text_of_exactly_4096_characters_is_accepted():
    assert client_input.parse_client_message('{"type":"tts","text":"' + "a" * 4096 + '"}').text == "a" * 4096


def test_voice_frame_layout_is_the_seeds():
    frame = protocol.encode_voice_frame(7, True, b"abc")
    assert frame == struct.pack("<IIB", 2, 7, 1) + b"abc"


@given(st.integers(0, 2**32 - 1), st.booleans(), st.binary(max_size=4000), st.booleans())
def test_frames_round_trip_compressed_or_not(chunk_id, is_final, audio, compress):
    frame = protocol.encode_voice_frame(chunk_id, is_final, audio)
    data = protocol.compress_frame(frame) if compress else frame
    assert protocol.decode_voice_frame(data) == protocol.VoiceFrame(chunk_id, is_final, audio)


@given(st.binary(max_size=3000))
def test_compression_only_when_large_enough_and_smaller(audio):
    frame = protocol.encode_voice_frame(1, False, audio)
    sent = protocol.compress_frame(frame)
    if len(frame) < 512:
        assert sent == frame
    if sent != frame:
        assert len(sent) < len(frame) and zlib.decompress(sent) == frame
        assert protocol.is_compressed(sent)
    else:
        assert sent[0] == 0x02 and not protocol.is_compressed(sent)


@given(st.binary(max_size=2000).map(lambda b: b[: len(b) // 2 * 2]), st.sampled_from([16000, 22050, 24000]))
def test_wav_chunks_carry_exact_sizes(pcm, rate):
    data = wav_bytes(pcm, rate)
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    assert struct.unpack_from("<I", data, 40)[0] == len(pcm)
    assert read_wav(data) == (rate, pcm)


# ---------------------------------------------------------------- events: one renderer, read back

_IDS = st.text(min_size=1, max_size=12)
_MS = st.integers(0, 10**7)
_EVENTS = st.one_of(
    st.builds(events.Hello, st.sampled_from(list(SessionState)), st.sampled_from(protocol.PROVIDER_NAMES)),
    st.builds(events.Ready, st.sampled_from(protocol.PROVIDER_NAMES)),
    st.builds(events.Accepted, _IDS, st.integers(0, 1000)),
    st.builds(events.UtteranceStarted, _IDS, st.just("piper"), _IDS, st.just(24000), st.integers(0, 2**32 - 1)),
    st.builds(
        events.UtteranceFinished, _IDS, st.sampled_from(list(events.Status)), st.integers(0, 99),
        st.none() | st.integers(0, 2**32 - 1), st.integers(0, 10**6), st.none() | st.floats(0, 1e4), st.none() | st.floats(0, 10),
    ),
    st.builds(events.ProviderChanged, st.sampled_from(protocol.PROVIDER_NAMES)),
    st.builds(
        events.ErrorEvent, st.sampled_from(list(events.ErrorCode)), st.text(max_size=50),
        st.none() | _IDS, st.none() | st.booleans(), st.none() | st.floats(0, 60),
    ),
    st.builds(events.Cancelled, st.lists(_IDS, max_size=3).map(tuple)),
    st.just(events.Closed()),
    st.builds(
        events.Words, _IDS,
        st.lists(st.builds(events.WordTime, st.text(max_size=8), _MS, _MS, _MS), max_size=3).map(tuple), st.booleans(),
    ),
    st.builds(
        events.Visemes, _IDS,
        st.lists(st.builds(events.VisemeTime, st.sampled_from(VISEMES), _MS, _MS), max_size=3).map(tuple), st.booleans(),
    ),
)  # fmt: skip


@given(_EVENTS)
def test_every_event_reads_back_as_itself(event):
    text = protocol.render(event)
    assert json.loads(text)["type"] == protocol.EVENT_TYPES[type(event)]
    assert protocol.decode_event(text) == event


def test_utterance_started_carries_each_subscribers_format_and_unknown_types_are_ignored():
    started = events.UtteranceStarted("u1", "piper", "en_US-joe-medium", 24000, 7)
    assert json.loads(protocol.render(started, events.AudioFormat.PCM))["format"] == "pcm"
    assert protocol.decode_event('{"type": "word_timings", "words": []}') is None
