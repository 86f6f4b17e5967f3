"""The PyAV fallback in processes, the channel average, and per-file memory bounds."""

from __future__ import annotations

import numpy as np
import pytest

from mert_indexer.client import decode as dec
from mert_indexer.client.pyav_pool import PyAVPool
from mert_indexer.client.synth import music, write
from mert_indexer.client.windows import StreamWindower, cut, to_wire
from mert_indexer.errors import DecodeError

SR = 24_000


@pytest.fixture(scope="module")
def m4a(tmp_path_factory):
    return write(tmp_path_factory.mktemp("m4a") / "x.m4a", music(20.0, seed=11), 44_100)


@pytest.fixture(scope="module")
def pool():
    with PyAVPool(2) as p:
        yield p


def test_pool_decodes_exactly_what_pyav_decodes_in_process(pool, m4a):
    here = np.concatenate(list(dec.pyav_blocks(m4a, SR)))
    there = np.concatenate(list(dec.decode_blocks(m4a, SR, fallback=pool.blocks)))
    np.testing.assert_array_equal(here, there)
    assert abs(len(there) / SR - 20.0) < 0.1


def test_pool_takes_what_libsndfile_rejects(pool, tmp_path):
    """An Ogg name over an AAC stream: libsndfile refuses it, the fallback reads it."""
    path = tmp_path / "aac-in-disguise.ogg"
    path.write_bytes(write(tmp_path / "real.m4a", music(6.0, seed=12), 44_100).read_bytes())
    audio = np.concatenate(list(dec.decode_blocks(path, SR, fallback=pool.blocks)))
    assert abs(len(audio) / SR - 6.0) < 0.1


def test_pool_reports_unreadable_files_by_name(pool, tmp_path):
    path = tmp_path / "junk.m4a"
    path.write_bytes(b"\0garbage" * 300)
    with pytest.raises(DecodeError) as err:
        list(dec.decode_blocks(path, SR, fallback=pool.blocks))
    assert str(path) in str(err.value) and "not a readable audio file" in str(err.value)
    # the worker survives a bad file and decodes the next one
    assert pool.started >= 1


def test_abandoned_and_crashed_decoders_are_replaced(tmp_path, m4a):
    with PyAVPool(1) as pool:
        blocks = dec.decode_blocks(m4a, SR, fallback=pool.blocks)
        next(blocks)
        blocks.close()  # stops mid-file: that process is discarded, not reused
        assert pool.started == 0
        blocks = dec.decode_blocks(m4a, SR, fallback=pool.blocks)
        next(blocks)
        (worker,) = pool._all
        worker.process.kill()  # FFmpeg crashing on a hostile file
        with pytest.raises(DecodeError, match="decoder process died"):
            list(blocks)
        again = np.concatenate(list(dec.decode_blocks(m4a, SR, fallback=pool.blocks)))
        assert abs(len(again) / SR - 20.0) < 0.1


def test_pool_blocks_are_bounded_whatever_the_length(pool, tmp_path):
    long = write(tmp_path / "long.m4a", np.tile(music(20.0, seed=13), (15, 1)), 44_100)
    sizes = [len(b) for b in dec.decode_blocks(long, SR, fallback=pool.blocks)]
    assert sum(sizes) / SR == pytest.approx(300.0, abs=0.2)
    assert max(sizes) <= dec.PYAV_GATHER_FRAMES  # downsampling: never more than one gathered block


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_channel_average_is_the_mean(channels):
    frames = np.random.default_rng(channels).standard_normal((5000, channels)).astype(np.float32)
    np.testing.assert_allclose(dec._mono(frames), frames.mean(axis=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("hop", [120, 60, 37])
def test_converting_blocks_equals_converting_windows(hop):
    """The pipeline converts decoded blocks to int16 before windowing: same windows."""
    audio = (np.random.default_rng(0).standard_normal(1000) * 0.3).astype(np.float32)
    blocks = [audio[i : i + 97] for i in range(0, len(audio), 97)]
    got = list(StreamWindower(120, hop).run(to_wire(b, "int16") for b in blocks))
    starts, windows = cut(audio, 120, hop)
    assert [s for s, _ in got] == starts.tolist()
    for (_, w), ref in zip(got, windows, strict=True):
        np.testing.assert_array_equal(w, to_wire(ref, "int16"))


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "suffix, reason",
    [
        (".mp3", "truncated: the header promises 20.0 s, the stream ends at"),
        (".ogg", "truncated: the Ogg stream has no end-of-stream page"),
        (".flac", "decoding failed mid-stream"),
    ],
)
def test_cut_files_are_reported_not_indexed_short(tmp_path, suffix, reason):
    path = _cut(write(tmp_path / f"cut{suffix}", music(20.0, seed=21), 44_100))
    with pytest.raises(DecodeError, match=reason):
        list(dec.decode_blocks(path, SR))


@pytest.mark.parametrize("suffix", [".mp3", ".ogg", ".flac", ".wav"])
def test_whole_files_are_not_called_truncated(tmp_path, suffix):
    path = write(tmp_path / f"whole{suffix}", music(20.0, seed=22), 44_100)
    assert abs(sum(len(b) for b in dec.decode_blocks(path, SR)) / SR - 20.0) < 0.1


def test_unreadable_paths_say_why(tmp_path):
    import os

    (tmp_path / "dir.mp3").mkdir()
    (tmp_path / "broken.ogg").symlink_to(tmp_path / "nowhere.ogg")
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    os.mkfifo(tmp_path / "pipe.flac")
    for name, reason in [
        ("dir.mp3", "is a directory"),
        ("broken.ogg", "broken symbolic link"),
        ("a.wav", "symbolic link loop"),
        ("pipe.flac", "not a regular file"),
        ("absent.mp3", "file not found"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            dec.check_readable(tmp_path / name)


def test_names_that_are_not_utf8_decode(tmp_path):
    import os

    src = write(tmp_path / "x.flac", music(6.0, seed=23), 44_100)
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.flac")
    os.rename(src, odd)
    assert abs(len(dec.decode(odd, SR)) / SR - 6.0) < 0.05
